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
import dataclasses
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
from bench.provenance import package_commit
from cascade import Cascade, Result, embedded_cascade
from decoding import Backend

__all__ = ["RunStats", "TimedBackend", "main", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class TimedBackend(Backend):
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

    # The runtime drives this backend as it drives the wrapped one (a process or server
    # keeps several batches in flight): native_async is the wrapped backend's.
    @property
    def native_async(self) -> bool:  # type: ignore[override]
        return self.inner.native_async

    async def anext_steps(self, requests):
        self._seen(requests)
        return await self.inner.anext_steps(requests)

    async def ascore_steps(self, requests):
        self._seen(requests)
        return await self.inner.ascore_steps(requests)

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
    same_traces: bool  # every result equals the first sequential run's
    setup: str = "in-process"  # or "isolated": tiers above the first in processes of their own

    @property
    def throughput(self) -> float:
        return self.problems / self.wall_seconds

    def to_json(self) -> dict:
        return {"setup": self.setup, "mode": self.mode, "concurrency": self.concurrency,
                "problems": self.problems,
                "wall_seconds": self.wall_seconds, "throughput": self.throughput,
                "latency_p50": percentile(self.latencies, 50), "latency_p95": percentile(self.latencies, 95),
                "latency_mean": sum(self.latencies) / len(self.latencies),
                "mean_batch": self.mean_batch, "load_before": self.load_before,
                "load_after": self.load_after, "same_traces": self.same_traces}


def _trace(result: Result) -> tuple:
    return (result.answer, result.stop_reason,
            tuple((s.text, s.author, tuple(u.generated_tokens for u in s.usage)) for s in result.steps))


def _timed(base: Cascade) -> Cascade:
    models = [TimedBackend(model) for model in base.models]
    return Cascade(models=models, gates=base.gates, options=base.options, tier_names=base.tier_names)


def _measure(setup: str, cascade: Cascade, problems: list[str],
             concurrency: int | None) -> tuple[RunStats, list]:
    """One run: sequential `solve` (concurrency None) or `solve_many`; its stats and traces."""
    timed = cascade.models
    for model in timed:
        model.reset()
    load_before = os.getloadavg()
    begin = time.perf_counter()
    latencies: list[float] = []
    if concurrency is None:
        results = []
        for problem in problems:
            start = time.perf_counter()
            results.append(cascade.solve(problem))
            latencies.append(time.perf_counter() - start)
    else:
        results = cascade.solve_many(problems, concurrency=concurrency)
    wall = time.perf_counter() - begin
    if concurrency is not None:
        ids = set().union(*(t.first_call for t in timed))  # one request id per problem
        latencies = [max(t.released.get(i, 0.0) for t in timed) -
                     min(t.first_call.get(i, math.inf) for t in timed) for i in ids]
    batches = {name: (sum(t.batch_sizes) / len(t.batch_sizes) if t.batch_sizes else 0.0)
               for name, t in zip(cascade.tier_names, timed, strict=False)}
    mode = "solve" if concurrency is None else "solve_many"
    stats = RunStats(mode, concurrency or 1, len(problems), wall, tuple(latencies), batches,
                     load_before, os.getloadavg(), True, setup)
    return stats, [_trace(r) for r in results]


def run_benchmark(problems: list[str], concurrencies: Sequence[int], runner: Cascade | None = None,
                  isolated: Cascade | None = None, progress=print) -> list[RunStats]:
    """Sequential `solve`, then `solve_many` at each concurrency, on the same problems; then
    the same with `isolated` (the same models, tiers above the first each in a process of
    its own); then sequential in-process `solve` again (a machine's speed drifts)."""
    base = runner or embedded_cascade()
    plan: list[tuple[str, Cascade, int | None]] = []
    setups = [("in-process", _timed(base))] + ([("isolated", _timed(isolated))] if isolated else [])
    for setup, cascade in setups:
        cascade.solve_many(problems[: min(4, len(problems))], concurrency=4)  # warm-up: caches, threads
        plan += [(setup, cascade, None)] + [(setup, cascade, c) for c in concurrencies]
    plan.append(plan[0])
    runs: list[RunStats] = []
    reference = None
    for setup, cascade, concurrency in plan:
        stats, traces = _measure(setup, cascade, problems, concurrency)
        reference = reference or traces
        stats = dataclasses.replace(stats, same_traces=traces == reference)
        runs.append(stats)
        progress(f"{setup} {stats.mode} concurrency={stats.concurrency}: {stats.throughput:.2f} problems/s, "
                 f"same traces: {stats.same_traces}")
    return runs


def baseline_throughput(runs: Sequence[RunStats]) -> float:
    """Sequential in-process throughput: the mean of its runs (first and last of a report)."""
    sequential = [r.throughput for r in runs if r.mode == "solve" and r.setup == "in-process"]
    return sum(sequential) / len(sequential)


def write_report(runs: list[RunStats], out: Path, meta: dict) -> dict:
    """report.json, report.md and throughput.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    base = baseline_throughput(runs)
    report = {**meta, "baseline_throughput": base,
              "runs": [r.to_json() | {"speedup": r.throughput / base} for r in runs]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    tiers = list(runs[0].mean_batch)
    lines = [f"# `solve_many` throughput vs sequential `solve` ({meta['n']} embedded test problems)", "",
             f"Command: `{meta['command']}`  ", f"Commit: `{meta['commit']}`, {meta['date']}  ",
             f"Machine: {meta['machine']}; torch threads: {meta['torch_threads']} per process  ",
             f"Models: {meta['models']}; gate: `{meta['gate']}`; greedy", "",
             "Setups: **in-process** = every model in this process (`HFBackend`), each driven from a "
             "worker thread of its own; **isolated** = the first tier in this process, every tier "
             "above it in a process of its own (`decoding.ProcessBackend`), so the tiers' Python work "
             "does not share one GIL.", "",
             "| setup | run | concurrency | throughput (problems/s) | speedup | p50 latency (s) "
             "| p95 latency (s) | "
             + " | ".join(f"mean {t} batch" for t in tiers) + " | same traces | load avg before / after |",
             "|---|---|---|---|---|---|---|" + "---|" * len(tiers) + "---|---|"]
    for r, row in zip(runs, report["runs"], strict=False):
        lines.append(
            f"| {r.setup} | {r.mode} | {r.concurrency} | {r.throughput:.2f} | {row['speedup']:.2f}x | "
            f"{row['latency_p50']:.3f} | {row['latency_p95']:.3f} | "
            + " | ".join(f"{r.mean_batch[t]:.1f}" for t in tiers)
            + f" | {'yes' if r.same_traces else 'NO'} | {r.load_before[0]:.1f} / {r.load_after[0]:.1f} |")
    lines += ["", ("One run each, in table order; the first and last rows are the same sequential "
                   f"in-process run, and speedup = throughput / their mean ({base:.2f} problems/s). "
                   "Latency: `solve` = its wall time; `solve_many` = from the request's first model call "
                   "to the end of its step machine (slot wait excluded); nearest-rank percentiles. "
                   "Same traces: every answer, step text, author and token count equals the first run's. "
                   "Mean batch: rows per call the runtime sent to a tier; an isolated tier's process "
                   "merges the calls queued while it was busy into larger batches of its own. "
                   "Load average: 1-minute, of the whole machine.")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out / "throughput.png", meta)
    return report


def _plot(runs: list[RunStats], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_throughput(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sequential_p50 = percentile(runs[0].latencies, 50)
    for setup, marker in (("in-process", "o"), ("isolated", "s")):
        many = [r for r in runs if r.mode == "solve_many" and r.setup == setup]
        if not many:
            continue
        xs = [r.concurrency for r in many]
        left.plot(xs, [r.throughput for r in many], marker + "-", label=f"solve_many, {setup}")
        right.plot(xs, [percentile(r.latencies, 50) for r in many], marker + "-", label=f"p50, {setup}")
        right.plot(xs, [percentile(r.latencies, 95) for r in many], marker + ":", label=f"p95, {setup}")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel("concurrency")
    left.axhline(base, color="gray", linestyle="--", label="sequential solve")
    left.axhline(4 * base, color="gray", linestyle=":", label="4x sequential")
    left.set_ylabel("problems / s")
    left.set_title("throughput")
    left.legend(fontsize=8)
    right.axhline(sequential_p50, color="gray", linestyle="--", label="sequential p50")
    right.set_ylabel("seconds per request")
    right.set_title("per-request latency")
    right.legend(fontsize=8)
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
    parser.add_argument("--no-isolated", action="store_true",
                        help="skip the setup with the upper tiers in processes of their own")
    args = parser.parse_args(argv)
    if args.n < 1 or args.threads < 1 or min(args.concurrency) < 1:
        parser.error("--n, --threads and every --concurrency must be >= 1")
    torch.set_num_threads(args.threads)
    problems = [example.problem for example in load_dataset("embedded", limit=args.n)]
    runner = embedded_cascade()
    isolated = None if args.no_isolated else embedded_cascade(isolate=True, threads=args.threads)
    meta = {"command": "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": package_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n": len(problems),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"Python {platform.python_version()}, torch {torch.__version__}",
            "models": ", ".join(m.info.name for m in runner.models), "gate": repr(runner.gates[0])}
    runs = run_benchmark(problems, args.concurrency, runner, isolated,
                         progress=lambda line: print(line, flush=True))
    report = write_report(runs, Path(args.out), meta)
    print((Path(args.out) / "report.md").read_text())
    return report


if __name__ == "__main__":
    main()
