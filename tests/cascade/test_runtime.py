"""The step runtime: gates, modes, cost accounting, the hard cap, N tiers, bad input."""

from __future__ import annotations

import math

import pytest
from fakes import FakeBackend, counting_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade import (
    AlwaysLarge,
    AlwaysSmall,
    Cascade,
    ConfidenceGate,
    ConfigError,
    CostModel,
    Prices,
    SolveOptions,
    StepFailedError,
    VerifyGate,
    decide,
)
from cascade.gates import Confidence, GateState
from decoding import HFBackend, StepOutput

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)


def pair(confident_small=False, steps=4, **kw):
    small = FakeBackend("small", 100, counting_script(steps, confident=confident_small), **kw)
    large = FakeBackend("large", 1000, counting_script(steps, confident=True))
    return small, large


def test_two_tier_cascade_solves_and_records_every_step():
    small, large = pair(confident_small=True)
    result = Cascade(small, large, ConfidenceGate(0.5), options=OPTIONS).solve("p")
    assert result.answer == "4" and result.stop_reason == "answer"
    assert [s.text for s in result.steps] == ["s0=0", "s1=1", "s2=2", "s3=3", "#### 4"]
    assert all(s.author == "small" for s in result.steps) and result.escalation_rate == 0


def test_always_large_never_runs_the_small_model():
    small, large = pair()
    result = Cascade(small, large, AlwaysLarge(), options=OPTIONS).solve("p")
    assert small.calls == 0 and result.escalation_rate == 1.0
    assert result.cost.per_tier[0].cost == 0


def test_always_small_never_runs_the_large_model():
    small, large = pair()
    result = Cascade(small, large, AlwaysSmall(), options=OPTIONS).solve("p")
    assert large.calls == 0 and result.escalation_rate == 0.0


def _state(logprobs):
    out = StepOutput("x", tuple(range(len(logprobs))), tuple(logprobs), (0.0,) * len(logprobs),
                     "delimiter", 0, 0.0)
    return GateState("p", 0, 0, "", out, Confidence.of(out))


def test_decision_at_the_threshold_boundary():
    state = _state([math.log(0.25), 0.0])  # min prob 0.25 -> score 0.75
    score = ConfidenceGate(threshold=0.75).score(state)
    assert score == pytest.approx(0.75)
    assert decide(ConfidenceGate(threshold=score), state) == (score, True)  # >= escalates
    assert decide(ConfidenceGate(threshold=math.nextafter(score, 1.0)), state)[1] is False


@pytest.mark.parametrize("signal,expected", [
    ("min_prob", 1 - 0.25), ("mean_prob", 1 - math.sqrt(0.25)),
    ("entropy", 1 - math.exp(0.0)), ("first_k", 1 - math.sqrt(0.25)),
])
def test_confidence_signals(signal, expected):
    assert ConfidenceGate(0.5, signal=signal).score(_state([math.log(0.25), 0.0])) == pytest.approx(expected)


def test_speculate_mode_counts_the_rejected_draft():
    small, large = pair(confident_small=False)
    result = Cascade(small, large, ConfidenceGate(0.0), options=OPTIONS).solve("p")  # escalate all
    assert all(s.tier == 1 and len(s.drafts) == 1 for s in result.steps)
    assert result.cost.per_tier[0].generated_tokens == sum(len(s.drafts[0]) for s in result.steps)


def test_route_mode_probe_then_continue():
    small, large = pair(confident_small=True)
    gate = ConfidenceGate(0.5, mode="route", probe_tokens=2)
    result = Cascade(small, large, gate, options=OPTIONS).solve("p")
    assert [s.text for s in result.steps] == ["s0=0", "s1=1", "s2=2", "s3=3", "#### 4"]
    assert result.escalation_rate == 0 and small.calls == 2 * len(result.steps)


def test_cost_totals_are_sums_over_steps_and_tiers():
    small, large = pair()
    cascade = Cascade(small, large, ConfidenceGate(0.7), options=OPTIONS)
    result = cascade.solve("cost")
    assert result.cost.total == pytest.approx(sum(s.cost for s in result.steps))
    for tier in range(2):
        per_step = [s.usage[tier] for s in result.steps]
        assert result.cost.per_tier[tier].generated_tokens == sum(u.generated_tokens for u in per_step)
        assert result.cost.per_tier[tier].prefill_tokens == sum(u.prefill_tokens for u in per_step)
        prices = cascade.cost_model.prices[tier]
        assert result.cost.per_tier[tier].cost == pytest.approx(
            prices.input * result.cost.per_tier[tier].prefill_tokens
            + prices.output * result.cost.per_tier[tier].generated_tokens)


def test_flops_prices_make_a_large_token_cost_one():
    model = CostModel.flops([100, 1000])
    assert model.prices[1] == Prices(1.0, 1.0) and model.prices[0] == Prices(0.1, 0.1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.floats(0, 300), threshold=st.floats(0, 1),
       kind=st.sampled_from(["route", "speculate", "resolve", "verify"]),
       tiers=st.sampled_from([2, 3]), steps=st.integers(1, 6))
def test_hard_cap_is_never_exceeded(budget, threshold, kind, tiers, steps):
    models = [FakeBackend(f"m{k}", 10 ** (k + 2), counting_script(steps, confident=k == tiers - 1))
              for k in range(tiers)]
    gate = VerifyGate(threshold) if kind == "verify" else ConfidenceGate(threshold, mode=kind, probe_tokens=2)
    gates = [gate] * (tiers - 1)
    result = Cascade(models=models, gates=gates, options=OPTIONS).solve("cap", budget=budget)
    assert result.cost.total <= budget + 1e-9
    if result.stop_reason == "budget":
        assert result.cap_intervened


def test_three_tiers_escalate_step_by_step():
    models = [FakeBackend(f"m{k}", 10 ** (k + 2), counting_script(3, confident=(k == 2))) for k in range(3)]
    gates = [ConfidenceGate(0.0), ConfidenceGate(0.0)]
    result = Cascade(models=models, gates=gates, options=OPTIONS).solve("three")
    assert result.tier_names == ("small", "medium", "large")
    assert all(s.tier == 2 and len(s.decisions) == 2 for s in result.steps)
    assert result.tier_rates == (0.0, 0.0, 1.0)


def test_failure_names_backend_and_step_and_keeps_partial_trace():
    small, large = pair(confident_small=True, fail_at={3})
    with pytest.raises(StepFailedError, match="step 2, model 'small'") as info:
        Cascade(small, large, ConfidenceGate(0.9), options=OPTIONS).solve("p")
    assert len(info.value.partial.steps) == 2


def test_solve_many_batches_calls_and_keeps_order():
    small, large = pair(confident_small=True)
    cascade = Cascade(small, large, AlwaysSmall(), options=OPTIONS)
    problems = [f"p{i}" for i in range(6)]
    results = cascade.solve_many(problems, concurrency=4)
    assert [r.problem for r in results] == problems
    assert max(small.batches) == 4
    assert [r.text for r in results] == [cascade.solve(p).text for p in problems]


@pytest.mark.parametrize("problem,match", [("", "empty"), ("   \n", "empty"), (42, "string")])
def test_bad_problem(problem, match):
    small, large = pair()
    with pytest.raises(ConfigError, match=match):
        Cascade(small, large, options=OPTIONS).solve(problem)


@pytest.mark.parametrize("budget", [-1, float("nan"), float("inf"), "10", True])
def test_bad_budget(budget):
    small, large = pair()
    with pytest.raises(ConfigError, match="budget"):
        Cascade(small, large, options=OPTIONS).solve("p", budget=budget)


def test_bad_configuration():
    small, large = pair()
    with pytest.raises(ConfigError, match="max_steps"):
        SolveOptions(max_steps=0)
    with pytest.raises(ConfigError, match="delimiter"):
        Cascade(small, FakeBackend("x", 10, counting_script(), delimiter="\n\n"))
    with pytest.raises(ConfigError, match="gates"):
        Cascade(models=[small, large], gates=[AlwaysSmall(), AlwaysSmall()])
    with pytest.raises(ConfigError, match="at least 2"):
        Cascade(models=[small])
    with pytest.raises(ConfigError, match="signal"):
        ConfidenceGate(0.5, signal="vibes")


def test_tiny_models_end_to_end_deterministic(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    options = SolveOptions(max_steps=4, max_step_tokens=8, temperature=1.0, seed=3)
    cascade = Cascade(small, large, ConfidenceGate(0.6), options=options)
    first, second = cascade.solve("a=1;?a", budget=200), cascade.solve("a=1;?a", budget=200)
    assert first.to_json() | {"cost": None} == second.to_json() | {"cost": None} or \
        [s.text for s in first.steps] == [s.text for s in second.steps]
    assert [s.text for s in first.steps] == [s.text for s in second.steps]
    assert [s.author for s in first.steps] == [s.author for s in second.steps]
    assert first.cost.total <= 200


@pytest.fixture(scope="module")
def tiny_pair(tiny_dirs):
    return (HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"),
            HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(budget=st.floats(0, 120), threshold=st.floats(0, 1),
       kind=st.sampled_from(["route", "speculate", "verify"]))
def test_hard_cap_holds_on_real_models(tiny_pair, budget, threshold, kind):
    """The cap check relies on the backend's prefill bound being a true upper bound."""
    gate = VerifyGate(threshold) if kind == "verify" else ConfidenceGate(threshold, mode=kind, probe_tokens=2)
    cascade = Cascade(*tiny_pair, gate, options=SolveOptions(max_steps=4, max_step_tokens=6))
    result = cascade.solve("a=2;b=a+5;?b", budget=budget)
    assert result.cost.total <= budget + 1e-9
