"""Which confidence signal finds the steps and problems where the large model helps? (issue 18,
item 3, with hundreds of steps and an outcome label instead of 16 or 72 steps).

On GSM8K *train* problems the real pair runs as the benchmark runs it (the `qwen25-math-cot`
template, delimiter "\\n\\n", llama.cpp, greedy, 24 steps of at most 160 tokens): the small
model alone, the large model alone, and the large model scoring each of the small model's
steps in its context. No human labels:

- problem level: "the large model helps" = the small model's answer is wrong and the large
  model's is right (graded against the train answers); a problem's signal is its least
  confident step (what a confidence gate would escalate first) or its mean over steps;
- step level: the large model's mean log-likelihood of the small model's step is below the
  median over all steps; and "the step belongs to a problem the large model helps".

Each signal is oriented so that higher means escalate, and its AUROC (0.5 = no information)
is reported with a bootstrap 95 % interval over problems.

    taskset -c 1 python runs/real_pair/signals_outcome.py --start 400 --limit 60 \\
        -o runs/real_pair/signals_outcome

Resumable: one JSON line per problem in OUT.jsonl; a rerun skips the problems already there
and rewrites OUT.json / OUT.md from all of them (`--report` only rewrites them).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.grading import Grader
from bench.prompts import get_template
from calibration import auroc
from cascade import AlwaysLarge, AlwaysSmall, Cascade, SolveOptions
from decoding import LlamaCppBackend, ScoreRequest

MODELS = Path.home() / ".cache" / "stepcascade" / "models"
SMALL = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
LARGE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
TRAIN = Path("/work/shared/data/gsm8k_train.jsonl")
SIGNALS = ("mean_prob", "min_prob", "entropy", "first_k")
BOOTSTRAP = 2000


def escalate_scores(confidence: dict) -> dict[str, float]:
    """A step's signals, each oriented so that higher means escalate (1 - confidence)."""
    values = {"mean_prob": math.exp(confidence["mean_logprob"]), "min_prob": confidence["min_prob"],
              "entropy": math.exp(-confidence["mean_entropy"]),
              "first_k": math.exp(confidence["first_k_mean_logprob"])}
    return {name: 1.0 - values[name] for name in SIGNALS}


def run_problem(cascade: Cascade, large: LlamaCppBackend, grader: Grader, item: dict,
                options: SolveOptions) -> dict:
    started = time.perf_counter()
    small_run = cascade.solve(item["problem"], gates=[AlwaysSmall()], options=options)
    large_run = cascade.solve(item["problem"], gates=[AlwaysLarge()], options=options)
    delimiter = large.info.step_delimiter
    steps, context = [], ""
    for step in small_run.steps:
        scored = large.score_steps([ScoreRequest("score", item["problem"], context, step.text)])[0]
        steps.append({"text": step.text, "confidence": step.confidence.to_json(),
                      "large_mean_logprob": math.fsum(scored.logprobs) / max(1, len(scored.logprobs))})
        context += step.text + delimiter
    large.release("score")
    return {"id": item["id"], "reference": item["answer"],
            "small_answer": small_run.answer, "large_answer": large_run.answer,
            "small_correct": bool(grader.grade(small_run.answer, item["answer"], "gsm8k")),
            "large_correct": bool(grader.grade(large_run.answer, item["answer"], "gsm8k")),
            "steps": steps, "seconds": time.perf_counter() - started}


def auroc_with_interval(groups: list[tuple[np.ndarray, np.ndarray]], seed: int = 0
                        ) -> tuple[float | None, float | None, float | None]:
    """AUROC over all (scores, labels) groups pooled, and a bootstrap 95 % interval that
    resamples groups (problems), so that steps of one problem are not counted as independent."""
    scores = np.concatenate([g[0] for g in groups])
    labels = np.concatenate([g[1] for g in groups])
    if not 0 < labels.sum() < len(labels):
        return None, None, None
    point = float(auroc(scores, labels))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        picked = [groups[i] for i in rng.integers(0, len(groups), len(groups))]
        s = np.concatenate([g[0] for g in picked])
        y = np.concatenate([g[1] for g in picked])
        if 0 < y.sum() < len(y):
            draws.append(float(auroc(s, y)))
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def report(rows: list[dict], out: Path, command: str) -> dict:
    problems = [r for r in rows if r["steps"]]
    helps = [(not r["small_correct"]) and r["large_correct"] for r in problems]
    per_step = [[escalate_scores(s["confidence"]) for s in r["steps"]] for r in problems]
    median_ll = float(np.median([s["large_mean_logprob"] for r in problems for s in r["steps"]]))
    table: dict[str, dict[str, list]] = {}
    for name in SIGNALS:
        least = [(np.array([max(step[name] for step in steps)]), np.array([h]))
                 for steps, h in zip(per_step, helps, strict=True)]
        mean = [(np.array([float(np.mean([step[name] for step in steps]))]), np.array([h]))
                for steps, h in zip(per_step, helps, strict=True)]
        unlikely = [(np.array([step[name] for step in steps]),
                     np.array([s["large_mean_logprob"] < median_ll for s in r["steps"]]))
                    for steps, r in zip(per_step, problems, strict=True)]
        in_helped = [(np.array([step[name] for step in steps]), np.full(len(steps), h))
                     for steps, h in zip(per_step, helps, strict=True)]
        table[name] = {"problem: least confident step": list(auroc_with_interval(least)),
                       "problem: mean over steps": list(auroc_with_interval(mean)),
                       "step: large model finds it unlikely": list(auroc_with_interval(unlikely)),
                       "step: in a problem the large model helps": list(auroc_with_interval(in_helped))}
    # The large model's own reading of the small model's steps (what verify gates use): least likely step.
    verifier = [(np.array([-min(s["large_mean_logprob"] for s in r["steps"])]), np.array([h]))
                for r, h in zip(problems, helps, strict=True)]
    result = {"models": [SMALL, LARGE], "problems": len(problems), "steps": sum(len(s) for s in per_step),
              "small_accuracy": float(np.mean([r["small_correct"] for r in problems])),
              "large_accuracy": float(np.mean([r["large_correct"] for r in problems])),
              "large_helps": int(sum(helps)), "median_large_mean_logprob": median_ll,
              "auroc": table, "large_likelihood_least_likely_step": list(auroc_with_interval(verifier)),
              "command": command}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    labels = list(next(iter(table.values())))

    def cell(v: list) -> str:
        return "-" if v[0] is None else f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"

    md = [f"# Which signal finds where the large model helps: real pair, {len(problems)} GSM8K train "
          f"problems, {result['steps']} small-model steps", "",
          f"Pair `{SMALL}` -> `{LARGE}` (llama.cpp, greedy, `qwen25-math-cot`, delimiter `\\n\\n`). "
          f"Small alone {result['small_accuracy']:.3f}, large alone {result['large_accuracy']:.3f}; "
          f"the large model helps (small wrong, large right) on {result['large_helps']} problems. "
          "AUROC (bootstrap 95 % interval over problems); each signal oriented so that higher = "
          f"escalate. Command: `{command}`.", "",
          "| label | " + " | ".join(f"1 - {n}" for n in SIGNALS) + " |", "|---|" + "---|" * len(SIGNALS)]
    for label in labels:
        md.append(f"| {label} | " + " | ".join(cell(table[n][label]) for n in SIGNALS) + " |")
    md += ["", "The large model's log-likelihood of the small model's least likely step (what a verify gate "
           f"reads, at the price of the large model reading every step), same problem label: "
           f"{cell(result['large_likelihood_least_likely_step'])}."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", type=int, default=400, help="first train problem (index)")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--report", action="store_true", help="only rewrite OUT.json / OUT.md")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/real_pair/signals_outcome"))
    args = parser.parse_args(argv)
    command = (f"python runs/real_pair/signals_outcome.py --start {args.start} --limit {args.limit} "
               f"-o {args.out}")
    rows_path = args.out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    if not args.report:
        done = {r["id"] for r in rows}
        lines = TRAIN.read_text().splitlines()[args.start: args.start + args.limit]
        items = [json.loads(line) for line in lines]
        template = get_template("qwen25-math-cot")
        small, large = (LlamaCppBackend(args.models / name, n_threads=1, name=name,
                                        step_delimiter=template.delimiter, prompt_template=template.format)
                        for name in (SMALL, LARGE))
        cascade = Cascade(models=[small, large], gate=AlwaysSmall())
        options = SolveOptions(max_steps=24, max_step_tokens=160)
        with Grader() as grader, rows_path.open("a") as sink:
            for item in items:
                if item["id"] in done:
                    continue
                row = run_problem(cascade, large, grader, item, options)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows.append(row)
                print(f"{item['id']}: small {row['small_correct']} large {row['large_correct']} "
                      f"{len(row['steps'])} steps {row['seconds']:.0f} s", flush=True)
    result = report(rows, args.out, command)
    print(json.dumps({k: v for k, v in result.items() if k != "auroc"}, indent=1))


if __name__ == "__main__":
    main()
