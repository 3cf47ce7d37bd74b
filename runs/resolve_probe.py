"""Issue 19: the problem-level re-solve cascade on the embedded pair (`embedded:small` ->
`embedded:large`), run through the runtime and certified by the library.

The gate is `ConfidenceGate(signal="mean_prob", mode="resolve")`: the small model solves; at
the first step whose mean token probability is low enough, the large model solves the
problem again from the start and its answer stands (the small model's steps are set aside,
their cost paid). For each budget B of the accuracy-budget curve
(`bench/results/budget_curve/sweeps.npz`: same budgets, same calibration and test problems),
`cascade.budget.calibrate_budget_curve(..., methods=("resolve",))` certifies the threshold on
the 120 unlabeled calibration problems by conformal risk control (E[cost] <= B) with every
request under the hard cap 3 x B; the certified policy then runs on 150 test-split problems
and 150 problems of the independent generator (`bench.independent_task`), under that cap.
The budget-aware step cascade's certified accuracy at the same budgets comes from the
curve's reports, for comparison.

    python runs/resolve_probe.py   # writes bench/results/resolve_probe/report.{json,md,png}
    python runs/resolve_probe.py --cap-factor 6 --out bench/results/resolve_probe_cap6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cascade
from bench.independent_task import generate_independent
from bench.provenance import package_commit
from bench.tasks import check_answer, generate_split
from cascade.budget import calibrate_budget_curve, fit_budget_gate

OUT = Path("bench/results/resolve_probe")
SWEEPS = Path("bench/results/budget_curve/sweeps.npz")
CURVES = {"test": Path("bench/results/budget_curve/report.json"),
          "independent": Path("bench/results/budget_curve/report_independent.json")}
N_CAL, N_TEST, N_FIT = 120, 150, 100


def problems_of(split: str, n: int) -> list[str]:
    chosen = generate_independent(n) if split == "independent" else generate_split(split, n)
    return [p.problem for p in chosen]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-factor", type=float, default=3.0, help="hard cap = this x B (default 3)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    cap_factor, out = args.cap_factor, Path(args.out)
    started = time.time()
    budgets = [float(b) for b in np.load(SWEEPS)["budgets"]]
    runner = cascade.embedded_cascade(cascade.ConfidenceGate(0.5, signal="mean_prob"))
    # Label-free throughout: the gate's score quantiles from the small model alone on train
    # problems, the threshold grid from them, the certificate from unlabeled calibration problems.
    gate = fit_budget_gate(runner, problems_of("train", N_FIT))
    calibration_problems = problems_of("calibration", N_CAL)
    curve = calibrate_budget_curve(runner, calibration_problems, budgets=budgets, methods=("resolve",),
                                   cap_factor=cap_factor, gate=gate)
    command = " ".join(["python runs/resolve_probe.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "commit": package_commit(),
              "pair": ["embedded:small", "embedded:large"], "gate": "ConfidenceGate(signal='mean_prob', "
              "mode='resolve')", "cap_factor": cap_factor, "n_calibration": N_CAL, "n_test": N_TEST,
              "sweep_tokens_vs_independent": curve.swept.executed_tokens / max(1, curve.swept.independent_tokens),
              "splits": {}}
    for split, curve_path in CURVES.items():
        examples = problems_of(split, N_TEST)
        small = runner.solve_many(examples, gates=[cascade.AlwaysSmall()])
        large = runner.solve_many(examples, gates=[cascade.AlwaysLarge()])
        small_acc = float(np.mean([check_answer(p, r.answer) for p, r in zip(examples, small, strict=True)]))
        large_acc = float(np.mean([check_answer(p, r.answer) for p, r in zip(examples, large, strict=True)]))
        large_cost = float(np.mean([r.cost.total for r in large]))
        gap = large_acc - small_acc
        step_curve = json.loads(curve_path.read_text())
        rows = []
        for budget in budgets:
            point = curve.point("resolve", budget)
            row = {"budget": budget, "budget_x_large": budget / large_cost}
            if point.index is not None:
                gates, cap = curve.policy("resolve", budget)
                runs = runner.solve_many(examples, cap, gates=gates)
                costs = np.array([r.cost.total for r in runs])
                accuracy = float(np.mean([check_answer(p, r.answer) for p, r in zip(examples, runs, strict=True)]))
                assert costs.max() <= cap + 1e-9  # the hard cap, on every request
                row["certified"] = {
                    "threshold": point.threshold, "cap": cap, "calibration_agreement": point.agreement,
                    "calibration_mean_cost": point.mean_cost, "test_accuracy": accuracy,
                    "gap_recovered": (accuracy - small_acc) / gap, "test_mean_cost": float(costs.mean()),
                    "test_p_cost_over_budget": float((costs > budget).mean()),
                    "resolved": float(np.mean([r.resolved for r in runs])),
                    "cap_intervened": float(np.mean([r.cap_intervened for r in runs]))}
            else:
                row["reason"] = point.reason
            row["budget_aware_step_cascade"] = next(
                (p for p in step_curve["points"] if p["method"] == "budget" and abs(p["budget"] - budget) < 1e-2),
                None)
            rows.append(row)
        result["splits"][split] = {"small_accuracy": small_acc, "large_accuracy": large_acc,
                                   "large_mean_cost": large_cost, "rows": rows}
    result["seconds"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Problem-level re-solve cascade, embedded pair (`embedded:small` -> `embedded:large`)", "",
          f"`ConfidenceGate(signal='mean_prob', mode='resolve')` run by the runtime; threshold certified on "
          f"{N_CAL} unlabeled calibration problems by `calibrate_budget_curve(methods=('resolve',))` (conformal "
          f"risk control, E[cost] <= B), every request under the hard cap {cap_factor:g} x B. Command: "
          f"`{result['command']}` at `{result['commit'][:7]}`.", ""]
    for split, data in result["splits"].items():
        md += [f"## {split} ({N_TEST} problems): small alone {data['small_accuracy']:.3f}, large alone "
               f"{data['large_accuracy']:.3f} at mean cost {data['large_mean_cost']:.1f}", "",
               "| budget B (x large-only) | certified t | test accuracy (gap recovered) | test mean cost | "
               "test P(cost > B) | re-solved | cap intervened | budget-aware step cascade, certified: accuracy "
               "(gap) |", "|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            c, st = row.get("certified"), row["budget_aware_step_cascade"]
            cells = ([f"{c['threshold']:.3f}", f"{c['test_accuracy']:.3f} ({c['gap_recovered']:.2f})",
                      f"{c['test_mean_cost']:.1f}", f"{c['test_p_cost_over_budget']:.3f}", f"{c['resolved']:.2f}",
                      f"{c['cap_intervened']:.2f}"] if c else ["none certified", "-", "-", "-", "-", "-"])
            step = (f"{st['test_accuracy']:.3f} ({st['gap_recovered']:.2f})"
                    if st and st.get("test_accuracy") is not None else "none")
            md.append(f"| {row['budget']:.1f} ({row['budget_x_large']:.2f}x) | " + " | ".join(cells) + f" | {step} |")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(result["splits"]), figsize=(11, 4), sharey=True)
    for ax, (split, data) in zip(np.atleast_1d(axes), result["splits"].items(), strict=True):
        rows = data["rows"]
        certified = [r for r in rows if r.get("certified")]
        ax.plot([r["budget_x_large"] for r in certified], [r["certified"]["test_accuracy"] for r in certified],
                "o-", label="re-solve, certified")
        steps = [r for r in rows if r["budget_aware_step_cascade"]
                 and r["budget_aware_step_cascade"].get("test_accuracy") is not None]
        ax.plot([r["budget_x_large"] for r in steps],
                [r["budget_aware_step_cascade"]["test_accuracy"] for r in steps], "s--",
                label="budget-aware step cascade, certified")
        gap = data["large_accuracy"] - data["small_accuracy"]
        ax.axhline(data["small_accuracy"], color="gray", lw=0.8)
        ax.axhline(data["small_accuracy"] + 0.6 * gap, color="red", lw=0.8, ls=":", label="60 % of the gap")
        ax.axvline(0.5, color="red", lw=0.8, ls=":")
        ax.set_xlabel("budget B / large-only mean cost")
        ax.set_title(f"embedded pair, {split}")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
