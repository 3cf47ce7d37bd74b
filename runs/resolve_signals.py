"""Would another signal lift the certified re-solve? (issue 19, embedded pair)

The re-solve (`ConfidenceGate(signal="mean_prob", mode="resolve")`) hands a problem to the
large model at the small model's first step whose mean token probability is low: it ranks
problems by the lowest step score of the small model's solve. This script solves the problems
of `runs/resolve_probe.py` (400 calibration-split, 150 test-split, 150 independent) once with
each model alone and measures, per problem-level signal of the small model's own solve:

- AUROC of "the small model's answer is wrong";
- the ideal frontier: re-solve the problems in the signal's order, lowest confidence first,
  until the set's mean cost reaches B (x large-only mean cost), with the small model's whole
  solve paid on every problem; the gap recovered at 0.32x, 0.49x and 0.65x. This is an upper
  bound for any threshold on that signal (it spends the test set's budget exactly, with test
  costs); the certified policy is below it by the calibration's margin and by how the
  calibration problems' costs differ from the test problems'.

It also reports each set's small-only and large-only accuracy, so that a certified figure can
be read against the difficulty of the problems it was tested on.

    python runs/resolve_signals.py   # writes bench/results/resolve_signals/report.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import cascade
from bench.provenance import package_commit
from bench.tasks import check_answer
from calibration import auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resolve_probe import problems_of  # noqa: E402  (the probe's problems, one definition)

OUT = Path("bench/results/resolve_signals")
BUDGET_FRACTIONS = (0.32, 0.49, 0.65)
SETS = {"calibration": ("calibration", 400), "test": ("test", 150), "independent": ("independent", 150)}


def _token_nll(steps: np.ndarray) -> np.ndarray:
    return -steps[:, 0] * steps[:, 4]  # mean logprob x tokens = each step's total nats


# Each signal: the small model's steps (rows: mean logprob, min prob, mean entropy, first-k mean
# logprob, tokens) -> a doubt score, higher = more likely wrong. All can be read online, step by
# step (a running min, sum or count), so each is a candidate for a resolve-mode gate.
SIGNALS: dict[str, Callable[[np.ndarray], float]] = {
    "lowest step mean_prob (shipped)": lambda s: -float(np.exp(s[:, 0]).min()),
    "sequence nats (sum)": lambda s: float(_token_nll(s).sum()),
    "mean token nats": lambda s: float(_token_nll(s).sum() / max(1.0, s[:, 4].sum())),
    "lowest token prob": lambda s: -float(s[:, 1].min()),
    "highest step entropy": lambda s: float(s[:, 2].max()),
    "summed token entropy": lambda s: float((s[:, 2] * s[:, 4]).sum()),
    "steps with mean_prob < 0.9": lambda s: float((np.exp(s[:, 0]) < 0.9).sum()),
}


def ideal_gap(doubt: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, small_cost: np.ndarray,
              large_cost: np.ndarray, fraction: float) -> float:
    """Gap recovered when the most doubted problems are re-solved until the mean cost reaches
    `fraction` x the large model's mean cost (the small solve paid everywhere)."""
    order = np.argsort(-doubt, kind="stable")
    allowance = fraction * large_cost.sum() - small_cost.sum()
    chosen = order[: int(np.searchsorted(np.cumsum(large_cost[order]), allowance, side="right"))]
    ok = small_ok.astype(float)
    ok[chosen] = large_ok[chosen]
    gap = large_ok.mean() - small_ok.mean()
    return float((ok.mean() - small_ok.mean()) / gap)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = time.time()
    runner = cascade.embedded_cascade(cascade.AlwaysSmall())
    result = {"command": " ".join(["python runs/resolve_signals.py", *(sys.argv[1:] if argv is None else argv)]),
              "commit": package_commit(), "pair": ["embedded:small", "embedded:large"],
              "budget_fractions": list(BUDGET_FRACTIONS), "sets": {}}
    for name, (split, n) in SETS.items():
        problems = problems_of(split, n)
        small = runner.solve_many(problems, gates=[cascade.AlwaysSmall()])
        large = runner.solve_many(problems, gates=[cascade.AlwaysLarge()])
        small_ok = np.array([check_answer(p, r.answer) for p, r in zip(problems, small, strict=True)])
        large_ok = np.array([check_answer(p, r.answer) for p, r in zip(problems, large, strict=True)])
        small_cost = np.array([r.cost.total for r in small])
        large_cost = np.array([r.cost.total for r in large])
        steps = [np.array([[s.confidence.mean_logprob, s.confidence.min_prob, s.confidence.mean_entropy,
                            s.confidence.first_k_mean_logprob, s.confidence.tokens] for s in r.steps],
                          dtype=float).reshape(-1, 5) for r in small]
        oracle = (~small_ok & large_ok) / large_cost  # test labels: fixes per unit of cost
        signals = {}
        for label, signal in [*SIGNALS.items(), ("oracle (labels)", None)]:
            doubt = oracle if signal is None else np.array([signal(s) for s in steps])
            signals[label] = {
                "auroc_small_wrong": None if signal is None else auroc(doubt, ~small_ok),
                "ideal_gap_recovered": [ideal_gap(doubt, small_ok, large_ok, small_cost, large_cost, f)
                                        for f in BUDGET_FRACTIONS]}
        result["sets"][name] = {"split": split, "n": n, "small_accuracy": float(small_ok.mean()),
                                "large_accuracy": float(large_ok.mean()),
                                "small_mean_cost": float(small_cost.mean()),
                                "large_mean_cost": float(large_cost.mean()), "signals": signals}
    result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Problem-level signals for the re-solve, embedded pair (`embedded:small` -> `embedded:large`)", "",
          f"Command: `{result['command']}` at `{result['commit'][:7]}`. Ideal frontier: re-solve in the signal's "
          "order until the set's mean cost is B (an upper bound for a threshold on that signal).", ""]
    for name, data in result["sets"].items():
        md += [f"## {name} ({data['n']} problems): small alone {data['small_accuracy']:.3f}, large alone "
               f"{data['large_accuracy']:.3f} at mean cost {data['large_mean_cost']:.1f}", "",
               "| signal | AUROC (small wrong) | " + " | ".join(f"ideal gap recovered at {f}x" for f in BUDGET_FRACTIONS)
               + " |", "|---|---|" + "---|" * len(BUDGET_FRACTIONS)]
        for label, s in data["signals"].items():
            a = "-" if s["auroc_small_wrong"] is None else f"{s['auroc_small_wrong']:.3f}"
            md.append(f"| {label} | {a} | " + " | ".join(f"{g:.2f}" for g in s["ideal_gap_recovered"]) + " |")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
