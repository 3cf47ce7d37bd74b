"""The accuracy-budget curve measured on labelled problems: every calibration method's
certified policy at every budget, side by side, with the label-using oracle as the upper line.

    cascade calibrate --curve --problems unlabeled.jsonl ... -o curve.json   # label-free
    cascade bench --curve curve.json --dataset gsm8k --limit 200 ... -o runs/curve

The curve file (`cascade.budget.load_budget_curve`) holds, per method and budget, the
policy certified on unlabeled problems. Here every column of the curve (each family's
thresholds, under their caps) is swept once on the test problems (`cascade.budget.sweep_curve`:
the arrays of independent runs at a fraction of their cost), and read off for

- each certified point: test accuracy, gap recovered between small alone and large alone,
  mean cost, P(cost > B), how often the hard cap intervened;
- the oracle at each budget: the column with the best test accuracy among those whose test
  mean cost is <= B, chosen with the test labels (no method can see them: the upper line);
- each capped family paced online (`BudgetCurve.paced`, what `cascade serve --pace B` serves):
  the test problems served in order by a pacer starting at the certified threshold, its
  accuracy, mean cost and the ceiling it guarantees on that mean.

Writes curve.json, curve.md and budget_curve.png into the output directory; the sweep's rows
go to curve.sweep.budget.jsonl and curve.sweep.resolve.jsonl there as problems finish, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import calibration as cal
from bench.budget_curve import best_within_budget, plot
from bench.datasets import Example
from bench.grading import Grader
from bench.provenance import package_commit
from cascade.budget import BudgetCurve, sweep_curve
from cascade.errors import ConfigError
from cascade.gates import AlwaysSmall
from cascade.runtime import Cascade

__all__ = ["evaluate_curve", "write_curve_report", "CURVE_JSON", "CURVE_MD", "CURVE_PNG", "CURVE_SWEEP"]

CURVE_JSON, CURVE_MD, CURVE_PNG = "curve.json", "curve.md", "budget_curve.png"
CURVE_SWEEP = "curve.sweep"  # prefix of the resumable sweep rows in the output directory


def evaluate_curve(runner: Cascade, examples: Sequence[Example], curve: BudgetCurve, *,
                   grader: Grader, pair: str, command: str = "",
                   progress: Callable[[int, int], None] | None = None,
                   checkpoint: str | Path | None = None) -> dict:
    """Every certified point of `curve` and the oracle, measured on labelled `examples`.

    checkpoint: a path prefix for the sweep's rows (`<prefix>.<family>.jsonl`, appended as
    problems finish); a rerun with the same curve, models and problems resumes from them."""
    examples = list(examples)
    if not examples:
        raise ConfigError("the curve benchmark needs at least one problem")
    unlabelled = [e.id for e in examples if e.answer is None]
    if unlabelled:
        raise ConfigError(f"the curve benchmark grades answers; {len(unlabelled)} problems have none "
                          f"(first: {unlabelled[0]})")
    started = time.perf_counter()
    problems = [e.problem for e in examples]
    swept = sweep_curve(runner, problems, curve.candidates, curve.gate, progress=progress,
                        checkpoint=checkpoint)

    small = runner.solve_many(problems, gates=[AlwaysSmall()])
    # Columns mostly repeat each other's answers: each distinct (problem, answer) is graded
    # once (math-verify starts a worker per batch and is slow per item).
    rows = [(*row, reference, s.answer)
            for row, reference, s in zip(swept.answers, swept.reference_answers, small, strict=True)]
    distinct = list(dict.fromkeys((i, a) for i, row in enumerate(rows) for a in row))
    verdicts = grader.grade_many([(a, examples[i].answer, examples[i].kind) for i, a in distinct])
    grade = dict(zip(distinct, verdicts, strict=True))
    table = np.array([[grade[(i, a)] for a in row] for i, row in enumerate(rows)])
    correct, large_correct, small_correct = table[:, :-2], table[:, -2], table[:, -1]
    costs = swept.costs
    small_accuracy = float(small_correct.mean())
    large_accuracy = float(large_correct.mean())
    gap = large_accuracy - small_accuracy
    points = []
    for p in curve.points:
        row = {"method": p.method, "budget": p.budget, "index": p.index, "cap": p.cap,
               "threshold": p.threshold, "expected_agreement": p.agreement,
               "calibration_mean_cost": p.mean_cost, "statement": p.statement, "reason": p.reason}
        if p.index is not None:
            j = p.index
            accuracy = float(correct[:, j].mean())
            row.update(test_accuracy=accuracy, test_mean_cost=float(costs[:, j].mean()),
                       test_tail=float((costs[:, j] > p.budget).mean()),
                       test_cap_intervened=float(swept.cap_intervened[:, j].mean()),
                       gap_recovered=(accuracy - small_accuracy) / gap if gap > 0 else None)
        points.append(row)
    oracle = []
    mean_cost, accuracy = costs.mean(axis=0), correct.mean(axis=0)
    for b in curve.budgets:
        j = best_within_budget(mean_cost, accuracy, b)
        entry: dict = {"budget": b}
        if j is not None:
            family, threshold, cap = curve.candidates[j]
            entry["oracle"] = {"index": j, "family": family, "threshold": threshold, "cap": cap,
                               "test_accuracy": float(accuracy[j]), "test_mean_cost": float(mean_cost[j])}
        oracle.append(entry)
    paced = []
    served = np.arange(len(problems))
    for method in ("budget", "resolve"):
        if not any(c[0] == method for c in curve.candidates):
            continue
        for b in curve.budgets:
            policy = curve.paced(method, b)
            columns = np.array(policy.columns)
            chosen, pacer = cal.replay_pacer(costs[:, columns], b, step=policy.pacer.step,
                                             start=policy.pacer.start)
            j = columns[chosen]  # the column each test problem ran, in the order they came
            accuracy = float(correct[served, j].mean())
            paced.append({"method": method, "budget": b, "step": policy.pacer.step,
                          "start_threshold": curve.candidates[policy.column][1],
                          "cap": curve.candidates[policy.column][2], "test_accuracy": accuracy,
                          "test_mean_cost": pacer.mean_cost, "ceiling": pacer.bound(),
                          "thresholds_used": sorted({curve.candidates[k][1] for k in j}, reverse=True),
                          "test_cap_intervened": float(swept.cap_intervened[served, j].mean()),
                          "gap_recovered": (accuracy - small_accuracy) / gap if gap > 0 else None})
    return {"command": command, "commit": package_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pair": pair, "n_test": len(examples), "n_calibration": curve.n_problems,
            "budgets": list(curve.budgets), "cap_factor": curve.cap_factor, "alpha": curve.alpha,
            "delta": curve.delta, "gate": {"inner": repr(curve.gate.inner)},
            "test_small_accuracy": small_accuracy, "test_large_accuracy": large_accuracy,
            "test_large_mean_cost": float(np.mean(swept.reference_costs)),
            "points": points, "paced": paced, "oracle": oracle,
            "oracle_label": "oracle: best column of any method with test mean cost <= B (labels)",
            "sweep": {"executed_tokens": swept.executed_tokens,
                      "independent_tokens": swept.independent_tokens, "columns": len(curve.candidates)},
            "seconds": time.perf_counter() - started}


def markdown(report: dict) -> str:
    r = report
    lines = [f"# Accuracy vs budget: {r['pair']}", "",
             f"Certified label-free on {r['n_calibration']} unlabeled problems "
             f"(`cascade calibrate --curve`), measured on {r['n_test']} labelled ones. Small alone "
             f"{r['test_small_accuracy']:.3f}, large alone {r['test_large_accuracy']:.3f} at mean cost "
             f"{r['test_large_mean_cost']:.1f}. Gate score: `{r['gate']['inner']}`; hard cap "
             f"{r['cap_factor']:g} x B for the budget-aware and re-solve policies; alpha={r['alpha']}, "
             f"delta={r['delta']}.", "",
             f"Command: `{r['command']}` at `{r['commit'][:12]}`, {r['date']}.", "",
             "| B | method | chosen (threshold, cap) | expected agreement (cal.) | test accuracy | "
             "gap recovered | test mean cost | test P(cost > B) | cap intervened | oracle (test labels) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    oracle = {o["budget"]: o.get("oracle") for o in report["oracle"]}
    for row in report["points"]:
        best = oracle[row["budget"]]
        best_text = f"{best['test_accuracy']:.3f}" if best else "none"
        if row["index"] is None:
            lines.append(f"| {row['budget']:g} | {row['method']} | none certified | | | | | | | "
                         f"{best_text} |")
            continue
        cap = "no cap" if row["cap"] is None else f"cap {row['cap']:.0f}"
        gap = "-" if row["gap_recovered"] is None else f"{row['gap_recovered']:.2f}"
        lines.append(f"| {row['budget']:g} | {row['method']} | {row['threshold']:g}, {cap} | "
                     f"{row['expected_agreement']:.3f} | {row['test_accuracy']:.3f} | {gap} | "
                     f"{row['test_mean_cost']:.1f} | {row['test_tail']:.3f} | "
                     f"{row['test_cap_intervened']:.3f} | {best_text} |")
    if report.get("paced"):
        lines += ["", "Paced online (`BudgetCurve.paced`, `cascade serve --pace B`): the test problems "
                  "served in order, the threshold moved as each finished, from the certified one; the "
                  "ceiling is the guaranteed bound on the mean cost for that order.", "",
                  "| B | family | start threshold, cap | test accuracy | gap recovered | test mean cost "
                  "(ceiling) | thresholds used | cap intervened |", "|---|---|---|---|---|---|---|---|"]
        for row in report["paced"]:
            gap = "-" if row["gap_recovered"] is None else f"{row['gap_recovered']:.2f}"
            lines.append(f"| {row['budget']:g} | {row['method']} | {row['start_threshold']:g}, cap "
                         f"{row['cap']:.0f} | {row['test_accuracy']:.3f} | {gap} | "
                         f"{row['test_mean_cost']:.1f} ({row['ceiling']:.1f}) | "
                         f"{len(row['thresholds_used'])} | "
                         f"{row['test_cap_intervened']:.3f} |")
    s = report["sweep"]
    lines += ["", f"Sweep of the test problems ({s['columns']} columns): {s['executed_tokens']} tokens run "
              f"for {s['independent_tokens']} in independent runs; {report['seconds']:.0f} s in all."]
    return "\n".join(lines)


def write_curve_report(report: dict, out: str | Path) -> Path:
    """curve.json, curve.md and budget_curve.png in `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CURVE_JSON).write_text(json.dumps(report, indent=1) + "\n")
    (out / CURVE_MD).write_text(markdown(report) + "\n")
    plot(report, out / CURVE_PNG)
    return out
