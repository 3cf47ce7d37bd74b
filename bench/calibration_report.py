"""Does label-free calibration keep its promise on the embedded pair?

    python -m bench.calibration_report --n-cal 400 --n-test 400 --out bench/results/calibration

1. Sweeps the embedded pair's confidence-gated cascade over a threshold grid on the
   calibration split (answers unused) and on the test split (answers used only to
   report accuracy), with the memoized tree sweep; saves both sweeps (`sweeps.npz`:
   real per-problem cost curves that the test suite re-uses).
2. For budgets at 5 points between small-only and large-only mean cost, calibrates on
   the calibration sweep (Learn-then-Test, label-free agreement objective) and reports,
   on the test split: the violation rate P(cost > B), accuracy and mean cost of the
   chosen threshold, against the oracle: the best threshold chosen *with test labels*
   among those whose test violation rate is <= alpha.
3. Reports the sweep's work against independent runs of every threshold.
Writes report.json, report.md and plots (PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.provenance import package_commit
from bench.tasks import check_answer, generate_split
from cascade import ConfidenceGate, calibrate, embedded_cascade, sweep
from cascade.calibrate import default_thresholds

__all__ = ["main"]


def _sweep_arrays(swept, problems) -> dict[str, np.ndarray]:
    correct = np.array([[check_answer(p, a) for a in row]
                        for p, row in zip(problems, swept.answers, strict=False)])
    reference_correct = np.array([check_answer(p, a)
                                  for p, a in zip(problems, swept.reference_answers, strict=False)])
    return {"costs": swept.costs, "escalation": swept.escalation, "agreement": swept.agreement,
            "correct": correct, "reference_correct": reference_correct}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cal", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--signal", default="min_prob")
    parser.add_argument("--out", default="bench/results/calibration")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runner = embedded_cascade(ConfidenceGate(threshold=0.5, signal=args.signal))
    grid = sorted(default_thresholds(21), reverse=True)  # cheapest (highest threshold) first
    candidates = [(t,) for t in grid]
    data = {}
    stats = {}
    for split, n in (("calibration", args.n_cal), ("test", args.n_test)):
        problems = [p.problem for p in generate_split(split, n)]
        started = time.perf_counter()
        swept = sweep(runner, problems, candidates,
                      progress=lambda d, t, s=split: print(f"\r{s}: {d}/{t}", end="", flush=True))
        print()
        stats[split] = {"seconds": time.perf_counter() - started, "executed_tokens": swept.executed_tokens,
                        "independent_tokens": swept.independent_tokens,
                        "one_run_tokens_mean": swept.independent_tokens / len(candidates)}
        data[split] = (swept, problems, _sweep_arrays(swept, problems))
    np.savez_compressed(out / "sweeps.npz", thresholds=np.array(grid),
                        **{f"{s}_{k}": v for s, (_, _, arrays) in data.items() for k, v in arrays.items()})

    cal_swept, cal_problems, _ = data["calibration"]
    _, _, test = data["test"]
    small_cost = float(cal_swept.costs[:, 0].mean())  # threshold 1.0: the small model alone
    large_cost = float(np.mean(cal_swept.reference_costs))  # the top tier alone
    # Budgets between the two extremes' (1 - alpha) cost quantiles: the range where the
    # choice of threshold decides whether P(cost > B) <= alpha can hold.
    low = float(np.quantile(cal_swept.costs[:, 0], 1 - args.alpha))
    high = float(np.quantile(cal_swept.reference_costs, 1 - args.alpha))
    budgets = [float(b) for b in np.round(np.linspace(low, high, 7)[1:-1], 1)]
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        try:
            result = calibrate(runner, cal_problems, budget=budget, alpha=args.alpha, delta=args.delta,
                               method="ltt", candidates=candidates, swept=cal_swept)
            j = result.entries[0]["index"]
            row.update(threshold=grid[j], test_violation=float((test["costs"][:, j] > budget).mean()),
                       test_accuracy=float(test["correct"][:, j].mean()),
                       test_mean_cost=float(test["costs"][:, j].mean()),
                       test_escalation=float(test["escalation"][:, j].mean()))
        except Exception as error:  # noqa: BLE001 - an infeasible budget is a row, not a crash
            row.update(threshold=None, reason=str(error))
        feasible = [k for k in range(len(grid)) if (test["costs"][:, k] > budget).mean() <= args.alpha]
        if feasible:
            best = max(feasible, key=lambda k: (test["correct"][:, k].mean(), -k))
            row.update(oracle_threshold=grid[best], oracle_accuracy=float(test["correct"][:, best].mean()),
                       oracle_mean_cost=float(test["costs"][:, best].mean()),
                       oracle_violation=float((test["costs"][:, best] > budget).mean()))
        rows.append(row)
    report = {
        "command": "python -m bench.calibration_report " + " ".join(argv or []),
        "commit": package_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "alpha": args.alpha, "delta": args.delta, "n_cal": args.n_cal, "n_test": args.n_test,
        "grid": grid, "small_only_mean_cost": small_cost, "large_only_mean_cost": large_cost,
        "large_only_test_accuracy": float(test["reference_correct"].mean()),
        "sweep": stats, "budgets": rows,
        "curves_test": {"accuracy": test["correct"].mean(axis=0).tolist(),
                        "mean_cost": test["costs"].mean(axis=0).tolist(),
                        "escalation": test["escalation"].mean(axis=0).tolist()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report) + "\n")
    _plot(report, out)
    print(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    s = report["sweep"]["calibration"]
    lines = [
        f"# Calibration on the embedded pair (alpha={report['alpha']}, delta={report['delta']}, "
        f"LTT, {report['n_cal']} unlabeled calibration problems, {report['n_test']} test problems)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`, {report['date']}",
        "",
        "Budgets: 5 points between the small-only and large-only (1 - alpha) cost quantiles.  ",
        f"Small-only mean cost {report['small_only_mean_cost']:.1f}, large-only "
        f"{report['large_only_mean_cost']:.1f}; large-only test accuracy "
        f"{report['large_only_test_accuracy']:.3f}.",
        "",
        "| budget | chosen threshold | test P(cost > B) | test accuracy | test mean cost | escalation | "
        "oracle threshold (labels) | oracle accuracy | oracle mean cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["budgets"]:
        if row.get("threshold") is None:
            lines.append(f"| {row['budget']:g} | infeasible: {row.get('reason', '')[:80]} | | | | | | | |")
            continue
        oracle = (f"{row['oracle_threshold']:g} | {row['oracle_accuracy']:.3f} | "
                  f"{row['oracle_mean_cost']:.1f}"
                  if "oracle_threshold" in row else "none | | ")
        lines.append(f"| {row['budget']:g} | {row['threshold']:g} | {row['test_violation']:.3f} | "
                     f"{row['test_accuracy']:.3f} | {row['test_mean_cost']:.1f} | "
                     f"{row['test_escalation']:.3f} | "
                     f"{oracle} |")
    lines += ["", f"Sweep of {len(report['grid'])} thresholds on the calibration split: "
              f"{s['executed_tokens']} tokens run vs {s['independent_tokens']} for independent runs "
              f"({s['executed_tokens'] / s['one_run_tokens_mean']:.2f}x one run, "
              f"{s['independent_tokens'] / s['executed_tokens']:.1f}x less than independent runs), "
              f"{s['seconds']:.0f} s."]
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["budgets"] if r.get("threshold") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    budgets = [r["budget"] for r in rows]
    axes[0].plot(budgets, [r["test_violation"] for r in rows], "o-", label="calibrated (LTT)")
    axes[0].plot(budgets, [r.get("oracle_violation", np.nan) for r in rows], "s--", label="oracle (labels)")
    axes[0].axhline(report["alpha"], color="red", linestyle=":", label="alpha")
    axes[0].set(xlabel="budget (large-token equivalents)", ylabel="test P(cost > budget)",
                title="Budget violations")
    axes[0].legend()
    axes[1].plot(budgets, [r["test_accuracy"] for r in rows], "o-", label="calibrated (LTT)")
    axes[1].plot(budgets, [r.get("oracle_accuracy", np.nan) for r in rows], "s--", label="oracle (labels)")
    axes[1].axhline(report["large_only_test_accuracy"], color="gray", linestyle=":", label="large only")
    axes[1].set(xlabel="budget (large-token equivalents)", ylabel="test accuracy", title="Accuracy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
