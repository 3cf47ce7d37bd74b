"""Issues 18 and 19 on the real pair: a problem-level router trained on labelled GSM8K *train*
problems, tested on the main run's 400 test problems.

`what_would_close.md` says a router that decides before anything is generated would need
AUROC about 0.9 for "only the large model solves it" to meet issue 19's 0.5x cost on this
pair (0.8 with a small model half as dear). Each signal measured alone is at chance
(`problem_signals.md`, `prefill_signals.md`). Can a combination, trained with labels, do
better? Train: the 110 GSM8K train problems that both models have solved here (the 60 of the
calibration sweep, `runs/real_pair/train/calibration_risk.json.sweep.jsonl`, graded against
the train answers, and the 50 of `runs/real_pair/signals_outcome.jsonl`). Features: the
problem text's (length, numbers, sentences) and each model's mean log-probability of the
problem (`prefill_signals.prefill_rows`) and their difference, standardised on the train
problems. Model: L2 logistic regression (`cascade.router.fit_logistic`) for "only the large
model solves it". Test: AUROC on the 400 test problems (bootstrap interval over problems) and,
as in `what_would_close`, the most gap the best threshold on it recovers within the targets,
routing before generation.

    taskset -c CORE python runs/real_pair/problem_router.py
    # writes runs/real_pair/problem_router.{json,md}; train prefill rows in problem_router_train.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefill_signals import OUT as PREFILL_OUT  # this script's folder
from prefill_signals import RUNS, graded, prefill_rows
from problem_signals import FEATURES, auroc_cells, outcome_labels, shown
from signals_outcome import TRAIN
from what_would_close import PRICE_FIELDS, TARGETS

from bench.grading import Grader
from bench.paired import routed_gap
from bench.provenance import package_commit
from cascade.router import fit_logistic

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "runs/real_pair/train/calibration_risk.json.sweep.jsonl"
OUTCOME = ROOT / "runs/real_pair/signals_outcome.jsonl"
OUT = ROOT / "runs/real_pair/problem_router"


def train_labels() -> tuple[dict[str, str], dict[str, tuple[bool, bool]]]:
    """The labelled train problems: id -> text, id -> (small correct, large correct)."""
    # split on newlines only: a problem's text may hold a Unicode line separator
    items = {item["id"]: item for item in map(json.loads, filter(None, TRAIN.read_text().split("\n")))}
    by_text = {item["problem"]: item for item in items.values()}
    texts, labels = {}, {}
    with Grader() as grader:
        for line in SWEEP.read_text().splitlines()[1:]:
            row = json.loads(line)
            item = by_text[row["problem"]]
            # column 0 of the sweep is threshold 1.0 (the small model alone); the reference run is large's
            labels[item["id"]] = (bool(grader.grade(row["answers"][0], item["answer"], "gsm8k")),
                                  bool(grader.grade(row["reference_answer"], item["answer"], "gsm8k")))
            texts[item["id"]] = item["problem"]
    for line in OUTCOME.read_text().splitlines():
        row = json.loads(line)
        labels[row["id"]] = (bool(row["small_correct"]), bool(row["large_correct"]))
        texts[row["id"]] = items[row["id"]]["problem"]
    return texts, labels


def features(ids: list[str], texts: dict[str, str], prefill: dict[str, dict]) -> tuple[list[str], np.ndarray]:
    names = [*FEATURES, "small prefill log-prob", "large prefill log-prob", "large minus small"]
    rows = []
    for i in ids:
        small, large = prefill[i]["small"]["mean_logprob"], prefill[i]["large"]["mean_logprob"]
        rows.append([feature(texts[i]) for feature in FEATURES.values()] + [small, large, large - small])
    return names, np.array(rows, float)


def main() -> dict:
    train_texts, labels = train_labels()
    train_ids = sorted(train_texts, key=lambda i: int(i.rsplit("-", 1)[1]))
    train_prefill = prefill_rows(train_texts, OUT.with_name("problem_router_train.jsonl"))
    names, x_train = features(train_ids, train_texts, train_prefill)
    y_train = np.array([not labels[i][0] and labels[i][1] for i in train_ids])

    test_ids, by, small_ok, large_ok = graded(RUNS)
    test_texts = {i: by["small"][i]["problem"] for i in test_ids}
    test_prefill = prefill_rows(test_texts, PREFILL_OUT.with_suffix(".jsonl"))  # all kept there
    _, x_test = features(test_ids, test_texts, test_prefill)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-12
    coef, bias = fit_logistic((x_train - mean) / std, y_train, l2=1e-2)
    score = (x_test - mean) / std @ coef + bias
    test_labels = outcome_labels(small_ok, large_ok)

    rows = {}
    for measure, (ratio, target) in TARGETS.items():
        prices = {p: np.array([by[p][i][PRICE_FIELDS[measure]] for i in test_ids], float)
                  for p in ("small", "large")}
        rows[measure] = {"ratio": ratio, "target_gap": target,
                         "route_gap": routed_gap(score, small_ok, large_ok, prices["small"], prices["large"],
                                                 ratio)}
    result = {"command": "taskset -c CORE python runs/real_pair/problem_router.py",
              "commit": package_commit(),
              "n_train": len(train_ids), "train_positives": int(y_train.sum()), "n_test": len(test_ids),
              "features": names, "coef": coef.tolist(), "bias": bias,
              "test_auroc": auroc_cells(score, test_labels), "route": rows}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# A problem-level router trained on GSM8K train problems (real pair)", "",
          f"Trained on {len(train_ids)} labelled train problems ({int(y_train.sum())} solved by the "
          f"large model only), features {', '.join(names)} (standardised), L2 logistic regression; "
          f"tested on the {len(test_ids)} test problems of the main run. Pair Qwen2.5-Coder-0.5B -> "
          f"1.5B-Instruct Q4_K_M (llama.cpp). Command: `{result['command']}` at "
          f"`{result['commit'][:7]}`.", "",
          "| test AUROC: " + " | ".join(test_labels) + " |", "|---|---|",
          f"| {shown(result['test_auroc'])} |", "",
          "Routing before generation by the best threshold on it (an upper bound for any threshold): "
          + "; ".join(f"{r['route_gap']:.2f} of the gap within {r['ratio']:g}x the large model's {measure} "
                      f"(target {r['target_gap']:.0%})" for measure, r in rows.items()) + ".", "",
          "| feature | weight |", "|---|---|",
          *(f"| {n} | {c:+.3f} |" for n, c in zip(names, coef, strict=True))]
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
