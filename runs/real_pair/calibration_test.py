"""Issue 18: does each label-free calibration of the real pair keep its promise on GSM8K
*test* problems? For every budget a calibration file certified, the certified threshold's
rows of the test run (the run's `confidence:mean_prob@T` policy; T = 1.0 never escalates,
which is the run's `small` policy) give the test mean cost and P(cost > B); LTT promises
P(cost > B) <= alpha, risk control E[cost] <= B. Writes
bench/results/real_pair_gsm8k/calibration_test.{json,md}.

    python runs/real_pair/calibration_test.py [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.harness import RESULTS_FILE, load_results

ROOT = Path(__file__).resolve().parents[2]
FILES = {"ltt": ROOT / "runs/real_pair/train/calibration_ltt.json",
         "risk": ROOT / "runs/real_pair/train/calibration_risk.json"}
OUT = ROOT / "bench/results/real_pair_gsm8k/calibration_test"


def policy_of(threshold: float) -> str:
    return "small" if threshold >= 1.0 else f"confidence:mean_prob@{threshold:g}"


def main(runs: list[str]) -> dict:
    costs: dict[str, dict[str, float]] = {}
    for run in runs:
        for row in load_results(Path(run) / RESULTS_FILE):
            if row.get("error") is None:
                costs.setdefault(row["policy"], {}).setdefault(row["id"], float(row["cost"]))
    out = {"runs": runs, "entries": []}
    for method, path in FILES.items():
        calibration = json.loads(path.read_text())["calibration"]
        alpha = calibration["alpha"]
        for entry in calibration["entries"]:
            item = {"method": method, "file": str(path.relative_to(ROOT)), "n_calibration": calibration["n"],
                    "budget": entry["budget"], "alpha": alpha, "delta": calibration["delta"],
                    "thresholds": entry["thresholds"], "statement": entry["statement"] or entry["reason"]}
            if entry["thresholds"]:
                policy = policy_of(entry["thresholds"][0])
                values = np.array(list(costs[policy].values()))
                tail = float((values > entry["budget"]).mean())
                kept = tail <= alpha if method == "ltt" else values.mean() <= entry["budget"]
                item.update(policy=policy, n_test=len(values), test_mean_cost=float(values.mean()),
                            test_tail=tail, kept=bool(kept))
            out["entries"].append(item)
    lines = ["# Label-free calibration of the real pair, checked on GSM8K test problems", "",
             "Pair Qwen2.5-Coder 0.5B -> 1.5B Instruct Q4_K_M (llama.cpp). Calibration: unlabeled GSM8K "
             "train problems (`runs/real_pair/splits/calibration.jsonl`). Test: the rows of the certified "
             f"threshold in {', '.join(f'`{r}`' for r in runs)}. Command: "
             f"`python runs/real_pair/calibration_test.py {' '.join(runs)}`.", "",
             "| method | n cal. | B | certified threshold (test policy) | promise | test n | "
             "test mean cost | test P(cost > B) | kept on test |", "|---|---|---|---|---|---|---|---|---|"]
    for e in out["entries"]:
        promise = f"P(cost > B) <= {e['alpha']:g}" if e["method"] == "ltt" else "E[cost] <= B"
        if not e["thresholds"]:
            lines.append(f"| {e['method']} | {e['n_calibration']} | {e['budget']:g} | none certified | "
                         f"{promise} | | | | |")
            continue
        lines.append(f"| {e['method']} | {e['n_calibration']} | {e['budget']:g} | {e['thresholds'][0]:g} "
                     f"(`{e['policy']}`) | {promise} | {e['n_test']} | {e['test_mean_cost']:.1f} | "
                     f"{e['test_tail']:.3f} | {'yes' if e['kept'] else 'NO'} |")
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/real_pair/gsm8k_test"])
