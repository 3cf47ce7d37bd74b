"""Issues 18 and 19 on the real pair: what would close the missed targets, measured by replay.

Issue 18 asks for >= 70 % of the small-to-large GSM8K gap at <= 0.6x the large model's wall
clock; issue 19 for >= 60 % at 0.5x its cost. Neither is met by any deployable policy on
Qwen2.5-Coder-0.5B -> 1.5B. Two things could close them: a problem-level signal that finds
the problems only the large model solves, and a small model that is cheaper relative to the
large one. This replay puts a number on each, from the recorded rows of the main run (the
first 270 GSM8K test problems, where every policy ran):

- The signal is parametrised by its AUROC for the label that decides what a re-solve buys,
  "the large model solves it and the small model does not": score = d * label + N(0, 1),
  d = sqrt(2) * Phi^-1(AUROC), 200 draws (`bench.paired.signal_headroom`). The measured
  signals: for the re-solve, the small model's own mean token probability at the thresholds
  the run recorded (problems re-solved at 0.25, 0.2, 0.15: four nested sets; its AUROC is
  computed with ties); for the router, which decides before anything is generated, the
  problem's length (the best of the problem-text signals of `problem_signals.py`).
- The small model's price (its seconds, or its cost units) is scaled by a factor against the
  measured one: 1 is this pair, 0.5 a small model twice as cheap relative to the large one,
  0 a free small model.
- Two policies: re-solve (the small model solves every problem, the top-k by the signal are
  solved again by the large model: what `mode="resolve"` does, its small solve counted whole,
  an upper bound) and route (the top-k go to the large model instead of the small one: a
  router that decides before anything is generated).

Each cell is the best gap recovered over k within the target ratio: an upper bound for any
threshold on that signal (a deployed threshold, chosen without labels, does no better).

    python runs/real_pair/what_would_close.py
    # writes bench/results/real_pair_gsm8k/what_would_close.{json,md,png}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from problem_signals import FEATURES  # this script's folder
from resolve_replay import MAIN, THRESHOLDS, policy_of, rows_by_policy

from bench.paired import routed_gap, signal_headroom
from bench.provenance import package_commit
from calibration import auroc

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench/results/real_pair_gsm8k/what_would_close"
AUROCS = (0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
PRICE_FACTORS = (1.0, 0.5, 0.25, 0.0)
DRAWS = 200
TARGETS = {"wall": (0.6, 0.7), "cost": (0.5, 0.6)}  # measure: (ratio vs large, gap) of issues 18 and 19
PRICE_FIELDS = {"wall": "wall_seconds", "cost": "cost"}  # measure: a result row's field


def main() -> dict:
    rows = rows_by_policy(MAIN)
    policies = ["small", "large", *(policy_of(t) for t in THRESHOLDS[1:])]
    ids = sorted(set.intersection(*(set(rows[p]) for p in policies)), key=lambda i: int(i.rsplit("-", 1)[1]))
    small_ok = np.array([bool(rows["small"][i]["correct"]) for i in ids])
    large_ok = np.array([bool(rows["large"][i]["correct"]) for i in ids])
    price = {measure: (np.array([rows["small"][i][field] for i in ids], float),
                       np.array([rows["large"][i][field] for i in ids], float))
             for measure, field in PRICE_FIELDS.items()}
    only_large = large_ok & ~small_ok
    # The measured signal: how low a threshold still leaves the problem alone (re-solved at
    # 0.25 -> 3, at 0.2 only -> 2, at 0.15 only -> 1, never -> 0).
    measured = sum((np.array([rows[policy_of(t)][i]["escalation_rate"] > 0 for i in ids])).astype(float)
                   for t in THRESHOLDS[1:])
    # A router decides before anything is generated, so its measured signal is one of the problem
    # text's (runs/real_pair/problem_signals.py; its length is the best of them).
    length = np.array([FEATURES["characters"](rows["small"][i]["problem"]) for i in ids], float)
    measured_by_policy = {"re-solve": ("the small model's mean token probability", measured),
                          "route": ("the problem's length in characters", length)}
    rng = np.random.default_rng(0)
    jitter = rng.random(len(ids)) * 1e-6  # ties in the measured signals broken at random, once

    result = {"command": "python runs/real_pair/what_would_close.py", "commit": package_commit(),
              "pair": ["Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M"],
              "n_problems": len(ids), "small_accuracy": float(small_ok.mean()),
              "large_accuracy": float(large_ok.mean()), "only_large_fraction": float(only_large.mean()),
              "draws": DRAWS,
              "small_price_x_large": {m: float(s.sum() / lg.sum()) for m, (s, lg) in price.items()},
              "tables": []}
    for measure, (ratio, target_gap) in TARGETS.items():
        small_price, large_price = price[measure]
        for route in (False, True):
            policy = "route" if route else "re-solve"
            signal_name, signal = measured_by_policy[policy]
            table = {"measure": measure, "ratio": ratio, "target_gap": target_gap, "policy": policy,
                     "measured_signal": signal_name, "measured_auroc": auroc(signal, only_large),
                     "measured_auroc_small_fails": auroc(signal, ~small_ok), "cells": []}
            for factor in PRICE_FACTORS:
                scaled = small_price * factor
                cell = {"price_factor": factor, "small_x_large": float(scaled.sum() / large_price.sum()),
                        "measured": routed_gap(signal + jitter, small_ok, large_ok, scaled, large_price,
                                               ratio, keeps_small=not route)}
                headroom = signal_headroom(small_ok, large_ok, scaled, large_price, ratio, aurocs=AUROCS,
                                           draws=DRAWS, rng=rng, keeps_small=not route, target_gap=target_gap)
                cell["synthetic"] = {f"{a:g}": list(value) for a, value in headroom.items()}
                table["cells"].append(cell)
            result["tables"].append(table)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    price = result["small_price_x_large"]
    md = ["# What would close issues 18 and 19 on the real pair: signal quality against the small "
          "model's price", "",
          f"Pair Qwen2.5-Coder-0.5B -> 1.5B-Instruct Q4_K_M (llama.cpp, one core each), the first "
          f"{len(ids)} GSM8K test problems of the main run: small alone {small_ok.mean():.3f}, large alone "
          f"{large_ok.mean():.3f}; {only_large.mean():.3f} of the problems are solved by the large model "
          f"only. The small model's whole solve costs {price['wall']:.2f}x the large model's wall clock and "
          f"{price['cost']:.2f}x its cost. Measured signals: for the re-solve the small model's mean token "
          "probability (problems ranked by the lowest recorded threshold that re-solves them), for the "
          "router the problem's length (a router has nothing else before generation); their AUROC for "
          "\"only the large model solves it\" (and for \"the small model fails\") heads each table. A "
          "cell: the most gap recovered within the target ratio over every number of problems sent to "
          "the large model, an upper bound for any threshold on that signal; synthetic signals: mean over "
          f"{DRAWS} draws (the share of draws that meet the target). AUROC 1 is the clairvoyant. Command: "
          f"`{result['command']}` at `{result['commit'][:7]}`.", ""]
    for table in result["tables"]:
        md += [f"## {table['policy']}, {table['measure']} <= {table['ratio']:g}x large (target: "
               f">= {table['target_gap']:.0%} of the gap)", "",
               "| signal | " + " | ".join(f"small x{c['price_factor']:g} ({c['small_x_large']:.2f}x)"
                                        for c in table["cells"]) + " |",
               "|---|" + "---|" * len(table["cells"])]
        md.append(f"| measured: {table['measured_signal']} ({table['measured_auroc']:.2f}; "
                  f"{table['measured_auroc_small_fails']:.2f}) | "
                  + " | ".join(f"{c['measured']:.2f}" for c in table["cells"]) + " |")
        for a in AUROCS:
            shown = (c["synthetic"][f"{a:g}"] for c in table["cells"])
            md.append(f"| AUROC {a:g} | " + " | ".join(f"{mean:.2f} ({met:.0%})" for mean, met in shown)
                      + " |")
        md.append("")
    OUT.with_suffix(".md").write_text("\n".join(md))
    plot(result)
    print("\n".join(md))
    return result


def plot(result: dict) -> None:
    """One panel per table: the best gap within the target ratio against the signal's AUROC,
    a line per price of the small model, the measured signal as points, the target dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(result["tables"]), figsize=(15, 4), sharey=True)
    for ax, table in zip(axes, result["tables"], strict=True):
        for cell, colour in zip(table["cells"], ("C0", "C1", "C2", "C3"), strict=True):
            ax.plot(AUROCS, [cell["synthetic"][f"{a:g}"][0] for a in AUROCS], "-o", color=colour, ms=3,
                    label=f"small {cell['small_x_large']:.2f}x")
            ax.plot([table["measured_auroc"]], [cell["measured"]], "s", color=colour, ms=6)
        ax.axhline(table["target_gap"], color="k", ls="--", lw=1)
        ax.set_title(f"{table['policy']}, {table['measure']} <= {table['ratio']:g}x large", fontsize=10)
        ax.set_xlabel("AUROC for \"only large solves it\"")
    axes[0].set_ylabel("gap recovered (best threshold)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Real pair (Qwen2.5-Coder 0.5B -> 1.5B), 270 GSM8K test problems: squares = measured signal",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
