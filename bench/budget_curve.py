"""Accuracy against budget on the embedded pair, for every calibration method side by side.

    python -m bench.budget_curve --n-cal 120 --n-test 150 --out bench/results/budget_curve

1. Fits the budget-aware gate (`cascade.budget.fit_budget_gate`) on train-split problems
   (label-free; the small model alone) and sets the budget grid from the small-only and
   large-only mean cost of a pilot on other train-split problems, so nothing the
   calibration certifies was fitted on its own problems.
2. Sweeps, on the calibration split (answers unused) and the test split (answers used
   only to score), the columns of the curve: the confidence gate at 11 thresholds
   without a cap, and per budget B the budget-aware gate at its floor thresholds under
   the hard cap cap_factor * B. Saves the arrays (`sweeps.npz`), which the test suite
   re-uses to check the guarantees over many random splits.
3. For each budget and method ("budget": E[cost] <= B by conformal risk control with the
   cap as the loss bound; "risk": the same for one uncapped threshold; "conformal":
   C3PO's per-query P(cost > B) <= alpha; "ltt": the same by Learn-then-Test), the
   label-free choice on the calibration split and its test accuracy, mean cost, tail
   P(cost > B) and cap interventions, against the oracle: the column with the best test
   accuracy among those whose test mean cost is <= B, chosen with the labels.
4. Checks each guarantee over random calibration draws from the pooled problems.
Writes report.json, report.md and budget_curve.png.

`--stage overlay --resolve-report R [--resolve-report R2]` adds the problem-level re-solve
family (`runs/resolve_probe.py`: the same budgets, calibration and test problems, its own
certificate E[cost] <= B under its own cap) to a written report's table and plot, so that
every family is compared in one figure without sweeping the step-level columns again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import calibration as cal
from bench.independent_task import generate_independent
from bench.provenance import package_commit
from bench.tasks import check_answer, generate_split
from cascade import AdvantageGate, AlwaysLarge, AlwaysSmall, ConfidenceGate, Gate, embedded_cascade, sweep
from cascade.budget import (
    BudgetGate,
    budget_grid,
    calibrate_budget_curve,
    curve_candidates,
    fit_budget_gate,
    select_on_curve,
)
from cascade.calibrate import SweepResult, default_thresholds
from cascade.router import load_router

__all__ = ["main", "check_guarantees", "best_within_budget"]

# The step-level methods this benchmark sweeps (its committed sweeps predate the "resolve"
# family; the problem-level re-solve on the same splits is runs/resolve_probe.py).
CURVE_METHODS: tuple[str, ...] = ("budget", "risk", "conformal", "ltt")

# The budget-aware gate's floor thresholds: finest where the curve bends (0.35-0.6 on the
# embedded pair), where a 0.1 step moved the mean cost by ~9 units (~0.1x the large model).
FLOORS = (1.0, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.2, 0.1, 0.0)
LABELS = {"budget": "budget-aware, cap = k x B (E[cost] <= B, risk control)",
          "risk": "one threshold (E[cost] <= B, risk control)",
          "conformal": "one threshold, C3PO setting (P(cost > B) <= alpha, conformal)",
          "ltt": "one threshold (P(cost > B) <= alpha w.p. 1 - delta, LTT)",
          "resolve": "problem-level re-solve, cap = k x B (E[cost] <= B, risk control)"}


def _arrays(swept, problems) -> dict[str, np.ndarray]:
    correct = np.array([[check_answer(p, a) for a in row]
                        for p, row in zip(problems, swept.answers, strict=False)])
    return {"costs": swept.costs, "agreement": swept.agreement, "correct": correct,
            "capped": swept.cap_intervened,
            "reference_correct": np.array([check_answer(p, a)
                                           for p, a in zip(problems, swept.reference_answers, strict=False)]),
            "reference_costs": np.array(swept.reference_costs)}


def best_within_budget(mean_cost: np.ndarray, score: np.ndarray, budget: float,
                       columns: Sequence[int] | None = None) -> int | None:
    """The column (of `columns`, default all) with the best `score` among those whose mean cost is
    <= `budget`, the cheaper one on a tie; None when none fits: a label-using choice (oracle or
    labelled bar) when `score` is an accuracy."""
    within = [j for j in (range(len(mean_cost)) if columns is None else columns) if mean_cost[j] <= budget]
    return max(within, key=lambda k: (score[k], -mean_cost[k])) if within else None


def check_guarantees(pool_costs: np.ndarray, candidates, budgets, methods, alpha: float, delta: float,
                     cap_factor: float, cost_max: float, n_cal: int, splits: int, seed: int = 0) -> dict:
    """Each method's guarantee over `splits` calibration sets drawn i.i.d. from the pool.

    The pool is the population, so a chosen column's true mean cost and true P(cost > B)
    are the pool's. Returns per method and budget: the mean over splits of the true mean
    cost (risk control promises E <= B), the fraction of splits whose true P(cost > B)
    exceeds alpha (LTT promises <= delta), the mean true P(cost > B) (conformal promises
    <= alpha), and how often nothing was certified."""
    rng = np.random.default_rng(seed)
    # Among certified columns take the most escalating (columns run cheapest first within a
    # family): the costliest choice the guarantee has to cover.
    most_escalating = np.arange(pool_costs.shape[1], dtype=float)
    out: dict = {}
    draws = [rng.integers(0, len(pool_costs), n_cal) for _ in range(splits)]
    for method in methods:
        for b in budgets:
            true_mean, true_tail, abstain = [], [], 0
            tail = (pool_costs > b).mean(axis=0)
            mean = pool_costs.mean(axis=0)
            for draw in draws:
                try:
                    j, _ = select_on_curve(pool_costs[draw], candidates, most_escalating,
                                           method, b, alpha, delta, cap_factor, cost_max)
                except cal.CalibrationError:
                    abstain += 1
                    continue
                true_mean.append(mean[j])
                true_tail.append(tail[j])
            out[f"{method}@{b:g}"] = {
                "method": method, "budget": b, "splits": splits, "abstained": abstain,
                "mean_true_cost": float(np.mean(true_mean)) if true_mean else None,
                "sd_true_cost": float(np.std(true_mean, ddof=1)) if len(true_mean) > 1 else None,
                "mean_true_tail": float(np.mean(true_tail)) if true_tail else None,
                "frac_tail_over_alpha": float(np.mean(np.array(true_tail) > alpha)) if true_tail else None}
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cal", type=int, default=120)
    parser.add_argument("--n-test", type=int, default=150)
    parser.add_argument("--n-fit", type=int, default=60, help="train-split problems to fit the gate on")
    parser.add_argument("--n-pilot", type=int, default=30, help="train-split problems to set the budget grid")
    parser.add_argument("--cap-factor", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--splits", type=int, default=300)
    parser.add_argument("--thresholds", type=int, default=21,
                        help="one-threshold family: this many in [0, 1] (--stage prepare; kept in plan.json)")
    parser.add_argument("--floors", default=",".join(f"{f:g}" for f in FLOORS),
                        help="budget-aware gate: its floor thresholds (--stage prepare; kept in plan.json)")
    parser.add_argument("--budgets", type=int, default=7,
                        help="grid points, small-only to large-only mean cost")
    parser.add_argument("--stage", choices=["all", "prepare", "sweep", "report", "overlay"], default="all",
                        help="run in parts (a busy machine): prepare (fit the gate, set the grid: "
                             "plan.json), "
                             "sweep --split S --start a --stop b (in parallel processes), report; "
                             "overlay: add --resolve-report files to a written report")
    parser.add_argument("--split", choices=["calibration", "test", "independent"], default="calibration",
                        help="--stage sweep: the problems to sweep (independent: bench.independent_task)")
    parser.add_argument("--test-split", choices=["test", "independent"], default="test",
                        help="the test problems of the report: the task's test split, or those of the "
                             "independently written generator (report_independent.*)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--out", default="bench/results/budget_curve")
    parser.add_argument("--resolve-report", action="append", default=[],
                        help="--stage overlay: a runs/resolve_probe.py report.json to add (repeatable)")
    parser.add_argument("--router", default=None,
                        help="the gate whose score the policies use: the advantage router in this file "
                             "(cascade train-router; AdvantageGate) instead of ConfidenceGate(min_prob)")
    return parser


def _prepare(args, runner, inner) -> dict:
    train = [p.problem for p in generate_split("train", args.n_fit + args.n_pilot)]
    gate = fit_budget_gate(runner, train[: args.n_fit], inner)
    pilot = train[args.n_fit:]
    small = float(np.mean([r.cost.total for r in runner.solve_many(pilot, gates=[AlwaysSmall()])]))
    large = float(np.mean([r.cost.total for r in runner.solve_many(pilot, gates=[AlwaysLarge()])]))
    gate_fields = {f.name: getattr(gate, f.name) for f in dataclasses.fields(gate) if f.name != "inner"}
    return {"commit": package_commit(), "inner": repr(inner), "gate": gate_fields, "small": small,
            "large": large,
            "budgets": list(budget_grid(small, large, k=args.budgets)),
            "thresholds": sorted(default_thresholds(args.thresholds), reverse=True),
            "floors": sorted({float(f) for f in args.floors.split(",")}, reverse=True)}


def _split_problems(split: str, n: int) -> list[str]:
    """The first n problems of a fixed split, or of the independent generator."""
    chosen = generate_independent(n) if split == "independent" else generate_split(split, n)
    return [p.problem for p in chosen]


def _sweep_part(runner, gate, candidates, split: str, start: int, stop: int):
    problems = _split_problems(split, stop)[start:]
    t0 = time.perf_counter()
    swept = sweep(runner, problems, [(t,) for _, t, _ in candidates], gates=[gate],
                  caps=[c for _, _, c in candidates],
                  progress=lambda d, t: print(f"\r{split}[{start}:{stop}]: {d}/{t}", end="", flush=True))
    print(flush=True)
    return problems, swept, time.perf_counter() - t0


def _concat(parts) -> tuple[list[str], SweepResult, float]:
    problems = [p for part in parts for p in part[0]]
    sweeps = [part[1] for part in parts]
    swept = dataclasses.replace(
        sweeps[0], problems=tuple(problems),
        costs=np.concatenate([s.costs for s in sweeps]),
        escalation=np.concatenate([s.escalation for s in sweeps]),
        answers=tuple(a for s in sweeps for a in s.answers),
        reference_answers=tuple(a for s in sweeps for a in s.reference_answers),
        reference_costs=tuple(c for s in sweeps for c in s.reference_costs),
        cap_intervened=np.concatenate([s.cap_intervened for s in sweeps]),
        executed_tokens=sum(s.executed_tokens for s in sweeps),
        independent_tokens=sum(s.independent_tokens for s in sweeps), seconds=sum(s.seconds for s in sweeps))
    return problems, swept, sum(part[2] for part in parts)


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.budget_curve " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.stage == "overlay":  # no model runs
        return overlay(args, out, command)
    started = time.perf_counter()
    inner: Gate = ConfidenceGate(threshold=0.5, signal="min_prob")
    runner = embedded_cascade(inner)
    if args.router is not None:
        inner = AdvantageGate(router=load_router(args.router, models=runner.models), threshold=0.5)
        runner = embedded_cascade(inner)
    plan_path = out / "plan.json"
    if args.stage in ("all", "prepare"):
        plan_path.write_text(json.dumps(_prepare(args, runner, inner), indent=1) + "\n")
        if args.stage == "prepare":
            return None
    plan = json.loads(plan_path.read_text())
    planned = plan.get("inner", repr(ConfidenceGate(threshold=0.5, signal="min_prob")))  # older plans
    if planned != repr(inner):
        raise SystemExit(f"{plan_path} was prepared for the gate {planned}, not {inner!r} (--router)")
    gate = BudgetGate(inner, **{k: tuple(v) if isinstance(v, list) else v for k, v in plan["gate"].items()})
    budgets, grid, small, large = tuple(plan["budgets"]), plan["thresholds"], plan["small"], plan["large"]
    floors = tuple(plan.get("floors", FLOORS))
    candidates = curve_candidates(budgets, grid, floors, args.cap_factor)
    print(f"budgets {budgets}; {len(candidates)} columns", flush=True)
    sizes = {"calibration": args.n_cal, args.test_split: args.n_test}
    suffix = "" if args.test_split == "test" else f"_{args.test_split}"
    if args.stage == "sweep":
        sizes.setdefault(args.split, args.n_test)
        stop = sizes[args.split] if args.stop is None else args.stop
        part = _sweep_part(runner, gate, candidates, args.split, args.start, stop)
        with open(out / f"part_{args.split}_{args.start}_{stop}.pkl", "wb") as handle:
            pickle.dump(part, handle)
        return None
    data = {}
    stats = {}
    for split, n in sizes.items():
        if args.stage == "all":
            parts = [_sweep_part(runner, gate, candidates, split, 0, n)]
        else:
            files = sorted(out.glob(f"part_{split}_*.pkl"), key=lambda f: int(f.stem.split("_")[2]))
            parts = [pickle.loads(f.read_bytes()) for f in files]
        problems, swept, seconds = _concat(parts)
        if len(problems) != n or problems != _split_problems(split, n):
            raise SystemExit(f"the {split} parts hold {len(problems)} problems, "
                             f"not the first {n} of the split")
        stats[split] = {"seconds": seconds, "executed_tokens": swept.executed_tokens,
                        "independent_tokens": swept.independent_tokens, "processes": len(parts)}
        data[split] = (problems, swept, _arrays(swept, problems))
    cal_problems, cal_swept, _ = data["calibration"]
    _, _, test = data[args.test_split]
    np.savez_compressed(out / f"sweeps{suffix}.npz", budgets=np.array(budgets), cap_factor=args.cap_factor,
                        families=np.array([f for f, _, _ in candidates]),
                        thresholds=np.array([t for _, t, _ in candidates]),
                        caps=np.array([math.nan if c is None else c for _, _, c in candidates]),
                        **{f"{s}_{k}": v for s, (_, _, arrays) in data.items() for k, v in arrays.items()})

    curve = calibrate_budget_curve(runner, cal_problems, budgets=budgets, cap_factor=args.cap_factor,
                                   alpha=args.alpha, delta=args.delta, thresholds=grid,
                                   budget_thresholds=floors, gate=gate, swept=cal_swept,
                                   methods=CURVE_METHODS)
    small_test = float(test["correct"][:, 0].mean())  # threshold 1.0 without a cap: small alone
    large_test = float(test["reference_correct"].mean())
    rows = []
    for p in curve.points:
        row = {"method": p.method, "budget": p.budget, "index": p.index, "cap": p.cap,
               "threshold": p.threshold,
               "expected_agreement": p.agreement, "calibration_mean_cost": p.mean_cost,
               "statement": p.statement,
               "reason": p.reason}
        if p.index is not None:
            j = p.index
            acc = float(test["correct"][:, j].mean())
            row.update(test_accuracy=acc, test_mean_cost=float(test["costs"][:, j].mean()),
                       test_tail=float((test["costs"][:, j] > p.budget).mean()),
                       test_cap_intervened=float(test["capped"][:, j].mean()),
                       test_agreement=float(test["agreement"][:, j].mean()),
                       gap_recovered=(acc - small_test) / (large_test - small_test))
        rows.append(row)
    oracle = []
    test_mean = test["costs"].mean(axis=0)
    test_acc = test["correct"].mean(axis=0)
    cal_arrays = data["calibration"][2]
    cal_mean, cal_acc = cal_arrays["costs"].mean(axis=0), cal_arrays["correct"].mean(axis=0)
    for b in budgets:
        entry = {"budget": b}
        # What a user with labelled calibration problems would pick (the same problems, their
        # answers used, no margin): the fair bar for a label-free choice. The oracle below
        # picks with the test problems' own labels and costs, an upper line no method can see.
        j = best_within_budget(cal_mean, cal_acc, b)
        if j is not None:
            entry["labelled_calibration"] = {
                "index": j, "family": candidates[j][0], "threshold": candidates[j][1],
                "cap": candidates[j][2],
                "calibration_accuracy": float(cal_acc[j]), "test_accuracy": float(test_acc[j]),
                "test_mean_cost": float(test_mean[j])}
        # The same user held to the budget-aware method's own guarantee: among the columns
        # it certifies at B, the one with the best calibration accuracy. Against this bar the
        # label-free choice loses only what agreement with the large model misses of accuracy.
        try:
            j, _ = select_on_curve(cal_arrays["costs"], candidates, cal_acc, "budget", b, args.alpha,
                                   args.delta, args.cap_factor, curve.cost_max_uncapped)
        except cal.CalibrationError:
            j = None
        if j is not None:
            entry["labelled_certified"] = {
                "index": j, "family": candidates[j][0], "threshold": candidates[j][1],
                "cap": candidates[j][2], "calibration_accuracy": float(cal_acc[j]),
                "test_accuracy": float(test_acc[j]), "test_mean_cost": float(test_mean[j])}
        for name, family in (("oracle", None), ("oracle_budget_family", "budget")):
            cols = [j for j, (f, _, c) in enumerate(candidates)
                    if family is None or (f == family and c == args.cap_factor * b)]
            j = best_within_budget(test_mean, test_acc, b, cols)
            if j is not None:
                entry[name] = {"index": j, "family": candidates[j][0], "threshold": candidates[j][1],
                               "cap": candidates[j][2], "test_accuracy": float(test_acc[j]),
                               "test_mean_cost": float(test_mean[j])}
        oracle.append(entry)
    pool = np.concatenate([data["calibration"][2]["costs"], test["costs"]])
    guarantees = check_guarantees(pool, candidates, budgets, CURVE_METHODS, args.alpha, args.delta,
                                  args.cap_factor, curve.cost_max_uncapped, args.n_cal, args.splits)
    report = {
        "command": command,
        "commit": package_commit(), "sweep_commit": plan.get("commit"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n_cal": args.n_cal, "n_test": args.n_test, "test_split": args.test_split,
        "n_fit": args.n_fit, "n_pilot": args.n_pilot,
        "alpha": args.alpha, "delta": args.delta, "cap_factor": args.cap_factor,
        "pilot_small_mean_cost": small, "pilot_large_mean_cost": large, "budgets": list(budgets),
        "test_small_accuracy": small_test, "test_large_accuracy": large_test,
        "test_large_mean_cost": float(test["reference_costs"].mean()),
        "gate": plan["gate"] | {"inner": repr(inner)}, "router": args.router,
        "cost_max_uncapped": curve.cost_max_uncapped, "floors": list(floors), "thresholds": grid,
        "sweep": stats, "points": rows, "oracle": oracle, "guarantees": guarantees,
        "seconds": time.perf_counter() - started,
    }
    (out / f"report{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"report{suffix}.md").write_text(markdown(report) + "\n")
    plot(report, out / f"budget_curve{suffix}.png")
    print(markdown(report))
    return report


def overlay(args: argparse.Namespace, out: Path, command: str) -> dict:
    """Add the re-solve reports' certified points for this report's test split; rewrite the
    report's JSON, Markdown and plot. A report swept on other budgets is refused."""
    if not args.resolve_report:
        raise SystemExit("--stage overlay needs at least one --resolve-report")
    suffix = "" if args.test_split == "test" else f"_{args.test_split}"
    report_path = out / f"report{suffix}.json"
    if not report_path.exists():
        raise SystemExit(f"{report_path} does not exist: run --stage report first")
    report = json.loads(report_path.read_text())
    families = []
    for path in map(Path, args.resolve_report):
        try:
            probe = json.loads(path.read_text())
            split = probe["splits"][report["test_split"]]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"{path}: not a resolve-probe report with a "
                             f"{report['test_split']!r} split ({error})") from error
        budgets = [row["budget"] for row in split["rows"]]
        if len(budgets) != len(report["budgets"]) or any(
                abs(a - b) > 1e-6 for a, b in zip(budgets, report["budgets"], strict=True)):
            raise SystemExit(f"{path} was certified at the budgets {budgets}, not the report's "
                             f"{report['budgets']}")
        if probe["n_calibration"] != report["n_cal"] or probe["n_test"] != report["n_test"]:
            raise SystemExit(f"{path} used {probe['n_calibration']} calibration and {probe['n_test']} test "
                             f"problems, not the report's {report['n_cal']} and {report['n_test']}")
        families.append({"source": str(path), "command": probe["command"], "commit": probe["commit"],
                         "cap_factor": probe["cap_factor"], "gate": probe["gate"],
                         "test_small_accuracy": split["small_accuracy"],
                         "test_large_accuracy": split["large_accuracy"],
                         "rows": [{"budget": row["budget"], **row.get("certified", {}),
                                   "bars": row.get("bars", {})} for row in split["rows"]]})
    report["resolve"] = families
    report["overlay_command"] = command
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"report{suffix}.md").write_text(text + "\n")
    plot(report, out / f"budget_curve{suffix}.png")
    print(text)
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# Accuracy vs budget on the embedded pair ({report['n_cal']} unlabeled calibration problems, "
        f"{report['n_test']} test problems)", "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}` (gate fitted and problems swept at `{report['sweep_commit']}`), "
        f"{report['date']}", "",
        f"Gate score: `{report['gate']['inner']}` (the budget-aware policy's, under its floor and the "
        "request's remaining budget, and the one-threshold methods').", "",
        f"Budget B: what a request may cost on average (cost units). Test: small alone "
        f"{report['test_small_accuracy']:.3f}, large alone {report['test_large_accuracy']:.3f} at mean cost "
        f"{report['test_large_mean_cost']:.1f}. The budget-aware policy runs each request under the hard cap "
        f"{report['cap_factor']:g} x B. alpha={report['alpha']}, delta={report['delta']}.", "",
        "| B | method | chosen (threshold, cap) | expected agreement (cal.) | test accuracy | "
        "gap recovered | "
        "test mean cost | test P(cost > B) | cap intervened | labelled choice on cal., budget-aware "
        "guarantee (test acc.) | labelled choice on cal., no margin (test acc.) | oracle (test labels) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    oracle = {o["budget"]: o for o in report["oracle"]}
    for method in CURVE_METHODS:
        for row in (r for r in report["points"] if r["method"] == method):
            o = oracle[row["budget"]].get("oracle")
            o_text = f"{o['test_accuracy']:.3f}" if o else "none"
            for bar in ("labelled_calibration", "labelled_certified"):
                labelled = oracle[row["budget"]].get(bar)
                o_text = (f"{labelled['test_accuracy']:.3f}" if labelled else "none") + f" | {o_text}"
            if row["index"] is None:
                lines.append(f"| {row['budget']:g} | {method} | none certified | | | | | | | {o_text} |")
                continue
            cap = "no cap" if row["cap"] is None else f"cap {row['cap']:.0f}"
            lines.append(f"| {row['budget']:g} | {method} | {row['threshold']:g}, {cap} | "
                         f"{row['expected_agreement']:.3f} | {row['test_accuracy']:.3f} | "
                         f"{row['gap_recovered']:.2f} | {row['test_mean_cost']:.1f} | "
                         f"{row['test_tail']:.3f} | "
                         f"{row['test_cap_intervened']:.3f} | {o_text} |")
    lines += ["", f"Guarantees over {report['guarantees'][next(iter(report['guarantees']))]['splits']} "
              f"calibration sets of {report['n_cal']} drawn i.i.d. from the pooled "
              f"{report['n_cal'] + report['n_test']} problems (true values = the pool's):", "",
              "| method | B | mean true E[cost] (<= B?) | mean true P(cost > B) | "
              "splits with P(cost > B) > alpha "
              "| abstained |", "|---|---|---|---|---|---|"]
    for g in report["guarantees"].values():
        if g["mean_true_cost"] is None:
            lines.append(f"| {g['method']} | {g['budget']:g} | none certified | | | {g['abstained']} |")
            continue
        lines.append(f"| {g['method']} | {g['budget']:g} | {g['mean_true_cost']:.2f} | "
                     f"{g['mean_true_tail']:.3f} | "
                     f"{g['frac_tail_over_alpha']:.3f} | {g['abstained']} |")
    for family in report.get("resolve", []):
        lines += ["", f"Problem-level re-solve (`{family['gate']}`), certified E[cost] <= B by conformal "
                  f"risk control under the hard cap {family['cap_factor']:g} x B, run by the runtime on the "
                  f"same test problems (small alone {family['test_small_accuracy']:.3f}, large alone "
                  f"{family['test_large_accuracy']:.3f}): `{family['command']}` at "
                  f"`{family['commit'][:7]}`.", "",
                  "| B | threshold | test accuracy | gap recovered | test mean cost | test P(cost > B) | "
                  "re-solved | cap intervened | re-solve columns: labelled choice on cal., same guarantee | "
                  "labelled choice on cal., no margin | oracle (test labels) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in family["rows"]:
            bars = " | ".join(f"{b['test_accuracy']:.3f}" if (b := row.get("bars", {}).get(name)) else "none"
                              for name in ("labelled_certified", "labelled_calibration", "oracle"))
            if "test_accuracy" not in row:
                lines.append(f"| {row['budget']:g} | none certified | | | | | | | {bars} |")
                continue
            lines.append(f"| {row['budget']:g} | {row['threshold']:.3f} | {row['test_accuracy']:.3f} | "
                         f"{row['gap_recovered']:.2f} | {row['test_mean_cost']:.1f} | "
                         f"{row['test_p_cost_over_budget']:.3f} | {row['resolved']:.2f} | "
                         f"{row['cap_intervened']:.2f} | {bars} |")
    if "overlay_command" in report:
        lines += ["", f"Re-solve rows added by `{report['overlay_command']}`."]
    s = report["sweep"]["calibration"]
    columns = len(report["thresholds"]) + len(report["floors"]) * len(report["budgets"])
    one_pass = s["independent_tokens"] / columns  # the mean tokens of one column run alone
    lines += ["", f"Sweep of the calibration split ({columns} columns): {s['executed_tokens']} tokens run "
              f"for {s['independent_tokens']} in independent runs, i.e. "
              f"{s['executed_tokens'] / one_pass:.2f}x the tokens of one pass (one column), "
              f"{s['seconds']:.0f} s."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in report["points"]))  # in the report's order
    for method, style in zip(methods, ("o-", "s-", "^--", "v:", "D-"), strict=False):
        rows = [r for r in report["points"] if r["method"] == method]
        xs = [r["budget"] for r in rows]
        # none certified: small alone
        ys = [r.get("test_accuracy", report["test_small_accuracy"]) for r in rows]
        ax.plot(xs, ys, style, label=LABELS[method])
    for family, style in zip(report.get("resolve", []), ("D-", "P-"), strict=False):
        rows = family["rows"]
        ys = [r.get("test_accuracy", report["test_small_accuracy"]) for r in rows]  # none certified
        ax.plot([r["budget"] for r in rows], ys, style,
                label=f"problem-level re-solve, cap = {family['cap_factor']:g} x B (E[cost] <= B)")
    for method, style in zip(("budget", "resolve"), ("o:", "D:"), strict=True):
        rows = [r for r in report.get("paced", []) if r["method"] == method]
        if rows:
            ax.plot([r["budget"] for r in rows], [r["test_accuracy"] for r in rows], style, mfc="none",
                    label=f"{LABELS[method].split(',')[0]}, paced online (mean cost -> B, any order)")
    xs = [o["budget"] for o in report["oracle"] if "oracle" in o]
    ax.plot(xs, [o["oracle"]["test_accuracy"] for o in report["oracle"] if "oracle" in o], "k--", lw=1,
            label=report.get("oracle_label",
                             "oracle: best step-level column with test mean cost <= B (labels)"))
    rows = [o for o in report["oracle"] if "labelled_calibration" in o]
    if rows:
        ax.plot([o["budget"] for o in rows], [o["labelled_calibration"]["test_accuracy"] for o in rows], "x-",
                color="gray", lw=1, label="labelled choice on the calibration problems (answers used)")
    ax.axhline(report["test_large_accuracy"], color="gray", ls=":", label="large alone")
    ax.axhline(report["test_small_accuracy"], color="gray", ls="-.", label="small alone")
    ax.set(xlabel="budget B: mean cost per request (large-token equivalents)", ylabel="test accuracy",
           title=f"{report.get('pair', 'Embedded pair')}: accuracy vs budget, label-free calibration\n"
                 + report["gate"]["inner"].split("(")[0] + " score")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
