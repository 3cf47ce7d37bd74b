"""Concurrency of `decoding.LlamaCppBackend`: one engine driven from two threads (its lock
serializes them) vs two engines (two tiers) driven from two threads (llama_decode runs
without the GIL, so they overlap), against running the same steps one after another.

    python runs/real_pair/concurrency.py --model ~/.cache/stepcascade/models/SmolLM2-135M-Instruct.Q4_1.gguf

Prints one JSON object: wall seconds of each arrangement and whether every arrangement
wrote the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from decoding import LlamaCppBackend, StepRequest  # noqa: E402

PROBLEMS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
            "A train travels 60 km in 1.5 hours. What is its average speed in km/h?",
            "What is 12 + 30? Explain step by step.",
            "A shop sells pens at 2 dollars each. How much do 7 pens cost?"]


def run(backend: LlamaCppBackend, indices: list[int], tokens: int, tag: str, out: dict) -> None:
    for k in indices:
        step = backend.next_steps([StepRequest(f"{tag}{k}", PROBLEMS[k], "", tokens)])[0]
        backend.release(f"{tag}{k}")
        out[k] = step.token_ids


def timed_threads(jobs) -> float:
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per engine")
    args = parser.parse_args()
    first = LlamaCppBackend(args.model, n_ctx=1024, n_threads=args.threads)
    second = LlamaCppBackend(args.model, n_ctx=1024, n_threads=args.threads)
    half, other = [0, 1], [2, 3]
    results: dict = {"model": str(args.model), "tokens_per_step": args.tokens, "llama_threads_per_engine": args.threads}
    outputs: dict[str, dict] = {name: {} for name in ("sequential", "one_engine_two_threads", "two_engines_two_threads")}
    started = time.perf_counter()
    run(first, half + other, args.tokens, "s", outputs["sequential"])
    results["sequential_s"] = time.perf_counter() - started
    results["one_engine_two_threads_s"] = timed_threads([(first, half, args.tokens, "a", outputs["one_engine_two_threads"]),
                                                         (first, other, args.tokens, "b", outputs["one_engine_two_threads"])])
    results["two_engines_two_threads_s"] = timed_threads([(first, half, args.tokens, "c", outputs["two_engines_two_threads"]),
                                                          (second, other, args.tokens, "d", outputs["two_engines_two_threads"])])
    results["same_tokens"] = len({json.dumps([v[k] for k in range(4)]) for v in outputs.values()}) == 1
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
