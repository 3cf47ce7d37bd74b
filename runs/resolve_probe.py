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
curve's reports, for comparison. Every re-solve column is also swept on the test problems,
for the bars a label-free choice is measured against (the labelled choice on the calibration
problems under the same guarantee and with no margin; the oracle with test labels), and the
family is certified again on `--splits` random calibration/test splits of the pooled
calibration and test-split problems (mean test cost against B, gap recovered).

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

import calibration as cal
import cascade
from bench.budget_curve import best_within_budget
from bench.independent_task import generate_independent
from bench.provenance import package_commit
from bench.tasks import check_answer, generate_split
from cascade.budget import calibrate_budget_curve, fit_budget_gate, select_on_curve, sweep_curve

OUT = Path("bench/results/resolve_probe")
SWEEPS = Path("bench/results/budget_curve/sweeps.npz")
CURVES = {"test": Path("bench/results/budget_curve/report.json"),
          "independent": Path("bench/results/budget_curve/report_independent.json")}
N_CAL, N_TEST, N_FIT = 120, 150, 100


def problems_of(split: str, n: int) -> list[str]:
    chosen = generate_independent(n) if split == "independent" else generate_split(split, n)
    return [p.problem for p in chosen]


def random_splits(pooled, candidates, budgets, cap_factor: float, curve, n_splits: int, n_cal: int,
                  seed: int = 0) -> list[dict]:
    """Certify the resolve family on `n_splits` random calibration sets of `n_cal` rows drawn from
    the pooled rows (costs (n, K), correct (n, K), agreement with the top tier (n, K), small-only
    and large-only correct (n,)) and measure the certified column on the rest: per budget, the mean test cost (the promise is
    E[cost] <= B over the draw), the mean gap recovered and its 5-95 % range."""
    costs, correct, agreement, small, large = pooled
    rng = np.random.default_rng(seed)
    out = {b: {"test_cost": [], "gap": [], "abstained": 0} for b in budgets}
    for _ in range(n_splits):
        order = rng.permutation(len(costs))
        cal_rows, test_rows = order[:n_cal], order[n_cal:]
        objective = agreement[cal_rows].mean(axis=0)  # label-free, as in calibrate_budget_curve
        gap = large[test_rows].mean() - small[test_rows].mean()
        for b in budgets:
            try:
                j, _ = select_on_curve(costs[cal_rows], candidates, objective, "resolve", b, curve.alpha,
                                       curve.delta, cap_factor, curve.cost_max_uncapped)
            except cal.CalibrationError:
                out[b]["abstained"] += 1
                continue
            out[b]["test_cost"].append(float(costs[test_rows, j].mean()))
            out[b]["gap"].append(float((correct[test_rows, j].mean() - small[test_rows].mean()) / gap))
    return [{"budget": b, "splits": n_splits, "abstained": v["abstained"],
             "mean_test_cost": float(np.mean(v["test_cost"])) if v["test_cost"] else None,
             "mean_gap_recovered": float(np.mean(v["gap"])) if v["gap"] else None,
             "gap_recovered_5_95": [float(q) for q in np.percentile(v["gap"], [5, 95])] if v["gap"] else None}
            for b, v in out.items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-factor", type=float, default=3.0, help="hard cap = this x B (default 3)")
    parser.add_argument("--signal", default="mean_prob", choices=cascade.gates.SIGNALS,
                        help="the confidence signal the resolve gate reads (default mean_prob)")
    parser.add_argument("--splits", type=int, default=300, help="random calibration/test splits (default 300)")
    parser.add_argument("--n-calibration", type=int, default=N_CAL,
                        help=f"unlabeled calibration problems (default {N_CAL}); the random splits use as many")
    parser.add_argument("--split-sizes", default="",
                        help="also certify on random splits with these calibration sizes (comma-separated), "
                             "on the same pooled problems: what more unlabeled problems buy")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    cap_factor, out, n_cal = args.cap_factor, Path(args.out), args.n_calibration
    started = time.time()
    budgets = [float(b) for b in np.load(SWEEPS)["budgets"]]
    runner = cascade.embedded_cascade(cascade.ConfidenceGate(0.5, signal=args.signal))
    # Label-free throughout: the gate's score quantiles from the small model alone on train
    # problems, the threshold grid from them, the certificate from unlabeled calibration problems.
    gate = fit_budget_gate(runner, problems_of("train", N_FIT))
    calibration_problems = problems_of("calibration", n_cal)
    curve = calibrate_budget_curve(runner, calibration_problems, budgets=budgets, methods=("resolve",),
                                   cap_factor=cap_factor, gate=gate)
    command = " ".join(["python runs/resolve_probe.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "commit": package_commit(),
              "pair": ["embedded:small", "embedded:large"], "gate": f"ConfidenceGate(signal='{args.signal}', "
              "mode='resolve')", "cap_factor": cap_factor, "n_calibration": n_cal, "n_test": N_TEST,
              "sweep_tokens_vs_independent": curve.swept.executed_tokens / max(1, curve.swept.independent_tokens),
              "splits": {}}
    candidates, swept = curve.candidates, curve.swept
    cal_correct = np.array([[check_answer(p, a) for a in row]
                            for p, row in zip(calibration_problems, swept.answers, strict=True)])
    cal_accuracy, cal_mean = cal_correct.mean(axis=0), swept.costs.mean(axis=0)
    for split, curve_path in CURVES.items():
        examples = problems_of(split, N_TEST)
        # Every column of the curve on the test problems (a sweep: the arrays of independent
        # runs), for the bars a label-free choice is measured against: what a user with the
        # calibration problems' answers would certify, and the oracle that sees the test labels.
        test_swept = sweep_curve(runner, examples, candidates, gate)
        test_correct = np.array([[check_answer(p, a) for a in row]
                                 for p, row in zip(examples, test_swept.answers, strict=True)])
        test_accuracy, test_mean = test_correct.mean(axis=0), test_swept.costs.mean(axis=0)
        small = runner.solve_many(examples, gates=[cascade.AlwaysSmall()])
        small_correct = [check_answer(p, r.answer) for p, r in zip(examples, small, strict=True)]
        # Large alone is the sweep's reference run (uncapped, the top tier at every step).
        large_correct = [check_answer(p, a) for p, a in zip(examples, test_swept.reference_answers, strict=True)]
        small_acc, large_acc = float(np.mean(small_correct)), float(np.mean(large_correct))
        large_cost = float(np.mean(test_swept.reference_costs))
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
                # The runtime's run and the sweep's column are the same policy on the same problems.
                assert abs(test_accuracy[point.index] - accuracy) < 1e-9, (budget, test_accuracy[point.index])
            else:
                row["reason"] = point.reason
            cap = cap_factor * budget
            family = [j for j, (f, _, c) in enumerate(candidates) if f == "resolve" and c == cap]
            bars = {}
            try:
                j, _ = select_on_curve(swept.costs, candidates, cal_accuracy, "resolve", budget, curve.alpha,
                                       curve.delta, cap_factor, curve.cost_max_uncapped)
                bars["labelled_certified"] = j
            except cal.CalibrationError:
                pass
            for name, mean, score in (("labelled_calibration", cal_mean, cal_accuracy),
                                      ("oracle", test_mean, test_accuracy)):
                j = best_within_budget(mean, score, budget, family)
                if j is not None:
                    bars[name] = j
            row["bars"] = {name: {"threshold": candidates[j][1], "test_accuracy": float(test_accuracy[j]),
                                  "gap_recovered": float((test_accuracy[j] - small_acc) / gap),
                                  "test_mean_cost": float(test_mean[j])} for name, j in bars.items()}
            row["budget_aware_step_cascade"] = next(
                (p for p in step_curve["points"] if p["method"] == "budget" and abs(p["budget"] - budget) < 1e-2),
                None)
            rows.append(row)
        result["splits"][split] = {"small_accuracy": small_acc, "large_accuracy": large_acc,
                                   "large_mean_cost": large_cost, "rows": rows}
        if split == "test":
            pooled_test = (test_swept.costs, test_correct, test_swept.agreement, small_correct, large_correct)
    # One calibration/test split can be lucky or unlucky; the same certification over many random
    # splits of the pooled calibration and test-split problems (same size of calibration set)
    # gives the expected figures and checks E[cost] <= B where it is promised: over the draw.
    small_cal = runner.solve_many(calibration_problems, gates=[cascade.AlwaysSmall()])
    pooled = (np.concatenate([swept.costs, pooled_test[0]]), np.concatenate([cal_correct, pooled_test[1]]),
              np.concatenate([swept.agreement, pooled_test[2]]),
              np.array([check_answer(p, r.answer) for p, r in zip(calibration_problems, small_cal, strict=True)]
                       + pooled_test[3]),
              np.array([check_answer(p, a) for p, a in zip(calibration_problems, swept.reference_answers,
                                                             strict=True)] + pooled_test[4]))
    result["random_splits"] = random_splits(pooled, candidates, budgets, cap_factor, curve, args.splits, n_cal)
    sizes = [int(n) for n in args.split_sizes.split(",") if n.strip()]
    result["random_splits_by_calibration_size"] = {
        str(n): random_splits(pooled, candidates, budgets, cap_factor, curve, args.splits, n) for n in sizes}
    result["seconds"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    # The pooled arrays, so that a split analysis can be redone without sweeping again.
    np.savez_compressed(out / "pooled.npz", costs=pooled[0], correct=pooled[1], agreement=pooled[2],
                        small_correct=pooled[3], large_correct=pooled[4], budgets=np.array(budgets),
                        thresholds=np.array([c[1] for c in candidates]),
                        caps=np.array([np.nan if c[2] is None else c[2] for c in candidates]))
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Problem-level re-solve cascade, embedded pair (`embedded:small` -> `embedded:large`)", "",
          f"`{result['gate']}` run by the runtime; threshold certified on "
          f"{n_cal} unlabeled calibration problems by `calibrate_budget_curve(methods=('resolve',))` (conformal "
          f"risk control, E[cost] <= B), every request under the hard cap {cap_factor:g} x B. Command: "
          f"`{result['command']}` at `{result['commit'][:7]}`.", ""]
    for split, data in result["splits"].items():
        md += [f"## {split} ({N_TEST} problems): small alone {data['small_accuracy']:.3f}, large alone "
               f"{data['large_accuracy']:.3f} at mean cost {data['large_mean_cost']:.1f}", "",
               "| budget B (x large-only) | certified t | test accuracy (gap recovered) | test mean cost | "
               "test P(cost > B) | re-solved | cap intervened | budget-aware step cascade, certified: accuracy "
               "(gap) | labelled choice on cal., same guarantee | labelled choice on cal., no margin | oracle "
               "(test labels) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            c, st = row.get("certified"), row["budget_aware_step_cascade"]
            cells = ([f"{c['threshold']:.3f}", f"{c['test_accuracy']:.3f} ({c['gap_recovered']:.2f})",
                      f"{c['test_mean_cost']:.1f}", f"{c['test_p_cost_over_budget']:.3f}", f"{c['resolved']:.2f}",
                      f"{c['cap_intervened']:.2f}"] if c else ["none certified", "-", "-", "-", "-", "-"])
            step = (f"{st['test_accuracy']:.3f} ({st['gap_recovered']:.2f})"
                    if st and st.get("test_accuracy") is not None else "none")
            bars = [f"{b['test_accuracy']:.3f} (t={b['threshold']:.3f})" if (b := row["bars"].get(name)) else "none"
                    for name in ("labelled_certified", "labelled_calibration", "oracle")]
            md.append(f"| {row['budget']:.1f} ({row['budget_x_large']:.2f}x) | " + " | ".join(cells)
                      + f" | {step} | " + " | ".join(bars) + " |")
        md.append("")
    md += [f"## Over {args.splits} random splits of the pooled calibration and test-split problems "
           f"({n_cal} calibration rows each, the rest test)", "",
           "| budget B | abstained | mean test cost (E[cost] <= B?) | gap recovered: mean (5-95 %) |",
           "|---|---|---|---|"]
    for row in result["random_splits"]:
        if row["mean_test_cost"] is None:
            md.append(f"| {row['budget']:.1f} | {row['abstained']} | - | - |")
            continue
        low, high = row["gap_recovered_5_95"]
        md.append(f"| {row['budget']:.1f} | {row['abstained']} | {row['mean_test_cost']:.1f} "
                  f"({'yes' if row['mean_test_cost'] <= row['budget'] else 'NO'}) | "
                  f"{row['mean_gap_recovered']:.2f} ({low:.2f}-{high:.2f}) |")
    md.append("")
    if sizes:
        md += [f"## The same {args.splits} random splits' figures by calibration size (same pooled problems; "
               "mean test cost / B, mean gap recovered)", "",
               "| budget B | " + " | ".join(f"{n} calibration rows" for n in sizes) + " |",
               "|---|" + "---|" * len(sizes)]
        for i, budget in enumerate(budgets):
            cells = []
            for n in sizes:
                row = result["random_splits_by_calibration_size"][str(n)][i]
                cells.append("abstained" if row["mean_test_cost"] is None else
                             f"{row['mean_test_cost']:.1f} / {budget:.1f}, {row['mean_gap_recovered']:.2f}")
            md.append(f"| {budget:.1f} | " + " | ".join(cells) + " |")
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
