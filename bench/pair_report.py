"""What the embedded pair shows: accuracy gap, confidence AUROC, step-time ratio, cascades.

    python -m bench.pair_report --n 1000 --out bench/results/embedded_pair

Runs, on the first `n` problems of the held-out test split (greedy, batch 1), every
policy on each problem in turn (so a change of machine load hits all policies alike):
small-only, large-only, and a confidence-gated cascade at several thresholds. Writes
`report.json` (all figures + per-problem rows) and `report.md` with the command and
the commit that produced them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.oracle import OracleGate
from bench.provenance import package_commit
from bench.tasks import DEFAULT_CONFIG, check_answer, check_step, generate_split
from calibration import auroc
from cascade import AlwaysLarge, AlwaysSmall, Cascade, ConfidenceGate, SolveOptions
from cascade.embedded import EMBEDDED_DELIMITER, EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS, embedded_path
from decoding import HFBackend

__all__ = ["main", "step_labels", "wilson_interval"]

SIGNALS = ("mean_prob", "min_prob", "entropy")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def step_labels(problem: str, result) -> list[bool]:
    """Local correctness of each step of a result, by the task's exact checker."""
    lines = [step.text for step in result.steps]
    return [check_step(problem, lines[:k], lines[k]) for k in range(len(lines))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--small", default=None, help="small model dir (default: shipped)")
    parser.add_argument("--large", default=None, help="large model dir (default: shipped)")
    parser.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--signal", default="min_prob")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="bench/results/embedded_pair")
    args = parser.parse_args(argv)

    small = HFBackend.from_pretrained(args.small or embedded_path("small"), step_delimiter=EMBEDDED_DELIMITER)
    large = HFBackend.from_pretrained(args.large or embedded_path("large"), step_delimiter=EMBEDDED_DELIMITER)
    options = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    policies = {"small": AlwaysSmall(), "large": AlwaysLarge()}
    for t in thresholds:
        policies[f"confidence@{t:g}"] = ConfidenceGate(threshold=t, signal=args.signal)
    policies["oracle"] = OracleGate()
    cascades = {name: Cascade(small, large, gate, options=options) for name, gate in policies.items()}
    problems = generate_split(args.split, args.n, DEFAULT_CONFIG)

    warm = time.perf_counter()
    for runner in cascades.values():  # warm-up, excluded from timing
        runner.solve(problems[0].problem)
    warmup_seconds = time.perf_counter() - warm

    rows = []
    started = time.time()
    for i, item in enumerate(problems):
        row = {"id": item.id, "problem": item.problem, "answer": item.answer, "steps_needed":
               item.solution.count("\n"), "policies": {}}
        for name, runner in cascades.items():
            begin = time.perf_counter()
            result = runner.solve(item.problem)
            wall = time.perf_counter() - begin
            row["policies"][name] = {
                "answer": result.answer, "correct": check_answer(item.problem, result.answer),
                "cost": result.cost.total, "wall_seconds": wall,
                "escalation_rate": result.escalation_rate, "steps": len(result.steps),
                "authors": [s.tier for s in result.steps],
                "step_correct": step_labels(item.problem, result),
                "confidence": {sig: [s.confidence.value(sig) for s in result.steps] for sig in SIGNALS},
                "tier_seconds": [u.seconds for u in result.cost.per_tier],
                "tier_generated": [u.generated_tokens for u in result.cost.per_tier],
            }
        rows.append(row)
        if (i + 1) % 50 == 0:
            elapsed = time.time() - started
            print(f"{i + 1}/{len(problems)} problems, {elapsed:.0f}s, "
                  f"eta {elapsed / (i + 1) * (len(problems) - i - 1):.0f}s",
                  flush=True)

    summary = {}
    for name in cascades:
        cells = [row["policies"][name] for row in rows]
        correct = sum(c["correct"] for c in cells)
        low, high = wilson_interval(correct, len(cells))
        hardest = [c for row, c in zip(rows, cells, strict=False)
                   if row["steps_needed"] == DEFAULT_CONFIG.max_steps]
        summary[name] = {
            "accuracy": correct / len(cells), "accuracy_ci95": [low, high],
            "accuracy_at_max_steps": sum(c["correct"] for c in hardest) / max(1, len(hardest)),
            "n_at_max_steps": len(hardest),
            "mean_cost": float(np.mean([c["cost"] for c in cells])),
            "escalation_rate": float(np.mean([c["escalation_rate"] for c in cells])),
            "mean_wall_seconds": float(np.mean([c["wall_seconds"] for c in cells])),
            "p95_wall_seconds": float(np.percentile([c["wall_seconds"] for c in cells], 95)),
        }
    # Step confidence vs local step correctness (small model's own trajectories).
    small_cells = [row["policies"]["small"] for row in rows]
    labels = np.array([ok for c in small_cells for ok in c["step_correct"]])
    step_auroc = {sig: auroc(np.array([v for c in small_cells for v in c["confidence"][sig]]), labels)
                  for sig in SIGNALS}
    # Time per step at batch 1: seconds spent by each model over the steps it wrote alone.
    small_step = sum(c["tier_seconds"][0] for c in small_cells) / sum(c["steps"] for c in small_cells)
    large_cells = [row["policies"]["large"] for row in rows]
    large_step = sum(c["tier_seconds"][1] for c in large_cells) / sum(c["steps"] for c in large_cells)
    small_token = sum(c["tier_seconds"][0] for c in small_cells) / sum(c["tier_generated"][0]
                                                                       for c in small_cells)
    large_token = sum(c["tier_seconds"][1] for c in large_cells) / sum(c["tier_generated"][1]
                                                                       for c in large_cells)
    gap = summary["large"]["accuracy"] - summary["small"]["accuracy"]
    for name in summary:
        summary[name]["gap_recovered"] = (summary[name]["accuracy"] - summary["small"]["accuracy"]) / gap \
            if gap > 0 else math.nan
    report = {
        "command": "python -m bench.pair_report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": package_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, torch threads {__import__('torch').get_num_threads()}",
        "n_problems": len(rows), "split": args.split, "task_config": DEFAULT_CONFIG.__dict__,
        "models": {"small": {"name": small.info.name, "parameters": small.info.num_parameters,
                             "fingerprint": small.info.fingerprint},
                   "large": {"name": large.info.name, "parameters": large.info.num_parameters,
                             "fingerprint": large.info.fingerprint}},
        "summary": summary,
        "small_step_accuracy": float(labels.mean()), "n_small_steps": int(labels.size),
        "step_auroc_confidence_vs_correct": step_auroc,
        "seconds_per_step": {"small": small_step, "large": large_step, "ratio": large_step / small_step},
        "seconds_per_token": {"small": small_token, "large": large_token, "ratio": large_token / small_token},
        "warmup_seconds": warmup_seconds,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report) + "\n")
    print(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    lines = [
        f"# Embedded pair report ({report['n_problems']} {report['split']} problems, greedy, batch 1)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`, {report['date']}, {report['machine']}",
        "",
        "| policy | accuracy (95% CI) | acc. at 8 steps | escalation rate | gap recovered | mean cost | "
        "mean s/problem | p95 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        lines.append(
            f"| {name} | {s['accuracy']:.3f} ({s['accuracy_ci95'][0]:.3f}-{s['accuracy_ci95'][1]:.3f}) | "
            f"{s['accuracy_at_max_steps']:.3f} (n={s['n_at_max_steps']}) | {s['escalation_rate']:.3f} | "
            f"{s['gap_recovered']:.2f} | {s['mean_cost']:.1f} | {s['mean_wall_seconds']:.3f} | "
            f"{s['p95_wall_seconds']:.3f} |")
    auroc_text = ", ".join(f"{k} {v:.3f}" for k, v in report["step_auroc_confidence_vs_correct"].items())
    sps, spt = report["seconds_per_step"], report["seconds_per_token"]
    lines += [
        "",
        f"Small model's step accuracy on its own trajectories: {report['small_step_accuracy']:.3f} "
        f"over {report['n_small_steps']} steps.  ",
        f"Step confidence vs step correctness, AUROC: {auroc_text}.  ",
        f"Seconds per step at batch 1: small {sps['small'] * 1000:.1f} ms, "
        f"large {sps['large'] * 1000:.1f} ms, "
        f"ratio {sps['ratio']:.2f}x (per token: {spt['small'] * 1000:.2f} ms vs "
        f"{spt['large'] * 1000:.2f} ms, "
        f"{spt['ratio']:.2f}x).  ",
        f"Parameters: small {report['models']['small']['parameters']:,}, "
        f"large {report['models']['large']['parameters']:,}. "
        f"Warm-up (excluded): {report['warmup_seconds']:.1f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
