"""bench.throughput on a tiny config: the report is complete and the runs agree."""

from __future__ import annotations

import json

import pytest

from bench.throughput import TimedBackend, percentile, run_benchmark, write_report
from cascade import Cascade, ConfidenceGate, SolveOptions


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0


def test_benchmark_runs_and_reports_on_the_tiny_pair(tiny_dirs, tmp_path):
    from decoding import HFBackend, ProcessBackend

    gate = ConfidenceGate(threshold=0.65)
    options = SolveOptions(max_steps=3, max_step_tokens=6)
    runner = Cascade.from_pretrained(small=tiny_dirs[0], large=tiny_dirs[2], step_delimiter="\n",
                                     gate=gate, options=options)
    problems = [f"{a}=1{k};?{a}" for k, a in enumerate("abcdef")]
    with ProcessBackend(tiny_dirs[2], step_delimiter="\n") as large:
        isolated = Cascade(small=HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"), large=large,
                           gate=gate, options=options)
        runs = run_benchmark(problems, [1, 3], runner, isolated, progress=lambda line: None)
    assert [(r.setup, r.mode, r.concurrency) for r in runs] == [
        ("in-process", "solve", 1), ("in-process", "solve_many", 1), ("in-process", "solve_many", 3),
        ("isolated", "solve", 1), ("isolated", "solve_many", 1), ("isolated", "solve_many", 3),
        ("in-process", "solve", 1)]
    for run in runs:
        assert run.same_traces and run.problems == len(problems)
        assert len(run.latencies) == len(problems) and all(0 < t <= run.wall_seconds for t in run.latencies)
    # Concurrency 3 really batched the small tier; concurrency 1 never did.
    assert runs[1].mean_batch["small"] == 1.0 and runs[2].mean_batch["small"] > 1.0
    assert runs[5].mean_batch["large"] >= 1.0  # the process backend was called through the timer
    meta = {"command": "test", "commit": "abc", "date": "now", "n": len(problems), "torch_threads": 1,
            "machine": "test", "models": "tiny", "gate": "g"}
    report = write_report(runs, tmp_path, meta)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    mean = (runs[0].throughput + runs[-1].throughput) / 2
    assert saved["baseline_throughput"] == pytest.approx(mean)
    assert saved["runs"][0]["speedup"] == pytest.approx(runs[0].throughput / mean)
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    table = (tmp_path / "report.md").read_text()
    assert table.count("| solve_many |") == 4 and "Command: `test`" in table


def test_timed_backend_records_first_call_and_release(tiny_dirs):
    from decoding import HFBackend, StepRequest

    timed = TimedBackend(HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"))
    timed.next_steps([StepRequest("a", "q=1;?q", "", 3), StepRequest("b", "q=2;?q", "", 3)])
    timed.next_steps([StepRequest("a", "q=1;?q", "x", 3)])
    first = dict(timed.first_call)
    timed.release("a")
    assert timed.batch_sizes == [2, 1] and set(first) == {"a", "b"}
    assert timed.released["a"] >= first["a"] and "b" not in timed.released
