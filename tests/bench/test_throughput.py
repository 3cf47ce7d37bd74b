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
    runner = Cascade.from_pretrained(small=tiny_dirs[0], large=tiny_dirs[2], step_delimiter="\n",
                                     gate=ConfidenceGate(threshold=0.65),
                                     options=SolveOptions(max_steps=3, max_step_tokens=6))
    problems = [f"{a}=1{k};?{a}" for k, a in enumerate("abcdef")]
    runs = run_benchmark(problems, [1, 3], runner, progress=lambda line: None)
    assert [(r.mode, r.concurrency) for r in runs] == [("solve", 1), ("solve_many", 1), ("solve_many", 3)]
    for run in runs:
        assert run.same_traces and run.problems == len(problems)
        assert len(run.latencies) == len(problems) and all(0 < t <= run.wall_seconds for t in run.latencies)
    # Concurrency 3 really batched the small tier; concurrency 1 never did.
    assert runs[1].mean_batch["small"] == 1.0 and runs[2].mean_batch["small"] > 1.0
    meta = {"command": "test", "commit": "abc", "date": "now", "n": len(problems), "torch_threads": 1,
            "machine": "test", "models": "tiny", "gate": "g"}
    report = write_report(runs, tmp_path, meta)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["runs"][0]["speedup"] == pytest.approx(1.0)
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    table = (tmp_path / "report.md").read_text()
    assert table.count("| solve_many |") == 2 and "Command: `test`" in table


def test_timed_backend_records_first_call_and_release(tiny_dirs):
    from decoding import HFBackend, StepRequest

    timed = TimedBackend(HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"))
    timed.next_steps([StepRequest("a", "q=1;?q", "", 3), StepRequest("b", "q=2;?q", "", 3)])
    timed.next_steps([StepRequest("a", "q=1;?q", "x", 3)])
    first = dict(timed.first_call)
    timed.release("a")
    assert timed.batch_sizes == [2, 1] and set(first) == {"a", "b"}
    assert timed.released["a"] >= first["a"] and "b" not in timed.released
