"""Throughput and per-request latency of `Cascade.solve_many` against sequential `solve`.

    python -m bench.throughput --n 128 --concurrency 1 4 16 64 --out bench/results/throughput

The embedded pair on the HF backend with the default gate, the same problems (the first
`n` of the embedded test split) in every run, one run each, in this order: sequential
`solve` (one request at a time), then `solve_many` at each concurrency. Throughput is
problems per wall second of the whole run. Per-request latency: for `solve`, its wall
time; under `solve_many`, from the request's first model call to the end of its step
machine (when its state is released), so time spent waiting for a concurrency slot is
not in it. Every run must give the same per-request traces as the sequential one
(greedy decoding); the report says whether they did.

torch runs with `--threads` intra-op threads (default 1) in every run, so the ratios
measure batching, not extra cores. The machine's load average before and after each run
is recorded: on a shared machine the absolute figures move with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.datasets import load_dataset
from bench.pair_report import _git_commit
from cascade import Cascade, Result, embedded_cascade

__all__ = ["RunStats", "TimedBackend", "main", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class TimedBackend:
    """A `decoding.Backend` that forwards to another and records, per request id, when
    its first call arrived and when its state was released, and each batch's size."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        self.first_call: dict[str, float] = {}
        self.released: dict[str, float] = {}
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()  # the driver calls backends from a worker thread

    def _seen(self, requests) -> None:
        now = time.perf_counter()
        with self._lock:
            self.batch_sizes.append(len(requests))
            for request in requests:
                self.first_call.setdefault(request.request_id, now)

    def next_steps(self, requests):
        self._seen(requests)
        return self.inner.next_steps(requests)

    def score_steps(self, requests):
        self._seen(requests)
        return self.inner.score_steps(requests)

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        with self._lock:
            self.first_call.setdefault(request_id, time.perf_counter())
        return self.inner.prefill_bound(request_id, problem, context)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)
        with self._lock:
            self.released[request_id] = time.perf_counter()

    def reset(self) -> None:
        self.first_call.clear()
        self.released.clear()
        self.batch_sizes.clear()


@dataclass(frozen=True)
class RunStats:
    """One run: `mode` "solve" (sequential) or "solve_many" at `concurrency`."""

    mode: str
    concurrency: int
    problems: int
    wall_seconds: float
    latencies: tuple[float, ...] = field(repr=False)  # seconds, one per problem
    mean_batch: dict[str, float]  # tier name -> mean rows per next_steps call
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    same_traces: bool  # every result equals the sequential run's

    @property
    def throughput(self) -> float:
        return self.problems / self.wall_seconds

    def to_json(self) -> dict:
        return {"mode": self.mode, "concurrency": self.concurrency, "problems": self.problems,
                "wall_seconds": self.wall_seconds, "throughput": self.throughput,
                "latency_p50": percentile(self.latencies, 50), "latency_p95": percentile(self.latencies, 95),
                "latency_mean": sum(self.latencies) / len(self.latencies),
                "mean_batch": self.mean_batch, "load_before": self.load_before,
                "load_after": self.load_after, "same_traces": self.same_traces}


def _trace(result: Result) -> tuple:
    return (result.answer, result.stop_reason,
            tuple((s.text, s.author, tuple(u.generated_tokens for u in s.usage)) for s in result.steps))


def run_benchmark(problems: list[str], concurrencies: Sequence[int], runner: Cascade | None = None,
                  progress=print) -> list[RunStats]:
    """Sequential `solve`, then `solve_many` at each concurrency, on the same problems."""
    base = runner or embedded_cascade()
    timed = [TimedBackend(model) for model in base.models]
    cascade = Cascade(models=timed, gates=base.gates, options=base.options, tier_names=base.tier_names)
    cascade.solve_many(problems[: min(4, len(problems))], concurrency=4)  # warm-up: caches, threads

    def batches() -> dict[str, float]:
        return {name: (sum(t.batch_sizes) / len(t.batch_sizes) if t.batch_sizes else 0.0)
                for name, t in zip(cascade.tier_names, timed)}

    runs: list[RunStats] = []
    for model in timed:
        model.reset()
    load_before = os.getloadavg()
    latencies, sequential = [], []
    begin = time.perf_counter()
    for problem in problems:
        start = time.perf_counter()
        sequential.append(cascade.solve(problem))
        latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - begin
    runs.append(RunStats("solve", 1, len(problems), wall, tuple(latencies), batches(), load_before,
                         os.getloadavg(), True))
    progress(f"solve (sequential): {len(problems) / wall:.2f} problems/s")
    reference = [_trace(r) for r in sequential]
    for concurrency in concurrencies:
        for model in timed:
            model.reset()
        load_before = os.getloadavg()
        begin = time.perf_counter()
        results = cascade.solve_many(problems, concurrency=concurrency)
        wall = time.perf_counter() - begin
        ids = set().union(*(t.first_call for t in timed))  # one request id per problem
        latencies = [max(t.released.get(i, 0.0) for t in timed) -
                     min(t.first_call.get(i, math.inf) for t in timed) for i in ids]
        same = [_trace(r) for r in results] == reference
        runs.append(RunStats("solve_many", concurrency, len(problems), wall, tuple(latencies), batches(),
                             load_before, os.getloadavg(), same))
        progress(f"solve_many concurrency={concurrency}: {len(problems) / wall:.2f} problems/s, "
                 f"same traces: {same}")
    return runs


def write_report(runs: list[RunStats], out: Path, meta: dict) -> dict:
    """report.json, report.md and throughput.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    base = runs[0].throughput
    report = {**meta, "runs": [r.to_json() | {"speedup": r.throughput / base} for r in runs]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    tiers = list(runs[0].mean_batch)
    lines = [f"# `solve_many` throughput vs sequential `solve` ({meta['n']} embedded test problems)", "",
             f"Command: `{meta['command']}`  ", f"Commit: `{meta['commit']}`, {meta['date']}  ",
             f"Machine: {meta['machine']}; torch threads: {meta['torch_threads']}  ",
             f"Models: {meta['models']}; gate: `{meta['gate']}`; greedy", "",
             "| run | concurrency | throughput (problems/s) | speedup | p50 latency (s) | p95 latency (s) | "
             + " | ".join(f"mean {t} batch" for t in tiers) + " | same traces | load avg before / after |",
             "|---|---|---|---|---|---|" + "---|" * len(tiers) + "---|---|"]
    for r, row in zip(runs, report["runs"]):
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.throughput:.2f} | {row['speedup']:.2f}x | "
            f"{row['latency_p50']:.3f} | {row['latency_p95']:.3f} | "
            + " | ".join(f"{r.mean_batch[t]:.1f}" for t in tiers)
            + f" | {'yes' if r.same_traces else 'NO'} | {r.load_before[0]:.1f} / {r.load_after[0]:.1f} |")
    lines += ["", ("One run each, in table order. Latency: `solve` = its wall time; `solve_many` = from "
                   "the request's first model call to the end of its step machine (slot wait excluded); "
                   "nearest-rank percentiles. Speedup = throughput / sequential throughput, same process. "
                   "Load average: 1-minute, of the whole (shared) machine.")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out / "throughput.png", meta)
    return report


def _plot(runs: list[RunStats], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = [r for r in runs if r.mode == "solve_many"]
    xs = [r.concurrency for r in many]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r.throughput for r in many], "o-", label="solve_many")
    left.axhline(runs[0].throughput, color="gray", linestyle="--", label="sequential solve")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("concurrency")
    left.set_ylabel("problems / s")
    left.set_title("throughput")
    left.legend()
    right.plot(xs, [percentile(r.latencies, 50) for r in many], "o-", label="p50")
    right.plot(xs, [percentile(r.latencies, 95) for r in many], "s-", label="p95")
    right.axhline(percentile(runs[0].latencies, 50), color="gray", linestyle="--", label="sequential p50")
    right.set_xscale("log", base=2)
    right.set_xticks(xs, [str(x) for x in xs])
    right.set_xlabel("concurrency")
    right.set_ylabel("seconds per request")
    right.set_title("per-request latency")
    right.legend()
    fig.suptitle(f"embedded pair, HF backend, {meta['n']} problems, torch threads = {meta['torch_threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="problems (first n of the embedded test split)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="bench/results/throughput")
    args = parser.parse_args(argv)
    if args.n < 1 or args.threads < 1 or min(args.concurrency) < 1:
        parser.error("--n, --threads and every --concurrency must be >= 1")
    torch.set_num_threads(args.threads)
    problems = [example.problem for example in load_dataset("embedded", limit=args.n)]
    runner = embedded_cascade()
    meta = {"command": "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n": len(problems),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), "
                       f"Python {platform.python_version()}, torch {torch.__version__}",
            "models": ", ".join(m.info.name for m in runner.models), "gate": repr(runner.gates[0])}
    runs = run_benchmark(problems, args.concurrency, runner, progress=lambda line: print(line, flush=True))
    report = write_report(runs, Path(args.out), meta)
    print((Path(args.out) / "report.md").read_text())
    return report


if __name__ == "__main__":
    main()
