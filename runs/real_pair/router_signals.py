"""Step-level AUROC of each small-model confidence signal on the real pair, from the advantage
router's training data (issue 18, item 3).

    python runs/real_pair/router_signals.py runs/real_pair/train/router.pt.data.jsonl \
        -o runs/real_pair/signals_router

The rows (`cascade train-router --scorer large-likelihood`, GSM8K *train* problems) hold, per
step the small model drafted, its per-token log-probabilities and entropies, the large model's
mean likelihood score of the draft (small_score) and of its own step at the same point
(large_score). Two step labels, neither needing a human: "the large model would write a
meaningfully better step" (large_score - small_score > tau, what the router learns), and "the
large model finds the draft unlikely" (small_score below the median). Each signal is oriented
so that higher means "escalate" (1 - confidence), and its AUROC against each label is reported.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from calibration import auroc

FIRST_K = 4


def signals(logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    """Every signal of one drafted step, oriented so that higher means escalate."""
    probs = np.exp(np.array(logprobs, dtype=float))
    return {  # each: higher = less confident = escalate
        "1 - mean_prob": 1.0 - float(probs.mean()),
        "1 - min_prob": 1.0 - float(probs.min()),
        "mean_entropy": float(np.mean(entropies)),
        "1 - first_k mean_prob": 1.0 - float(probs[:FIRST_K].mean()),
        "1 - geometric mean prob": 1.0 - math.exp(float(np.mean(logprobs))),
        "share of tokens with p < 0.5": float((probs < 0.5).mean()),
        "draft tokens": float(len(probs)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--tau", type=float, default=0.05,
                        help="advantage above which the large step is better")
    parser.add_argument("-o", "--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    lines = Path(args.data).read_text().splitlines()
    header = json.loads(lines[0])
    steps = [s for line in lines[1:] if line.strip() for s in json.loads(line)["steps"]
             if s.get("logprobs") and s.get("large_score") is not None]
    problems = len([line for line in lines[1:] if line.strip()])
    per_step = [signals(s["logprobs"], s["entropies"]) for s in steps]
    table = {name: np.array([row[name] for row in per_step]) for name in signals([0.0], [0.0])}
    small = np.array([s["small_score"] for s in steps])
    advantage = np.array([s["large_score"] for s in steps]) - small
    labels = {f"advantage > {args.tau:g}": advantage > args.tau,
              "large-model likelihood of the draft below its median": small < np.median(small)}
    result = {"data": args.data, "models": [m["name"] for m in header["models"]], "scorer": header["scorer"],
              "problems": problems, "steps": len(steps),
              "positives": {k: int(v.sum()) for k, v in labels.items()}, "auroc": {}}
    for label, positive in labels.items():
        result["auroc"][label] = {name: (float(auroc(values, positive)) if 0 < positive.sum() < len(positive)
                                         else None) for name, values in table.items()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    names = list(table)
    md = [f"# Step-level AUROC of the small model's signals, real pair ({problems} GSM8K train problems, "
          f"{len(steps)} steps)", "",
          f"Data: `{args.data}` (scorer {header['scorer']}; models "
          f"{' -> '.join(Path(m).name for m in result['models'])}). Command: "
          f"`python runs/real_pair/router_signals.py {args.data} --tau {args.tau:g} -o {args.out}`", "",
          "| label (positives) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, row in result["auroc"].items():
        cells = ["-" if row[n] is None else f"{row[n]:.3f}" for n in names]
        md.append(f"| {label} ({result['positives'][label]}) | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
