"""Three tiers vs two on the embedded task: small -> medium -> large against the best
two-tier cascades, each calibrated (label-free, Learn-then-Test) at the same budgets.

    OMP_NUM_THREADS=1 python -m bench.trio_report --n-cal 200 --n-test 200 \\
        --medium runs/train/medium/model --out bench/results/trio

One run, three stages (each resumable from `--work`):

1. sweeps on the calibration split: small->large and medium->large over a threshold
   list, small->medium->large over the product grid of that list (one threshold per
   gate), all with the embedded default gate (ConfidenceGate, min_prob, speculate);
2. `cascade.calibrate` for each at a grid of budgets (fractions of the large-only cost
   quantile), alpha/delta as given; a two-gate grid is certified along grid paths;
3. on the test split, greedy, batch 1, every policy on each problem in turn (a change of
   machine load hits all alike): small-, medium- and large-only, and each cascade with
   the thresholds certified for each budget, solved with that budget as a hard cap.

Writes `report.json` (figures and per-problem rows), `report.md` (tables, the matched-
accuracy comparison and the ship decision), `accuracy_vs_cost.png` and
`accuracy_vs_wall.png` (test run), `sweep_pareto_calibration.png` (every swept
candidate on the calibration split), with the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.pair_report import wilson_interval
from bench.progress import progress_printer
from bench.provenance import package_commit
from bench.tasks import DEFAULT_CONFIG, check_answer, generate_split
from calibration import product_grid
from cascade import (
    DEFAULT_EMBEDDED_GATE,
    AlwaysLarge,
    AlwaysSmall,
    Cascade,
    SolveOptions,
    calibrate,
    sweep_file,
)
from cascade.embedded import EMBEDDED_DELIMITER, EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS, embedded_path
from decoding import HFBackend

__all__ = ["main", "matched_accuracy", "pareto_front"]

CASCADES = {"small->large": ("small", "large"), "medium->large": ("medium", "large"),
            "small->medium->large": ("small", "medium", "large")}
TWO_TIER = ("small->large", "medium->large")
THREE_TIER = "small->medium->large"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (x = cost, y = accuracy) that no other point beats on both
    (lower-or-equal x and higher-or-equal y, one strictly), sorted by x."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((xo <= x and yo >= y and (xo < x or yo > y))
                   for j, (xo, yo) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i])


def matched_accuracy(summary: dict, families: dict[str, list[str]], targets: list[float],
                     key: str) -> dict:
    """For each target accuracy and family of policies, the policy with the lowest `key`
    (mean cost or mean wall seconds) among those whose test accuracy reaches the target."""
    table: dict = {}
    for target in targets:
        row = {}
        for family, names in families.items():
            reaching = [n for n in names if summary[n]["accuracy"] >= target]
            best = min(reaching, key=lambda n: summary[n][key]) if reaching else None
            row[family] = None if best is None else {"policy": best, key: summary[best][key],
                                                     "accuracy": summary[best]["accuracy"]}
        table[f"{target:g}"] = row
    return table


def _load(tier: str, path: str | None) -> HFBackend:
    return HFBackend.from_pretrained(path or embedded_path(tier), step_delimiter=EMBEDDED_DELIMITER,
                                     name=f"embedded:{tier}")


def _resumable_sweep(runner: Cascade, problems: list[str], candidates, path: Path):
    return sweep_file(runner, problems, candidates, path, progress=progress_printer(f"sweep {path.stem}"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cal", type=int, default=200, help="calibration problems (unlabeled use)")
    parser.add_argument("--n-test", type=int, default=200, help="test problems")
    parser.add_argument("--medium", default=None, help="medium model dir (default: shipped)")
    parser.add_argument("--thresholds", default="0.9,0.7,0.5,0.35,0.2,0.1,0.05",
                        help="per-gate threshold list (the three-tier grid is its square)")
    parser.add_argument("--budget-fractions", default="0.3,0.45,0.6,0.8",
                        help="budgets as fractions of the large-only cost (1-alpha)-quantile")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--targets", default="0.6,0.7,0.8,0.85,0.9,0.95", help="matched-accuracy targets")
    parser.add_argument("--test-minutes", type=float, default=None,
                        help="stop the test stage after this long (the report says how many problems ran)")
    parser.add_argument("--work", default="runs/trio", help="resumable intermediate files")
    parser.add_argument("--out", default="bench/results/trio")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    models = {"small": _load("small", None), "medium": _load("medium", args.medium),
              "large": _load("large", None)}
    options = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS)
    cascades = {name: Cascade(models=[models[t] for t in tiers],
                              gates=[DEFAULT_EMBEDDED_GATE] * (len(tiers) - 1),
                              tier_names=tiers, options=options) for name, tiers in CASCADES.items()}
    grid_1d = sorted({float(t) for t in args.thresholds.split(",")}, reverse=True)
    candidates = {name: ([(t,) for t in grid_1d] if len(tiers) == 2 else
                         [tuple(c) for c in product_grid([grid_1d, grid_1d]).tolist()])
                  for name, tiers in CASCADES.items()}

    # ---- 1. sweeps on the calibration split (labels never used to choose) ----
    cal_problems = [p.problem for p in generate_split("calibration", args.n_cal, DEFAULT_CONFIG)]
    cal_labels = [p.answer for p in generate_split("calibration", args.n_cal, DEFAULT_CONFIG)]
    swept = {}
    for name, runner in cascades.items():
        swept[name] = _resumable_sweep(runner, cal_problems, candidates[name],
                                       work / f"sweep_{name.replace('->', '_')}.jsonl")
    reference = np.array(swept["small->large"].reference_costs)  # large-only, same model everywhere
    q = float(np.quantile(reference, 1 - args.alpha))
    budgets = [round(float(f) * q, 2) for f in args.budget_fractions.split(",")]

    # ---- 2. calibration at the same budgets ----
    calibrations = {}
    for name, runner in cascades.items():
        calibrations[name] = calibrate(runner, cal_problems, budgets=budgets, alpha=args.alpha,
                                       delta=args.delta, method="ltt", candidates=candidates[name],
                                       swept=swept[name], labels=cal_labels)

    # ---- 3. the test run, interleaved per problem ----
    policies: dict[str, tuple[Cascade, list, float | None]] = {
        "small-only": (cascades["small->large"], [AlwaysSmall()], None),
        "medium-only": (cascades["medium->large"], [AlwaysSmall()], None),
        "large-only": (cascades["small->large"], [AlwaysLarge()], None),
    }
    families: dict[str, list[str]] = {name: [] for name in CASCADES}
    chosen: dict[str, dict] = {}
    for name, runner in cascades.items():
        for budget in budgets:
            entry = calibrations[name].entry_for(budget)
            if entry is None or entry["budget"] != budget:
                continue  # nothing certified at this budget
            label = f"{name} @B={budget:g}"
            policies[label] = (runner, calibrations[name].gates_for(budget), budget)
            families[name].append(label)
            chosen[label] = {"thresholds": entry["thresholds"], "statement": entry["statement"]}
    test = generate_split("test", args.n_test, DEFAULT_CONFIG)
    rows_path = work / "test_rows.jsonl"
    header = {"policies": {k: [repr(g) for g in v[1]] + [v[2]] for k, v in policies.items()},
              "tier_names": {k: list(v[0].tier_names) for k, v in policies.items()},
              "models": {t: m.info.fingerprint for t, m in models.items()}, "n_test": args.n_test}
    done: list[dict] = []
    if rows_path.exists():
        lines = rows_path.read_text().splitlines()
        if lines and json.loads(lines[0]) == json.loads(json.dumps(header)):
            done = [json.loads(line) for line in lines[1:] if line.strip() and line.endswith("}")]
    if not done:
        rows_path.write_text(json.dumps(header) + "\n")
    for runner, gates, budget in policies.values():  # warm-up, excluded from timing
        runner.solve(test[0].problem, budget, gates=gates)
    report_progress = progress_printer("test", "problems")
    stop_at = None if args.test_minutes is None else time.time() + 60 * args.test_minutes
    with rows_path.open("a") as sink:
        for i in range(len(done), len(test)):
            if stop_at is not None and time.time() > stop_at:
                print(f"test stage stopped by --test-minutes after {i} problems", file=sys.stderr)
                break
            item = test[i]
            row = {"id": item.id, "answer": item.answer, "policies": {}}
            for label, (runner, gates, budget) in policies.items():
                begin = time.perf_counter()
                result = runner.solve(item.problem, budget, gates=gates)
                wall = time.perf_counter() - begin
                row["policies"][label] = {
                    "correct": check_answer(item.problem, result.answer), "cost": result.cost.total,
                    "wall_seconds": wall, "cap_intervened": result.cap_intervened,
                    "steps": len(result.steps), "tiers": [s.tier for s in result.steps],
                    "tier_seconds": [u.seconds for u in result.cost.per_tier],
                    "tier_generated": [u.generated_tokens for u in result.cost.per_tier],
                    "tier_names": list(result.tier_names)}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            done.append(row)
            report_progress(i + 1, len(test))

    # ---- 4. figures ----
    summary = {}
    for label in policies:
        cells = [r["policies"][label] for r in done]
        correct = sum(c["correct"] for c in cells)
        steps = sum(c["steps"] for c in cells)
        names = cells[0]["tier_names"]
        summary[label] = {
            "accuracy": correct / len(cells), "accuracy_ci95": list(wilson_interval(correct, len(cells))),
            "mean_cost": float(np.mean([c["cost"] for c in cells])),
            "mean_wall_seconds": float(np.mean([c["wall_seconds"] for c in cells])),
            "p95_wall_seconds": float(np.percentile([c["wall_seconds"] for c in cells], 95)),
            "cap_intervened_rate": float(np.mean([c["cap_intervened"] for c in cells])),
            "step_share_by_tier": {t: sum(tier == k for c in cells for tier in c["tiers"]) / max(1, steps)
                                   for k, t in enumerate(names)},
            "mean_seconds_per_tier": {t: float(np.mean([c["tier_seconds"][k] for c in cells]))
                                      for k, t in enumerate(names)},
            **({"budget": policies[label][2], **chosen[label]} if label in chosen else {}),
        }
    # Seconds per step and per token of each model writing alone (batch 1).
    timing = {}
    for tier, label, k in (("small", "small-only", 0), ("medium", "medium-only", 0),
                           ("large", "large-only", 1)):
        cells = [r["policies"][label] for r in done]
        seconds = sum(c["tier_seconds"][k] for c in cells)
        timing[tier] = {"seconds_per_step": seconds / sum(c["steps"] for c in cells),
                        "seconds_per_token": seconds / max(1, sum(c["tier_generated"][k] for c in cells))}
    targets = [float(t) for t in args.targets.split(",")]
    by_cost = matched_accuracy(summary, families, targets, "mean_cost")
    by_wall = matched_accuracy(summary, families, targets, "mean_wall_seconds")
    decision = _ship_decision(by_cost, by_wall)
    # Secondary: every candidate of each sweep, on the calibration split (labels used for
    # reporting only), so the Pareto fronts have more than one point per budget.
    sweep_points = {name: [{"thresholds": list(c), "mean_cost": m, "accuracy": a}
                           for c, m, a in zip(candidates[name], cal_obj.curves["mean_cost"],
                                              cal_obj.curves["accuracy"], strict=False)]
                    for name, cal_obj in calibrations.items()}
    sweep_summary = {f"{name} {p['thresholds']}": p for name, pts in sweep_points.items() for p in pts}
    sweep_families = {name: [f"{name} {p['thresholds']}" for p in pts] for name, pts in sweep_points.items()}
    sweep_by_cost = matched_accuracy(sweep_summary, sweep_families, targets, "mean_cost")
    command = "python -m bench.trio_report " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command, "commit": package_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1, "
                   f"load average {os.getloadavg()[0]:.1f} at start",
        "n_calibration": len(cal_problems), "n_test": len(done), "alpha": args.alpha, "delta": args.delta,
        "thresholds": grid_1d, "budgets": budgets, "large_only_cost_quantile": q,
        "models": {t: {"name": m.info.name, "parameters": m.info.num_parameters,
                       "fingerprint": m.info.fingerprint} for t, m in models.items()},
        "sweep_stats": {name: {"candidates": len(candidates[name]), "executed_tokens": s.executed_tokens,
                               "independent_tokens": s.independent_tokens, "seconds": s.seconds}
                        for name, s in swept.items()},
        "calibration_entries": {name: list(c.entries) for name, c in calibrations.items()},
        "summary": summary, "timing": timing, "families": families,
        "matched_accuracy_by_cost": by_cost, "matched_accuracy_by_wall": by_wall,
        "ship_medium": decision,
        "calibration_sweep_points": sweep_points, "calibration_sweep_matched_by_cost": sweep_by_cost,
        "rows": done,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report) + "\n")
    _plot(report, out)
    print(_markdown(report))
    return report


def _ship_decision(by_cost: dict, by_wall: dict) -> dict:
    """Ship the medium model iff, at every target the best two-tier cascade reaches, the
    three-tier cascade reaches it too with a lower mean cost or a lower mean wall-clock."""
    compared, wins = [], []
    for target in by_cost:
        two = [by_cost[target][f] for f in TWO_TIER if by_cost[target][f] is not None]
        if not two:
            continue
        best_cost = min(c["mean_cost"] for c in two)
        best_wall = min(w["mean_wall_seconds"] for f in TWO_TIER if (w := by_wall[target][f]) is not None)
        three_cost, three_wall = by_cost[target][THREE_TIER], by_wall[target][THREE_TIER]
        win = three_cost is not None and (three_cost["mean_cost"] < best_cost
                                          or three_wall["mean_wall_seconds"] < best_wall)
        compared.append(target)
        wins.append(bool(win))
    return {"targets_compared": compared, "three_tier_wins": wins,
            "ship": bool(compared) and all(wins),
            "rule": "at every target accuracy the best two-tier cascade reaches, the three-tier cascade "
                    "reaches it with lower mean cost or lower mean wall-clock (same run)"}


def _fmt_cell(cell: dict | None, key: str, spec: str) -> str:
    if cell is None:
        return "not reached"
    return f"{format(cell[key], spec)} ({cell['policy']}, acc {cell['accuracy']:.3f})"


def _markdown(report: dict) -> str:
    models = ", ".join(f"{t} {m['parameters']:,} params" for t, m in report["models"].items())
    lines = [
        f"# Three tiers vs two on the embedded task ({report['n_test']} test problems, greedy, batch 1)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`, {report['date']}, {report['machine']}  ",
        f"Models: {models}.  ",
        f"Calibration: {report['n_calibration']} unlabeled calibration problems, Learn-then-Test "
        f"(alpha={report['alpha']}, delta={report['delta']}), objective = agreement with the large "
        f"model; thresholds {report['thresholds']} per gate (the three-tier cascade: their product "
        f"grid, certified along grid paths); budgets {report['budgets']} (fractions of the large-only "
        f"cost {1 - report['alpha']:.2g}-quantile {report['large_only_cost_quantile']:.1f}), each also the "
        "hard cap at test time. These are calibrated points, not a threshold sweep on the test set.",
        "",
        "| policy | thresholds | accuracy (95% CI) | mean cost | mean s | p95 s | cap intervened | "
        "step share by tier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        share = ", ".join(f"{t} {v:.2f}" for t, v in s["step_share_by_tier"].items())
        lines.append(f"| {name} | {s.get('thresholds', '-')} | {s['accuracy']:.3f} "
                     f"({s['accuracy_ci95'][0]:.3f}-{s['accuracy_ci95'][1]:.3f}) | {s['mean_cost']:.1f} | "
                     f"{s['mean_wall_seconds']:.3f} | {s['p95_wall_seconds']:.3f} | "
                     f"{s['cap_intervened_rate']:.3f} | {share} |")
    timing = report["timing"]
    lines += ["", "Each model alone, batch 1: " + ", ".join(
        f"{t} {v['seconds_per_step'] * 1000:.1f} ms/step ({v['seconds_per_token'] * 1000:.2f} ms/token)"
        for t, v in timing.items()) + ".", ""]
    for title, key, table, spec in (("mean cost", "mean_cost", report["matched_accuracy_by_cost"], ".1f"),
                                    ("mean wall seconds", "mean_wall_seconds",
                                     report["matched_accuracy_by_wall"], ".3f")):
        lines += [f"## At matched accuracy: lowest {title} reaching each target", "",
                  "| target accuracy | " + " | ".join(CASCADES) + " |",
                  "|---|" + "---|" * len(CASCADES)]
        for target, row in table.items():
            lines.append(f"| {target} | " + " | ".join(_fmt_cell(row[f], key, spec) for f in CASCADES) + " |")
        lines.append("")
    lines += ["## Secondary: every swept candidate on the calibration split (labels for reporting only)",
              "", "Lowest mean cost reaching each accuracy, over all threshold candidates (no wall-clock: "
              "the sweep shares work between candidates).", "",
              "| target accuracy | " + " | ".join(CASCADES) + " |", "|---|" + "---|" * len(CASCADES)]
    for target, row in report["calibration_sweep_matched_by_cost"].items():
        lines.append(f"| {target} | " + " | ".join(_fmt_cell(row[f], "mean_cost", ".1f") for f in CASCADES)
                     + " |")
    lines.append("")
    decision = report["ship_medium"]
    verdict = "ship the medium model" if decision["ship"] else "do NOT ship the medium model"
    lines += [f"**Decision: {verdict}.** Rule: {decision['rule']}. Targets compared: "
              f"{decision['targets_compared']}; three-tier wins: {decision['three_tier_wins']}.", "",
              "Sweep cost (tokens run / tokens of independent runs): " + ", ".join(
                  f"{n} {s['executed_tokens'] / max(1, s['independent_tokens']):.3f} over {s['candidates']} "
                  f"candidates" for n, s in report["sweep_stats"].items()) + ".", "",
              "Plots: [accuracy_vs_cost.png](accuracy_vs_cost.png), "
              "[accuracy_vs_wall.png](accuracy_vs_wall.png) "
              "(test run, calibrated points), [sweep_pareto_calibration.png](sweep_pareto_calibration.png) "
              "(every swept candidate, calibration split)"]
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    for file_name, key, xlabel in (("accuracy_vs_cost.png", "mean_cost",
                                    "mean cost per problem (large-token eq.)"),
                                   ("accuracy_vs_wall.png", "mean_wall_seconds",
                                    "mean wall seconds per problem")):
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        for single, marker in (("small-only", "v"), ("medium-only", "D"), ("large-only", "^")):
            s = summary[single]
            ax.plot([s[key]], [s["accuracy"]], marker, color="grey", label=single)
        for family, names in report["families"].items():
            if not names:
                continue
            points = [(summary[n][key], summary[n]["accuracy"]) for n in names]
            front = pareto_front(points)
            ax.plot([points[i][0] for i in range(len(points))], [p[1] for p in points], "o", alpha=0.35)
            color = ax.lines[-1].get_color()
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color=color,
                    label=f"{family} (calibrated; Pareto front)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"embedded task, {report['n_test']} test problems, budgets {report['budgets']}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file_name, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for family, points in report["calibration_sweep_points"].items():
        xy = [(p["mean_cost"], p["accuracy"]) for p in points]
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o", alpha=0.35)
        front = pareto_front(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-o", color=ax.lines[-1].get_color(),
                label=f"{family} (Pareto front)")
    ax.set_xlabel("mean cost per problem (large-token eq., uncapped)")
    ax.set_ylabel("accuracy on the calibration split")
    ax.set_title(f"threshold sweep, {report['n_calibration']} calibration problems", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep_pareto_calibration.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
