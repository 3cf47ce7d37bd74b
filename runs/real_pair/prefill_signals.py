"""Issues 18 and 19 on the real pair: can the models' reading of the problem route it?

A router that decides before anything is generated needs a problem-level signal, and the
problem text's own features are at chance for "only the large model solves it"
(`runs/real_pair/problem_signals.md`: AUROC 0.48-0.51). `what_would_close.md` puts the bar
at about AUROC 0.8 (with a cheaper small model) to 0.9 (this pair). The cheapest model-based
signal is a prefill: each model reads the problem in its chat prompt, and its mean token
log-probability says how familiar the text is to it. The gap between the two models'
(large minus small) is a capability signal rather than a difficulty one: it could rise on the
problems the large model handles and the small one does not.

On the main run's GSM8K test problems (`runs/real_pair/gsm8k_test*`, small and large rows),
each model scores the problem text after its prompt's opening (the system turn and the user
header of `qwen25-math-cot`); AUROC with a bootstrap interval over problems for "only the
large model solves it" and "the small model fails". Rows are kept as they are computed, so a
rerun resumes.

    taskset -c CORE python runs/real_pair/prefill_signals.py
    # writes runs/real_pair/prefill_signals.{jsonl,json,md}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from problem_signals import auroc_cells, outcome_labels, shown  # this script's folder
from signals_outcome import BOOTSTRAP, LARGE, MODELS, SMALL

from bench.harness import RESULTS_FILE, load_results
from bench.prompts import get_template
from bench.provenance import package_commit
from decoding import LlamaCppBackend, ScoreRequest

ROOT = Path(__file__).resolve().parents[2]
RUNS = [ROOT / "runs/real_pair" / name  # the main run's 400 problems (real_pair_gsm8k/paired_main)
        for name in ("gsm8k_test", "gsm8k_test_from270", "gsm8k_test_from335", "gsm8k_test_from372")]
OUT = ROOT / "runs/real_pair/prefill_signals"


def graded(runs: list[Path]) -> tuple[list[str], dict[str, dict[str, dict]], np.ndarray, np.ndarray]:
    """The problems with graded small and large rows, in index order; those rows (policy ->
    id -> row); whether the small and the large model solved each."""
    by: dict[str, dict[str, dict]] = {"small": {}, "large": {}}
    for run in runs:
        if (run / RESULTS_FILE).exists():
            for row in load_results(run / RESULTS_FILE):
                if row.get("correct") is not None and row["policy"] in by:
                    by[row["policy"]][row["id"]] = row
    ids = sorted(set(by["small"]) & set(by["large"]), key=lambda i: int(i.rsplit("-", 1)[1]))
    small_ok, large_ok = (np.array([bool(by[p][i]["correct"]) for i in ids]) for p in ("small", "large"))
    return ids, by, small_ok, large_ok


def prefill_rows(texts: dict[str, str], rows_path: Path) -> dict[str, dict]:
    """Each model's mean log-probability of each problem text (id -> row), computing only the
    ids `rows_path` does not hold yet and appending their rows as they come."""
    kept = rows_path.read_text().splitlines() if rows_path.exists() else []
    rows = {r["id"]: r for r in map(json.loads, kept)}
    todo = [i for i in texts if i not in rows]
    if not todo:
        return rows
    # The prompt up to the problem: the problem itself becomes the scored text.
    full = get_template("qwen25-math-cot").format
    opening = full[:full.index("{problem}")] + "{problem}"
    backends = {name: LlamaCppBackend(MODELS / path, n_threads=1, name=name, prompt_template=opening)
                for name, path in (("small", SMALL), ("large", LARGE))}
    with rows_path.open("a") as sink:
        for n, i in enumerate(todo):
            row = {"id": i}
            for name, backend in backends.items():
                scored = backend.score_steps([ScoreRequest(i, "", "", texts[i])])[0]
                backend.release(i)
                row[name] = {"tokens": len(scored.logprobs),
                             "mean_logprob": math.fsum(scored.logprobs) / len(scored.logprobs),
                             "seconds": scored.seconds}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            rows[i] = row
            if n % 25 == 0:
                print(f"{n}/{len(todo)} {i}", flush=True)
    for backend in backends.values():
        backend.close()
    return rows


def main() -> dict:
    ids, by, small_ok, large_ok = graded(RUNS)
    texts = {i: by["small"][i]["problem"] for i in ids}
    rows = prefill_rows(texts, OUT.with_suffix(".jsonl"))

    small_lp = np.array([rows[i]["small"]["mean_logprob"] for i in ids])
    large_lp = np.array([rows[i]["large"]["mean_logprob"] for i in ids])
    signals = {"small model's mean log-probability of the problem": small_lp,
               "large model's mean log-probability of the problem": large_lp,
               "large minus small": large_lp - small_lp}
    labels = outcome_labels(small_ok, large_ok)
    result = {"command": "taskset -c CORE python runs/real_pair/prefill_signals.py",
              "commit": package_commit(), "pair": [SMALL, LARGE], "n_problems": len(ids),
              "positives": {k: int(v.sum()) for k, v in labels.items()},
              "large_prefill_seconds_mean": float(np.mean([rows[i]["large"]["seconds"] for i in ids])),
              "problem_tokens_mean": float(np.mean([rows[i]["large"]["tokens"] for i in ids])),
              "auroc": {}}
    md = ["# Prefill signals for routing before any generation (real pair, GSM8K test)", "",
          f"{len(ids)} problems of the main run with small and large rows "
          f"({result['positives']['only large solves it']} solved by the large model only, "
          f"{result['positives']['small fails']} failed by the small model). Each model scores the "
          "problem text after its prompt's opening (`qwen25-math-cot`); a signal's AUROC is for \"higher "
          "means send it to the large model\" (below 0.5: the other way round), with a 95 % bootstrap "
          f"interval over problems ({BOOTSTRAP} draws). The problem is {result['problem_tokens_mean']:.0f} "
          f"tokens on average; the large model reads it in {result['large_prefill_seconds_mean']:.2f} s "
          f"(one core, beside other runs). Pair `{SMALL}` -> `{LARGE}` (llama.cpp). Command: "
          f"`{result['command']}` at `{result['commit'][:7]}`.", "",
          "| signal | " + " | ".join(f"AUROC: {k}" for k in labels) + " |", "|---|" + "---|" * len(labels)]
    for name, score in signals.items():
        result["auroc"][name] = auroc_cells(score, labels)
        md.append(f"| {name} | {shown(result['auroc'][name])} |")
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
