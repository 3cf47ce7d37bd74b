"""cascade.calibrate: the memoized sweep, the Calibration file, serving from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FakeBackend, counting_script

import calibration as cal
from cascade import (
    Calibration,
    CalibrationFileError,
    Cascade,
    ConfidenceGate,
    ConfigError,
    SolveOptions,
    calibrate,
    sweep,
)
from cascade.calibrate import default_thresholds
from decoding import BackendError, HFBackend

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)
GRID = [(t,) for t in sorted(default_thresholds(11), reverse=True)]


def fake_cascade(steps=5, gate=None):
    small = FakeBackend("small", 100, counting_script(steps, confident=False))
    large = FakeBackend("large", 1000, counting_script(steps, confident=True))
    return Cascade(small, large, gate or ConfidenceGate(0.5), options=OPTIONS)


def test_sweep_equals_independent_runs_and_costs_less():
    cascade = fake_cascade()
    problems = [f"p{i}" for i in range(12)]
    swept = sweep(cascade, problems, GRID)
    for j, (threshold,) in enumerate(GRID):
        runs = [cascade.solve(p, gates=[ConfidenceGate(threshold)]) for p in problems]
        assert np.array_equal(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]
        assert np.array_equal(swept.escalation[:, j], [r.escalation_rate for r in runs])
    assert swept.executed_tokens < 0.5 * swept.independent_tokens


def test_sweep_on_real_models_forks_kv_caches_exactly(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    options = SolveOptions(max_steps=3, max_step_tokens=6)
    cascade = Cascade(small, large, ConfidenceGate(0.5), options=options)
    grid = [(0.9,), (0.6,), (0.3,), (0.0,)]
    problems = ["a=1;?a", "a=7;b=a+2;?b"]
    swept = sweep(cascade, problems, grid)
    for j, (threshold,) in enumerate(grid):
        runs = [cascade.solve(p, gates=[ConfidenceGate(threshold)]) for p in problems]
        assert np.allclose(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]
    assert not small._sessions and not large._sessions  # branches were released


def test_sweep_resumes_from_rows():
    cascade = fake_cascade()
    problems = [f"p{i}" for i in range(6)]
    rows: list[dict] = []
    first = sweep(cascade, problems[:3], GRID, on_row=rows.append)
    resumed = sweep(cascade, problems, GRID, rows=rows)
    full = sweep(cascade, problems, GRID)
    assert np.array_equal(resumed.costs, full.costs) and np.array_equal(first.costs, full.costs[:3])
    calls = cascade.models[0].calls
    with pytest.raises(ConfigError, match="do not match"):
        sweep(cascade, ["other"] + problems[1:], GRID, rows=rows)
    assert cascade.models[0].calls == calls  # refused before sweeping anything


def test_sweep_file_reuses_rows_only_while_their_problems_match(tmp_path):
    from cascade.calibrate import sweep_file

    cascade = fake_cascade()
    path = tmp_path / "sweep.jsonl"
    problems = [f"p{i}" for i in range(6)]
    reused = []
    sweep_file(cascade, problems[:4], GRID, path, on_resume=reused.append)
    assert reused == [] and len(path.read_text().splitlines()) == 5
    other = problems[:2] + ["x", "y", "z"]
    result = sweep_file(cascade, other, GRID, path, on_resume=reused.append)
    assert reused == [2]  # p0, p1 reused; the file is cut there and swept on
    assert [json.loads(line)["problem"] for line in path.read_text().splitlines()[1:]] == other
    np.testing.assert_array_equal(result.costs, sweep(cascade, other, GRID).costs)
    sweep_file(cascade, other[:3], GRID, path, on_resume=reused.append)  # a shorter run: the file is kept
    assert reused[-1] == 3 and len(path.read_text().splitlines()) == 6


def _calibrated(tmp_path, **kw):
    cascade = fake_cascade()
    problems = [f"p{i}" for i in range(60)]
    result = calibrate(cascade, problems, budgets=[30, 60, 120], alpha=0.2, delta=0.2,
                       thresholds=[g[0] for g in GRID], **kw)
    return cascade, result


def test_calibration_certifies_and_serves_thresholds(tmp_path):
    cascade, result = _calibrated(tmp_path, objective="max_escalation")
    assert len({tuple(e["thresholds"]) for e in result.entries}) > 1  # budgets get different thresholds
    assert [e["budget"] for e in result.entries] == [30, 60, 120]
    for entry in result.entries:
        if entry["index"] is not None:
            # Re-check the certificate from the recorded curves' source: the chosen index
            # must be inside the certified set and its statement must name the budget.
            assert entry["index"] in entry["certified"]
            assert f"P(cost > {entry['budget']:g})" in entry["statement"]
    path = result.save(tmp_path / "calib.json")
    loaded = Calibration.load(path)
    assert loaded == result
    served = Cascade(models=cascade.models, gates=cascade.gates, options=OPTIONS, calibration=loaded)
    for budget in (35.0, 75.0, 500.0):
        entry = loaded.entry_for(budget)
        chosen = served.solve("p1", budget=budget)
        expected = cascade.solve("p1", budget=budget, gates=loaded.gates_for(budget))
        assert chosen.to_json()["steps"] == expected.to_json()["steps"]
        assert chosen.cost.total <= budget
        assert entry is None or entry["budget"] <= budget


def test_ltt_choice_matches_the_pure_function():
    cascade = fake_cascade()
    problems = [f"p{i}" for i in range(60)]
    swept = sweep(cascade, problems, GRID)
    result = calibrate(cascade, problems, budget=60, alpha=0.2, delta=0.2, swept=swept,
                       candidates=GRID, objective="max_escalation")
    selection = cal.select_ltt(swept.costs, 60, 0.2, 0.2, np.arange(len(GRID)))
    best = cal.choose_by_objective(selection, swept.escalation.mean(axis=0))
    assert result.entries[0]["index"] == best


def test_infeasible_single_budget_is_a_clear_error():
    cascade = fake_cascade()
    with pytest.raises(cal.InfeasibleBudgetError, match="cheapest"):
        calibrate(cascade, [f"p{i}" for i in range(60)], budget=1, alpha=0.2, delta=0.2)


def test_corrupt_edited_and_foreign_files_are_refused(tmp_path):
    cascade, result = _calibrated(tmp_path)
    path = result.save(tmp_path / "c.json")
    document = json.loads(path.read_text())
    document["calibration"]["alpha"] = 0.5
    (tmp_path / "edited.json").write_text(json.dumps(document))
    with pytest.raises(CalibrationFileError, match="checksum"):
        Calibration.load(tmp_path / "edited.json")
    (tmp_path / "torn.json").write_text(path.read_text()[:50])
    with pytest.raises(CalibrationFileError, match="not a calibration file"):
        Calibration.load(tmp_path / "torn.json")
    with pytest.raises(CalibrationFileError, match="no calibration file"):
        Calibration.load(tmp_path / "missing.json")
    other = fake_cascade()
    other.models[1].info = type(other.models[1].info)("large", "different", 1000, "\n")
    with pytest.raises(CalibrationFileError, match="made for models"):
        Cascade(models=other.models, gates=other.gates, calibration=result)


def test_bad_calibrate_arguments():
    cascade = fake_cascade()
    with pytest.raises(ConfigError, match="at least one problem"):
        calibrate(cascade, [], budget=10)
    with pytest.raises(ConfigError, match="budget"):
        calibrate(cascade, ["p"], budgets=[-1])
    with pytest.raises(ConfigError, match="method"):
        calibrate(cascade, ["p"] * 30, budget=100, method="magic")
    with pytest.raises(ConfigError, match="cost_max"):
        calibrate(cascade, ["p"] * 30, budget=100, method="risk")


def test_sweep_of_a_verify_gate_drafting_ahead_and_fixing_tokens_equals_independent_runs(tiny_dirs):
    """Calls sent together (draft_ahead) and token corrections replay in the shared sweep
    exactly as in independent runs: same costs, answers and escalation."""
    from cascade import VerifyGate

    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    options = SolveOptions(max_steps=3, max_step_tokens=6, draft_ahead=True)
    gate = VerifyGate(0.5, rewrite="token")
    cascade = Cascade(small, large, gate, options=options)
    grid = [(0.9,), (0.5,), (0.2,), (0.0,)]
    problems = ["a=1;?a", "a=7;b=a+2;?b"]
    swept = sweep(cascade, problems, grid)
    for j, (threshold,) in enumerate(grid):
        runs = [cascade.solve(p, gates=[VerifyGate(threshold, rewrite="token")]) for p in problems]
        assert np.allclose(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]
        assert np.array_equal(swept.escalation[:, j], [r.escalation_rate for r in runs])


class _CountingCalls:
    """A backend that records each generation call it runs (problem, context, max_tokens)."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def next_steps(self, requests):
        self.calls += [(r.problem, r.context, r.max_tokens) for r in requests]
        self.batches = getattr(self, "batches", 0) + 1
        if len(self.calls) > getattr(self, "fail_after", 1 << 30):
            raise BackendError("injected failure", self.info.name)
        return self.backend.next_steps(requests)


def test_sweep_runs_a_call_once_for_branches_reaching_it_by_other_histories_or_later(tiny_dirs):
    """Columns that escalated different steps but wrote the same text hold the same tokens,
    and a column that drafts before escalating reaches the large model's call a round after
    one that does not: each such call runs once (state_key/adopt and the sweep's memo),
    and every column still costs and answers what its independent run does."""
    small = _CountingCalls(HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"))
    large = _CountingCalls(HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n"))
    options = SolveOptions(max_steps=4, max_step_tokens=6)
    cascade = Cascade(small, large, ConfidenceGate(0.5), options=options)
    problems = ["a=1;?a", "a=7;b=a+2;?b", "a=3;b=a+4;c=b+1;?c"]
    swept = sweep(cascade, problems, GRID)
    assert len(large.calls) == len(set(large.calls)) and len(small.calls) == len(set(small.calls))
    assert swept.escalation.min() < swept.escalation.max()  # the columns did part
    assert not small._sessions and not large._sessions  # branches and memo snapshots released
    for j, (threshold,) in enumerate(GRID):
        runs = [cascade.solve(p, gates=[ConfidenceGate(threshold)]) for p in problems]
        assert np.allclose(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]


def test_a_sweep_whose_memo_overflows_still_equals_its_first_run(tiny_dirs, monkeypatch):
    """The memo of earlier rounds' calls is bounded: with room for one call the sweep runs
    more calls, releases what it evicts, and gives the same columns."""
    import importlib

    calibrate_module = importlib.import_module("cascade.calibrate")  # the package's `calibrate` is a function
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    cascade = Cascade(small, large, ConfidenceGate(0.5), options=SolveOptions(max_steps=4, max_step_tokens=6))
    problems = ["a=7;b=a+2;?b", "a=3;b=a+4;c=b+1;?c"]
    roomy = sweep(cascade, problems, GRID)
    monkeypatch.setattr(calibrate_module, "_MEMO_SIZE", 1)
    tight = sweep(cascade, problems, GRID)
    assert tight.executed_tokens > roomy.executed_tokens
    assert np.allclose(tight.costs, roomy.costs) and tight.answers == roomy.answers
    assert not small._sessions and not large._sessions


def test_problems_swept_together_batch_their_calls_and_give_the_same_rows(tiny_dirs):
    """concurrency > 1 runs several problems' trees together, their calls to a tier as one
    batch: fewer backend calls, the same rows in the same order; a failing call ends the
    sweep with the backend's error and every problem's sessions released."""
    small = _CountingCalls(HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"))
    large = _CountingCalls(HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n"))
    cascade = Cascade(small, large, ConfidenceGate(0.5), options=SolveOptions(max_steps=4, max_step_tokens=6))
    problems = ["a=1;?a", "a=7;b=a+2;?b", "a=3;b=a+4;c=b+1;?c", "a=5;b=a-1;?b", "a=2;b=a+a;?b"]
    rows_one, rows_many = [], []
    one = sweep(cascade, problems, GRID, concurrency=1, on_row=rows_one.append)
    batches_one = small.batches + large.batches
    small.batches = large.batches = 0
    many = sweep(cascade, problems, GRID, concurrency=4, on_row=rows_many.append)
    assert small.batches + large.batches < batches_one
    assert [r["problem"] for r in rows_many] == problems
    assert np.allclose(one.costs, many.costs) and one.answers == many.answers
    assert one.executed_tokens == many.executed_tokens
    large.fail_after = len(large.calls) + 5
    with pytest.raises(BackendError, match="injected failure"):
        sweep(cascade, problems, GRID, concurrency=4)
    assert not small._sessions and not large._sessions
    with pytest.raises(ConfigError, match="concurrency"):
        sweep(cascade, problems, GRID, concurrency=0)


def test_a_memo_hit_survives_an_eviction_in_the_same_round(monkeypatch):
    """Embedded pair, a problem where one round both takes a call from the memo and runs a
    new call that pushes the oldest entry out (the one taken, at 16 entries): the taken
    snapshot is released only after the round, and the columns are those of a roomy memo."""
    import importlib

    from bench.tasks import generate_split
    from cascade import embedded_cascade

    calibrate_module = importlib.import_module("cascade.calibrate")
    runner = embedded_cascade(ConfidenceGate(threshold=0.5, signal="min_prob"))
    problem = generate_split("calibration", 17)[16].problem
    grid = [(t,) for t in sorted(default_thresholds(21), reverse=True)]
    assert calibrate_module._MEMO_SIZE == 16
    tight = sweep(runner, [problem], grid)
    monkeypatch.setattr(calibrate_module, "_MEMO_SIZE", 1 << 10)
    roomy = sweep(runner, [problem], grid)
    assert np.array_equal(tight.costs, roomy.costs) and tight.answers == roomy.answers
    assert not any(m._sessions for m in runner.models)
