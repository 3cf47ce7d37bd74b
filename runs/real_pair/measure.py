"""Measure the candidate real models through `decoding.LlamaCppBackend`: prefill and
decode speed, and GSM8K accuracy on the first N *train* problems (greedy, chat template,
steps separated by blank lines, "The answer is N." at the end, graded by bench.grading).

    python runs/real_pair/measure.py --models qwen2.5-coder-1.5b --problems 30 --threads 1

Models are the keys of runs/fetch_models.py (looked up under --models-dir) or .gguf paths.
Each problem is solved step by step through the Backend protocol (`next_steps` with the
accepted steps as context, as the cascade runtime calls it), so the per-step prefill
counts are the backend's own; one JSON line per problem goes to records_<model>.jsonl and
the summary so far to measurements_<model>.json (rewritten after each problem).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.grading import extract_final_answer, grade  # noqa: E402
from decoding import LlamaCppBackend, ScoreRequest, StepRequest  # noqa: E402

MODELS_DIR = Path("~/.cache/stepcascade/models").expanduser()
FILES = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
TRAIN = Path("/work/shared/data/gsm8k_train.jsonl")
INSTRUCTION = ("Solve the problem step by step. Put a blank line between steps. "
               "End with \"The answer is N.\" where N is the final number.")


def user_message(question: str) -> str:
    return f"{question}\n\n{INSTRUCTION}"


def load_problems(path: Path, count: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(count), handle)]


def solve(backend: LlamaCppBackend, request_id: str, problem: str, *, max_steps: int, max_step_tokens: int,
          max_tokens: int) -> dict:
    """Greedy steps until EOS, a stated answer, or a cap; what the runtime's `small` policy does."""
    context = ""
    steps = 0
    generated = prefill = 0
    decode_seconds = 0.0
    stop = "steps"
    # The prompt's prefill, on its own (a score of no text only catches up), timed apart from decoding.
    warm = backend.score_steps([ScoreRequest(request_id, problem, "", "")])[0]
    prompt_tokens = warm.prefill_tokens
    prefill_seconds = warm.seconds
    while steps < max_steps:
        budget = min(max_step_tokens, max_tokens - generated)
        if budget < 1:
            stop = "tokens"
            break
        out = backend.next_steps([StepRequest(request_id, problem, context, budget)])[0]
        steps += 1
        generated += out.generated_tokens
        prefill += out.prefill_tokens
        decode_seconds += out.seconds
        context += out.text
        if out.stop_reason == "eos":
            stop = "eos"
            break
        if extract_final_answer(out.text) is not None:
            stop = "answer"
            break
        if out.stop_reason == "max_tokens" and not context.endswith(backend.info.step_delimiter):
            context += backend.info.step_delimiter  # the runtime closes a step cut at its limit
    backend.release(request_id)
    return {"text": context, "steps": steps, "generated": generated, "prompt_tokens": prompt_tokens,
            "step_prefill": prefill, "stop": stop,
            "prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds}


def summarize(key: str, backend: LlamaCppBackend, path: Path, load_seconds: float, rows: list[dict]) -> dict:
    decoded = sum(r["generated"] for r in rows)
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    return {
        "model": key, "file": str(path), "name": backend.metadata.get("general.name"),
        "num_parameters": backend.info.num_parameters, "fingerprint": backend.info.fingerprint,
        "threads": backend.n_threads, "load_seconds": round(load_seconds, 2),
        "problems": len(rows), "correct": sum(r["correct"] for r in rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "no_answer": sum(r["predicted"] is None for r in rows),
        "cut_at_token_cap": sum(r["stop"] in ("tokens", "steps") and r["predicted"] is None for r in rows),
        "mean_generated_tokens": decoded / len(rows),
        "median_steps": statistics.median(r["steps"] for r in rows),
        "decode_ms_per_token": 1000 * sum(r["decode_seconds"] for r in rows) / max(1, decoded),
        "prefill_ms_per_token": 1000 * sum(r["prefill_seconds"] for r in rows) / max(1, prompt_tokens),
        "mean_prompt_tokens": prompt_tokens / len(rows),
        # Tokens the steps after the prompt had to prefill (the cache held the rest): the
        # delimiter a step cut at its limit gets, nothing else.
        "step_prefill_tokens_per_step": sum(r["step_prefill"] for r in rows) / max(1, sum(r["steps"] for r in rows)),
        "seconds_per_problem": sum(r["prefill_seconds"] + r["decode_seconds"] for r in rows) / len(rows),
    }


def measure(key: str, path: Path, problems: list[dict], args, records, out: Path) -> dict:
    """Solve the problems one by one; the summary so far is rewritten to `out` after each."""
    started = time.perf_counter()
    backend = LlamaCppBackend(path, n_ctx=args.n_ctx, n_threads=args.threads, name=key)
    load_seconds = time.perf_counter() - started
    rows = []
    summary: dict = {}
    for k, example in enumerate(problems):
        result = solve(backend, f"{key}-{k}", user_message(example["problem"]), max_steps=args.max_steps,
                       max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens)
        predicted = extract_final_answer(result["text"])
        correct = grade(result["text"], example["answer"], "gsm8k")
        row = {"model": key, "id": example["id"], "answer": example["answer"], "predicted": predicted,
               "correct": bool(correct), **result}
        rows.append(row)
        records.write(json.dumps(row) + "\n")
        records.flush()
        print(f"{key} {k + 1}/{len(problems)} correct={correct} predicted={predicted!r} answer={example['answer']} "
              f"tokens={result['generated']} stop={result['stop']} "
              f"{1000 * result['decode_seconds'] / max(1, result['generated']):.1f} ms/token", flush=True)
        summary = summarize(key, backend, path, load_seconds, rows)
        summary["settings"] = {k: getattr(args, k) for k in ("problems", "threads", "n_ctx", "max_steps",
                                                              "max_step_tokens", "max_tokens")}
        summary["settings"].update(data=str(args.data), instruction=INSTRUCTION)
        out.write_text(json.dumps(summary, indent=2) + "\n")
    backend.close()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FILES))
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent,
                        help="measurements_<model>.json and records_<model>.jsonl go here")
    args = parser.parse_args()
    problems = load_problems(args.data, args.problems)
    for key in args.models:
        path = Path(key) if key.endswith(".gguf") else args.models_dir / FILES[key]
        name = Path(key).stem if key.endswith(".gguf") else key
        with (args.out_dir / f"records_{name}.jsonl").open("w") as records:
            summary = measure(name, path, problems, args, records, args.out_dir / f"measurements_{name}.json")
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
