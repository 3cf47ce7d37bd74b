"""Resolve mode: an escalation hands the whole problem to the next tier, which solves it
again from the start; the steps it replaces are set aside and paid for."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeBackend, counting_script

from cascade import AlwaysSmall, Cascade, ConfidenceGate, SolveOptions, StepFailedError
from cascade.calibrate import sweep
from cascade.specs import build_gate, parse_gate
from decoding import FaultyBackend, at_calls

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)


def doubting_script(doubt_at: int, steps: int = 4, delimiter: str = "\n"):
    """Writes wrong lines `w<k>=0` (answer 0), sure of every step but step `doubt_at`."""
    def script(problem: str, context: str):
        k = context.count(delimiter)
        text = ("#### 0" if k >= steps else f"w{k}=0") + delimiter
        return text, [-2.0 if k == doubt_at else -0.01] * len(text)
    return script


def pair(doubt_at: int = 2):
    small = FakeBackend("small", 100, doubting_script(doubt_at))
    large = FakeBackend("large", 1000, counting_script(4, confident=True))
    return small, large


def test_an_escalation_re_solves_the_problem_on_the_next_tier_from_the_start():
    small, large = pair(doubt_at=2)
    result = Cascade(small, large, ConfidenceGate(0.5, signal="mean_prob", mode="resolve"),
                     options=OPTIONS).solve("p")
    # The small model stopped at the step it doubted; the large one solved from the problem alone.
    assert [(s.index, s.author, s.text) for s in result.set_aside] == [
        (0, "small", "w0=0"), (1, "small", "w1=0"), (2, "small", "w2=0")]
    assert result.resolved and result.set_aside[-1].decisions[-1].escalated
    assert [s.text for s in result.steps] == ["s0=0", "s1=1", "s2=2", "s3=3", "#### 4"]
    assert all(s.author == "large" and not s.drafts for s in result.steps) and result.answer == "4"
    assert result.steps[0].usage[1].prefill_tokens == len("<p>")  # never fed the small model's steps
    assert small.calls == 3 and large.calls == 5
    # Every call is paid for: the set-aside steps' cost and the solve that stands add up.
    assert result.cost.total == pytest.approx(sum(s.cost for s in result.steps + result.set_aside))
    assert result.to_json()["set_aside"][0]["text"] == "w0=0"


def test_a_confident_small_model_is_never_re_solved():
    small, large = pair(doubt_at=99)
    result = Cascade(small, large, ConfidenceGate(0.5, signal="mean_prob", mode="resolve"),
                     options=OPTIONS).solve("p")
    assert not result.resolved and result.answer == "0" and large.calls == 0


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0])
def test_a_problem_is_re_solved_iff_a_step_the_small_model_writes_alone_reaches_the_threshold(threshold):
    # The decision is the step gate's own `score >= threshold`, taken at the first step that
    # reaches it: the same problems as "the least confident step of the small model's own
    # solve reaches it", without running the small model past that step.
    small = FakeBackend("small", 100, counting_script(5, confident=False))
    large = FakeBackend("large", 1000, counting_script(5, confident=True))
    gate = ConfidenceGate(threshold, signal="mean_prob", mode="resolve")
    for problem in [f"q{i}" for i in range(12)]:
        alone = Cascade(small, large, AlwaysSmall(), options=OPTIONS).solve(problem)
        scores = [1.0 - step.confidence.value("mean_prob") for step in alone.steps]
        result = Cascade(small, large, gate, options=OPTIONS).solve(problem)
        first = next((k for k, s in enumerate(scores) if s >= threshold), None)
        assert result.resolved == (first is not None)
        if first is not None:
            assert [s.text for s in result.set_aside] == [s.text for s in alone.steps[: first + 1]]
            assert all(s.author == "large" for s in result.steps)
        else:
            assert result.text == alone.text


def test_three_tiers_re_solve_one_tier_at_a_time():
    models = [FakeBackend(f"m{k}", 10 ** (k + 2), counting_script(3, confident=(k == 2))) for k in range(3)]
    gates = [ConfidenceGate(0.0, mode="resolve")] * 2  # every draft escalates
    result = Cascade(models=models, gates=gates, options=OPTIONS).solve("three")
    assert [s.author for s in result.set_aside] == ["small", "medium"]
    assert all(s.author == "large" for s in result.steps) and result.answer == "3"
    assert models[0].calls == 1 and models[1].calls == 1


def test_a_budget_that_cannot_pay_the_re_solve_keeps_the_small_models_solve():
    small, large = pair(doubt_at=0)
    cascade = Cascade(small, large, ConfidenceGate(0.5, signal="mean_prob", mode="resolve"), options=OPTIONS)
    result = cascade.solve("p", budget=5.0)  # a large step costs > 5 (prefill + 12 tokens)
    assert not result.resolved and result.cap_intervened and result.answer == "0"
    assert result.steps[0].decisions[0].capped and result.cost.total <= 5.0


def test_the_cap_hands_a_re_solve_it_can_no_longer_pay_back_to_the_tier_below():
    small, large = pair(doubt_at=0)
    cascade = Cascade(small, large, ConfidenceGate(0.5, signal="mean_prob", mode="resolve"), options=OPTIONS)
    budget = 25.0  # pays the re-solve's first two steps (worst case), not all five (30.8 uncapped)
    result = cascade.solve("p", budget=budget)
    assert result.resolved and result.cap_intervened and result.cost.total <= budget
    authors = [s.author for s in result.steps]
    assert authors[0] == "large" and "small" in authors  # the small model went on from the large one's steps


def test_a_failed_re_solving_tier_degrades_to_the_tier_below_or_fails_the_request():
    small, large = pair(doubt_at=0)
    gate = ConfidenceGate(0.5, signal="mean_prob", mode="resolve")
    flaky = FaultyBackend(large, at_calls({2: "error"}))  # its second step of the re-solve
    result = Cascade(small, flaky, gate, options=OPTIONS, on_large_failure="degrade").solve("p")
    assert result.resolved and result.degraded
    assert [s.author for s in result.steps][:2] == ["large", "small"]
    assert "injected failure" in result.steps[1].failures[0]
    flaky = FaultyBackend(FakeBackend("large", 1000, counting_script(4)), at_calls({2: "error"}))
    with pytest.raises(StepFailedError, match="model 'large'") as info:
        Cascade(small, flaky, gate, options=OPTIONS).solve("p")
    assert info.value.partial.resolved and len(info.value.partial.steps) == 1


def test_a_sweep_over_resolve_thresholds_equals_independent_runs():
    small = FakeBackend("small", 100, counting_script(4, confident=False))
    large = FakeBackend("large", 1000, counting_script(4, confident=True))
    cascade = Cascade(small, large, ConfidenceGate(0.5, signal="mean_prob", mode="resolve"), options=OPTIONS)
    grid = [(t,) for t in (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0)]
    problems = [f"p{i}" for i in range(10)]
    swept = sweep(cascade, problems, grid)
    for j, (threshold,) in enumerate(grid):
        gate = ConfidenceGate(threshold, signal="mean_prob", mode="resolve")
        runs = [cascade.solve(p, gates=[gate]) for p in problems]
        assert np.array_equal(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]


def test_the_spec_grammar_names_the_mode():
    gate = build_gate(parse_gate("confidence:mean_prob:resolve@0.2"))
    assert gate == ConfidenceGate(0.2, signal="mean_prob", mode="resolve")


def test_a_calibration_of_a_resolve_gate_saves_loads_and_serves_it(tmp_path):
    from cascade import Calibration, calibrate

    small = FakeBackend("small", 100, counting_script(4, confident=False))
    large = FakeBackend("large", 1000, counting_script(4, confident=True))
    gate = ConfidenceGate(0.5, signal="mean_prob", mode="resolve")
    runner = Cascade(small, large, gate, options=OPTIONS)
    result = calibrate(runner, [f"p{i}" for i in range(40)], budgets=[30.0, 60.0], alpha=0.2, delta=0.2,
                       objective="max_escalation",
                       thresholds=[1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    loaded = Calibration.load(result.save(tmp_path / "calib.json"))
    served = Cascade.from_calibration(tmp_path / "calib.json", models=[small, large], options=OPTIONS)
    assert served.gates[0].mode == "resolve" and loaded.gates_for(60.0)[0].mode == "resolve"
    assert loaded.gates_for(60.0)[0].threshold < 1.0  # a budget that buys re-solves
    expected = runner.solve("p3", budget=60.0, gates=loaded.gates_for(60.0))
    assert served.solve("p3", budget=60.0).to_json() == expected.to_json()
