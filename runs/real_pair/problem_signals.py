"""Can a router tell, before the small model writes anything, which problems only the large model solves?

At 0.5x the large model's cost a clairvoyant router that sends those problems to the large
model *instead of* the small one recovers 0.82 of the gap on the real pair's 270 GSM8K test
problems, one that re-solves them after the small model's whole solve only 0.55
(`bench/results/real_pair_gsm8k/paired_resolve.md`). Routing before any generation needs a
signal in the problem text itself. This measures the plain ones (length, how many numbers)
by AUROC against "only the large model solves it" and against "the small model fails", over
the recorded small and large rows of the main run; 95 % intervals from resampling problems.

    python runs/real_pair/problem_signals.py   # -> runs/real_pair/problem_signals.{json,md}
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from signals_outcome import BOOTSTRAP, auroc_with_interval  # resamples problems (groups of one here)

from bench.harness import RESULTS_FILE, load_results

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "runs/real_pair/gsm8k_test"
OUT = ROOT / "runs/real_pair/problem_signals"
FEATURES = {
    "characters": lambda text: len(text),
    "numbers in the text": lambda text: len(re.findall(r"\d+(?:[.,]\d+)*", text)),
    "sentences": lambda text: len(re.findall(r"[.?!](?:\s|$)", text)),
}


def outcome_labels(small_ok: np.ndarray, large_ok: np.ndarray) -> dict[str, np.ndarray]:
    """The two problem-level labels every signal here is scored against."""
    return {"only large solves it": large_ok & ~small_ok, "small fails": ~small_ok}


def auroc_cells(scores: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, list]:
    """Per label: [AUROC, [low, high]] of one problem-level signal, the interval from a
    bootstrap over problems (each its own group)."""
    cells = {}
    for label, y in labels.items():
        point, low, high = auroc_with_interval([(scores[k:k + 1], y[k:k + 1]) for k in range(len(y))])
        cells[label] = [point, [low, high]]
    return cells


def shown(cells: dict[str, list]) -> str:
    """A Markdown row's cells: AUROC (low-high) per label."""
    return " | ".join(f"{a:.2f} ({lo:.2f}-{hi:.2f})" for a, (lo, hi) in cells.values())


def main() -> dict:
    rows = [r for r in load_results(RUN / RESULTS_FILE) if r.get("correct") is not None]
    by = {(r["id"], r["policy"]): r for r in rows}
    ids = [i for i in dict.fromkeys(r["id"] for r in rows) if (i, "small") in by and (i, "large") in by]
    small_ok = np.array([bool(by[i, "small"]["correct"]) for i in ids])
    large_ok = np.array([bool(by[i, "large"]["correct"]) for i in ids])
    labels = outcome_labels(small_ok, large_ok)
    out: dict = {"n_problems": len(ids), "positives": {k: int(v.sum()) for k, v in labels.items()},
                 "features": {}}
    lines = ["# Problem-text signals for routing before any generation (real pair, GSM8K test)", "",
             f"{len(ids)} problems of `runs/real_pair/gsm8k_test` with small and large rows "
             f"(Qwen2.5-Coder-0.5B -> 1.5B-Instruct); AUROC (95 % bootstrap over problems, "
             f"{BOOTSTRAP} draws).",
             "", "| feature | " + " | ".join(f"{k} ({v.sum()})" for k, v in labels.items()) + " |",
             "|---|" + "---|" * len(labels)]
    for name, feature in FEATURES.items():
        cells = auroc_cells(np.array([feature(by[i, "small"]["problem"]) for i in ids], float), labels)
        out["features"][name] = cells
        lines.append(f"| {name} | {shown(cells)} |")
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
