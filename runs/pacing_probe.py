"""Online budget pacing of the certified re-solve (issue 19, embedded pair).

Conformal risk control certified the re-solve's threshold on 400 unlabeled calibration
problems (`runs/resolve_probe.py --cap-factor 6 --n-calibration 400`): E[cost] <= B for
problems like those. The test split's problems are easier (at B = 40.3 the certified threshold
spent 33.1 there) and the independent generator's harder (45.7). A `PacedPolicy` starts at
the certified threshold and moves along the same thresholds as requests finish, so that the
running mean cost stays at B on whatever traffic arrives, with a deterministic ceiling
(`calibration.pacing`): mean cost <= B + B * (start - position_n) / (step * n) for ANY order.

This replays the pacer on the recorded per-threshold outcomes of every problem (the probe's
pooled arrays for the test split, a fresh sweep of the same columns for the independent
problems; each cell is what the runtime does for that problem at that threshold under the
hard cap 6 x B), in the problems' order and over random orders, and checks one budget
through the runtime (the `PacedPolicy` solving the test problems one after another gives the
replay's costs and answers).

    python runs/pacing_probe.py   # writes bench/results/pacing/report.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import calibration as cal
import cascade
from bench.provenance import package_commit
from bench.tasks import check_answer
from cascade.budget import BudgetCurve, PacedPolicy, fit_budget_gate, select_on_curve, sweep_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resolve_probe import N_FIT, problems_of  # noqa: E402  (the probe's problems, one definition)

POOLED = Path("bench/results/resolve_probe_cap6_cal400/pooled.npz")
OUT = Path("bench/results/pacing")
N_CAL, N_TEST, CAP_FACTOR = 400, 150, 6.0
STEPS = (1.0, 2.0, 4.0)
DEFAULT_STEP = 2.0
# Served under load: closed-loop clients, each request running for as long as it costs (cost
# units as time: cheap requests finish first); streams of 4 passes over a test set in random
# order, so that the pacer reaches the steady state a server runs in.
CLIENTS, PASSES, LOAD_DRAWS = (1, 16, 64), 4, 100


def replay(costs: np.ndarray, correct: np.ndarray, columns: np.ndarray, budget: float, step: float,
           start: int, order: np.ndarray, concurrency: int = 1,
           account_in_flight: bool = True) -> tuple[float, float, float]:
    """(mean cost, accuracy, ceiling) of the pacer serving the rows in `order` (`concurrency`
    closed-loop clients, each request running for as long as it costs)."""
    chosen, pacer = cal.replay_pacer(costs[:, columns], budget, step=step, start=float(start), order=order,
                                     concurrency=concurrency, account_in_flight=account_in_flight)
    return pacer.mean_cost, float(correct[np.arange(len(costs)), columns[chosen]].mean()), pacer.bound()


def load_replays(costs: np.ndarray, correct: np.ndarray, columns: np.ndarray, budget: float, start: int,
                 rng: np.random.Generator, draws: int, small_accuracy: float, gap: float) -> dict:
    """Per number of clients, the pacer that hears only of finished requests ("finished") and the
    one that counts the running requests' expected spend ("running"), on the same random streams."""
    n = len(costs)
    tiled_costs, tiled_correct = np.tile(costs, (PASSES, 1)), np.tile(correct, (PASSES, 1))
    streams = [np.concatenate([rng.permutation(n) + n * k for k in range(PASSES)]) for _ in range(draws)]
    out: dict = {}
    for clients in CLIENTS:
        out[str(clients)] = {}
        for name, account in (("finished", False), ("running", True)):
            runs = np.array([replay(tiled_costs, tiled_correct, columns, budget, DEFAULT_STEP, start, order,
                                    clients, account) for order in streams])
            mean_cost, accuracy, ceiling = runs[:, 0], runs[:, 1], runs[:, 2]
            out[str(clients)][name] = {"mean_cost_mean": float(mean_cost.mean()),
                                       "mean_cost_max": float(mean_cost.max()),
                                       "gap_recovered_mean": float((accuracy.mean() - small_accuracy) / gap),
                                       "ceiling_held": bool((mean_cost <= ceiling + 1e-9).all())}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300, help="random orders of each test set")
    parser.add_argument("--load-draws", type=int, default=LOAD_DRAWS, help="random streams per load level")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = time.time()
    pooled = np.load(POOLED)
    thresholds, caps, budgets = pooled["thresholds"], pooled["caps"], [float(b) for b in pooled["budgets"]]
    candidates = [("resolve", float(t), float(c)) for t, c in zip(thresholds, caps, strict=True)]
    cal_costs, cal_agreement = pooled["costs"][:N_CAL], pooled["agreement"][:N_CAL]
    sets = {"test": {"costs": pooled["costs"][N_CAL:], "correct": pooled["correct"][N_CAL:],
                     "small": pooled["small_correct"][N_CAL:], "large": pooled["large_correct"][N_CAL:]}}
    # The independent problems: the same columns swept (the same gate fitted the same way).
    runner = cascade.embedded_cascade(cascade.ConfidenceGate(0.5, signal="mean_prob"))
    gate = fit_budget_gate(runner, problems_of("train", N_FIT))
    independent = problems_of("independent", N_TEST)
    swept = sweep_curve(runner, independent, candidates, gate)
    small_runs = runner.solve_many(independent, gates=[cascade.AlwaysSmall()])
    sets["independent"] = {
        "costs": swept.costs,
        "correct": np.array([[check_answer(p, a) for a in row] for p, row in zip(independent, swept.answers,
                                                                                 strict=True)]),
        "small": np.array([check_answer(p, r.answer) for p, r in zip(independent, small_runs, strict=True)]),
        "large": np.array([check_answer(p, a)
                           for p, a in zip(independent, swept.reference_answers, strict=True)])}
    objective = cal_agreement.mean(axis=0)  # label-free, as calibrate_budget_curve chooses
    result = {"command": " ".join(["python runs/pacing_probe.py", *(sys.argv[1:] if argv is None else argv)]),
              "commit": package_commit(), "pair": ["embedded:small", "embedded:large"],
              "gate": "ConfidenceGate(signal='mean_prob', mode='resolve')", "cap_factor": CAP_FACTOR,
              "n_calibration": N_CAL, "orders": args.orders, "steps": list(STEPS),
              "load": {"clients": list(CLIENTS), "passes": PASSES, "draws": args.load_draws,
                       "durations": "each request runs for as long as it costs (cost units as time)"},
              "sets": {}}
    rng = np.random.default_rng(0)
    load_rng = np.random.default_rng(1)  # its own draws: the random-order rows stay those of earlier runs
    certified_at: dict[float, int] = {}  # budget -> the column certified on the calibration problems
    for name, data in sets.items():
        costs, correct, small, large = data["costs"], data["correct"], data["small"], data["large"]
        gap = large.mean() - small.mean()
        rows = []
        for b in budgets:
            columns = np.array([j for j, (_, _, c) in enumerate(candidates) if c == CAP_FACTOR * b])
            try:
                certified, _ = select_on_curve(cal_costs, candidates, objective, "resolve", b, 0.1, 0.05,
                                               CAP_FACTOR, float("inf"))
            except cal.CalibrationError:
                rows.append({"budget": b, "certified": None})
                continue
            certified_at[b] = certified
            start = int(np.flatnonzero(columns == certified)[0])
            row = {"budget": b, "certified": {
                "threshold": candidates[certified][1], "mean_cost": float(costs[:, certified].mean()),
                "gap_recovered": float((correct[:, certified].mean() - small.mean()) / gap)}, "paced": {}}
            orders = [np.arange(len(costs))] + [rng.permutation(len(costs)) for _ in range(args.orders)]
            for step in STEPS:
                runs = np.array([replay(costs, correct, columns, b, step, start, o) for o in orders])
                mean_cost, accuracy, ceiling = runs[:, 0], runs[:, 1], runs[:, 2]
                gaps = (accuracy - small.mean()) / gap
                row["paced"][str(step)] = {
                    "in_order": {"mean_cost": float(mean_cost[0]), "gap_recovered": float(gaps[0]),
                                 "ceiling": float(ceiling[0])},
                    "random_orders": {"mean_cost_mean": float(mean_cost[1:].mean()),
                                      "mean_cost_max": float(mean_cost[1:].max()),
                                      "gap_recovered_mean": float(gaps[1:].mean()),
                                      "gap_recovered_5_95": [float(q)
                                                             for q in np.percentile(gaps[1:], [5, 95])],
                                      "ceiling_max": float(ceiling[1:].max()),
                                      "ceiling_held": bool((mean_cost <= ceiling + 1e-9).all())}}
            row["load"] = load_replays(costs, correct, columns, b, start, load_rng, args.load_draws,
                                       float(small.mean()), gap)
            rows.append(row)
        result["sets"][name] = {"n": len(costs), "small_accuracy": float(small.mean()),
                                "large_accuracy": float(large.mean()), "rows": rows}
    # One budget through the runtime: the PacedPolicy serving the test problems in order gives
    # the replay's costs and answers (the replay reads the same columns the runtime runs).
    b = budgets[3]
    columns = [j for j, (_, _, c) in enumerate(candidates) if c == CAP_FACTOR * b]
    start = columns.index(certified_at[b])
    curve = BudgetCurve(gate=gate, budgets=tuple(budgets), cap_factor=CAP_FACTOR, alpha=0.1, delta=0.05,
                        candidates=tuple(candidates), points=(), swept=None, cost_max_uncapped=float("inf"))
    paced = PacedPolicy(curve, "resolve", b, columns, DEFAULT_STEP, start)
    test_problems = problems_of("test", N_TEST)
    chosen, _ = cal.replay_pacer(sets["test"]["costs"][:, columns], b, step=DEFAULT_STEP, start=float(start))
    for i, problem in enumerate(test_problems):
        j = paced.column
        assert j == columns[chosen[i]]
        gates, cap = paced.policy()
        run = runner.solve(problem, cap, gates=gates)
        assert run.cost.total <= cap + 1e-9  # the hard cap, on every request
        assert abs(run.cost.total - sets["test"]["costs"][i, j]) < 1e-6, (i, j)
        assert check_answer(problem, run.answer) == bool(sets["test"]["correct"][i, j]), (i, j)
        paced.observe(run)
    result["runtime_check"] = {"budget": b, "step": DEFAULT_STEP, "problems": len(test_problems),
                               "mean_cost": paced.mean_cost, "ceiling": paced.bound(),
                               "matches_replay": True}
    result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "independent.npz", **sets["independent"])  # replays need no re-sweep
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Online budget pacing of the certified re-solve, embedded pair "
          "(`embedded:small` -> `embedded:large`)",
          "", f"Command: `{result['command']}` at `{result['commit'][:7]}`. Hard cap {CAP_FACTOR:g} x B on "
          f"every request; start: the threshold certified on {N_CAL} unlabeled calibration problems "
          f"(E[cost] <= B by conformal risk control); step {DEFAULT_STEP:g} settings per B of over- or "
          "underspend.", ""]
    for name, data in result["sets"].items():
        md += [f"## {name} ({data['n']} problems): small alone {data['small_accuracy']:.3f}, large alone "
               f"{data['large_accuracy']:.3f}", "",
               "| budget B | certified, static: mean cost, gap recovered | paced, in order: mean cost "
               f"(ceiling), gap recovered | paced, {args.orders} random orders: mean cost (max), "
               "gap recovered mean (5-95 %) |",
               "|---|---|---|---|"]
        for row in data["rows"]:
            if row["certified"] is None:
                md.append(f"| {row['budget']:.1f} | none certified | - | - |")
                continue
            c, p = row["certified"], row["paced"][str(DEFAULT_STEP)]
            o, r = p["in_order"], p["random_orders"]
            low, high = r["gap_recovered_5_95"]
            md.append(f"| {row['budget']:.1f} | {c['mean_cost']:.1f}, {c['gap_recovered']:.2f} | "
                      f"{o['mean_cost']:.1f} ({o['ceiling']:.1f}), {o['gap_recovered']:.2f} | "
                      f"{r['mean_cost_mean']:.1f} ({r['mean_cost_max']:.1f}), {r['gap_recovered_mean']:.2f} "
                      f"({low:.2f}-{high:.2f}) |")
        md.append("")
        heads = " | ".join(f"{c} client{'s' if c > 1 else ''}: finished / running" for c in CLIENTS)
        md += [f"Served under load ({PASSES} passes in random order, {args.load_draws} streams; mean cost "
               "(max over streams), gap recovered; the pacer that hears only of finished requests / the "
               "one that counts the running ones):", "", f"| budget B | {heads} |",
               "|---|" + "---|" * len(CLIENTS)]
        for row in data["rows"]:
            if row["certified"] is None:
                continue
            cells = []
            for c in CLIENTS:
                level = row["load"][str(c)]
                cells.append(" / ".join(f"{v['mean_cost_mean']:.1f} ({v['mean_cost_max']:.1f}), "
                                        f"{v['gap_recovered_mean']:.2f}"
                                        for v in (level["finished"], level["running"])))
            md.append(f"| {row['budget']:.1f} | " + " | ".join(cells) + " |")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
