"""Step generation through llama-cpp-python's OpenAI-compatible server vs in process
(`decoding.LlamaCppBackend`), same GGUF, same threads, same greedy steps.

    python runs/real_pair/server_vs_inprocess.py --model ~/.cache/stepcascade/models/X.gguf

The server is `python -m llama_cpp.server --model FILE --n_threads T --n_ctx C` (started
here on a free local port); each step is one /v1/completions request with the prompt text
(problem rendered with the file's chat template + steps so far), `stop=["\\n\\n"]`,
`logprobs=1`, `max_tokens`, as a cascade tier over OpenAIBackend would send it. The server
keeps one slot and reuses its prompt prefix across requests, so both sides prefill only
the new tokens when requests of one problem follow each other. Problems run one after
another (a cascade with one request in flight); then both sides again with two problems
interleaved step by step (two requests in flight, as `solve_many` does), where the
server's single slot has to re-read the other request's prompt and the in-process
backend swaps KV states. Prints one JSON object with the timings.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from decoding import LlamaCppBackend, StepRequest  # noqa: E402

TRAIN = Path("/work/shared/data/gsm8k_train.jsonl")
INSTRUCTION = ("Solve the problem step by step. Put a blank line between steps. "
               "End with \"The answer is N.\" where N is the final number.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                                "--port", str(port), "--n_threads", str(threads), "--n_ctx", str(n_ctx),
                                "--logits_all", "true", "--verbose", "false"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the llama_cpp server did not start within 120 s")


def run_server(url: str, prompts: list[str], steps: int, max_tokens: int, interleave: bool) -> dict:
    contexts = [""] * len(prompts)
    tokens = 0
    seconds = 0.0
    texts = [[] for _ in prompts]
    order = [(s, k) for s in range(steps) for k in range(len(prompts))] if interleave else \
        [(s, k) for k in range(len(prompts)) for s in range(steps)]
    with httpx.Client(timeout=300) as client:
        for _, k in order:
            body = {"prompt": prompts[k] + contexts[k], "max_tokens": max_tokens, "temperature": 0.0,
                    "stop": ["\n\n"], "logprobs": 1}
            started = time.perf_counter()
            data = client.post(f"{url}/v1/completions", json=body).json()
            seconds += time.perf_counter() - started
            choice = data["choices"][0]
            tokens += data["usage"]["completion_tokens"]
            text = choice["text"] + ("\n\n" if choice["finish_reason"] == "stop" else "")
            texts[k].append(text)
            contexts[k] += text if text.endswith("\n\n") else text + "\n\n"
    return {"seconds": seconds, "tokens": tokens, "ms_per_token": 1000 * seconds / max(1, tokens), "texts": texts}


def run_inprocess(backend: LlamaCppBackend, problems: list[str], steps: int, max_tokens: int,
                  interleave: bool, tag: str) -> dict:
    contexts = [""] * len(problems)
    tokens = prefill = 0
    seconds = 0.0
    texts = [[] for _ in problems]
    order = [(s, k) for s in range(steps) for k in range(len(problems))] if interleave else \
        [(s, k) for k in range(len(problems)) for s in range(steps)]
    for _, k in order:
        started = time.perf_counter()
        out = backend.next_steps([StepRequest(f"{tag}{k}", problems[k], contexts[k], max_tokens)])[0]
        seconds += time.perf_counter() - started
        tokens += out.generated_tokens
        prefill += out.prefill_tokens
        texts[k].append(out.text)
        contexts[k] += out.text if out.text.endswith("\n\n") else out.text + "\n\n"
    for k in range(len(problems)):
        backend.release(f"{tag}{k}")
    return {"seconds": seconds, "tokens": tokens, "prefill_tokens": prefill,
            "ms_per_token": 1000 * seconds / max(1, tokens), "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    with TRAIN.open() as handle:
        questions = [json.loads(line)["problem"] for _, line in zip(range(args.problems), handle)]
    problems = [f"{q}\n\n{INSTRUCTION}" for q in questions]
    backend = LlamaCppBackend(args.model, n_ctx=args.n_ctx, n_threads=args.threads)
    prompts = [backend.render_prompt(p)[0] for p in problems]
    results: dict = {"model": str(args.model), "threads": args.threads, "problems": args.problems,
                     "steps": args.steps, "max_tokens": args.max_tokens}
    process, url = start_server(args.model, args.threads, args.n_ctx)
    try:
        # Alternate the two sides so that machine load hits both alike.
        for interleave in (False, True):
            label = "interleaved" if interleave else "sequential"
            results[f"inprocess_{label}"] = run_inprocess(backend, problems, args.steps, args.max_tokens,
                                                          interleave, label)
            results[f"server_{label}"] = run_server(url, prompts, args.steps, args.max_tokens, interleave)
    finally:
        process.terminate()
        process.wait(30)
    for label in ("sequential", "interleaved"):
        ours, theirs = results[f"inprocess_{label}"], results[f"server_{label}"]
        results[f"same_texts_{label}"] = sum(a == b for x, y in zip(ours["texts"], theirs["texts"])
                                             for a, b in zip(x, y))
        results[f"speedup_inprocess_{label}"] = theirs["seconds"] / ours["seconds"]
        del ours["texts"], theirs["texts"]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
