"""The async driver and the fault policy: asolve, streaming, cancellation, degrade/fail,
step and request timeouts, malformed output, and budgets under faults and concurrency."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from fakes import FakeBackend, counting_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade import (
    AlwaysLarge,
    Cascade,
    CascadeError,
    ConfidenceGate,
    ConfigError,
    RequestTimeoutError,
    SolveOptions,
    StepFailedError,
    VerifyGate,
)
from decoding import Backend, BackendError, FaultyBackend, at_calls

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)


def pair(steps=4):
    small = FakeBackend("small", 100, counting_script(steps, confident=False))
    large = FakeBackend("large", 1000, counting_script(steps, confident=True))
    return small, large


def trace(result):
    return [(s.text, s.author, s.cost) for s in result.steps], result.answer, result.cost.total


def test_concurrent_asolve_equals_sequential_solve_and_batches():
    problems = [f"p{k}" for k in range(6)]
    small, large = pair()
    alone = [trace(Cascade(small, large, ConfidenceGate(0.5), options=OPTIONS).solve(p)) for p in problems]
    small, large = pair()
    c = Cascade(small, large, ConfidenceGate(0.5), options=OPTIONS)

    async def main():
        return await asyncio.gather(*(c.asolve(p) for p in problems))

    together = [trace(r) for r in asyncio.run(main())]
    assert together == alone
    assert max(small.batches) == len(problems)  # all requests' first drafts went as one batch


def test_on_step_streams_each_step_as_decided():
    small, large = pair()
    seen = []
    c = Cascade(small, large, ConfidenceGate(0.5), options=OPTIONS)
    result = asyncio.run(c.asolve("p", on_step=seen.append))
    assert [s.text for s in seen] == [s.text for s in result.steps] and len(seen) == 5


@pytest.mark.parametrize("gate, options, budget", [
    (ConfidenceGate(0.5), OPTIONS, None),
    (ConfidenceGate(0.5), OPTIONS, 9000.0),
    (VerifyGate(0.5), OPTIONS, None),
    (VerifyGate(0.5), SolveOptions(max_steps=10, max_step_tokens=12, draft_ahead=True), 20000.0),
    (ConfidenceGate(0.5, mode="resolve"), OPTIONS, 30000.0),
])
def test_on_spend_brackets_what_each_call_costs(gate, options, budget):
    # Before each call: (spent, at_most). The next report's spent must lie between the two,
    # and the result's cost under the last at_most: a request cut off mid-call and charged
    # at_most is never charged less than it spent.
    reports = []
    c = Cascade(*pair(), gate, options=options)
    result = asyncio.run(c.asolve("p", budget, on_spend=lambda spent, most: reports.append((spent, most))))
    assert len(reports) >= len(result.steps) >= 2
    for (spent, most), (after, _) in zip(reports, reports[1:], strict=False):
        assert spent <= after <= most + 1e-9
    assert reports[-1][0] <= result.cost.total <= reports[-1][1] + 1e-9
    assert reports[-1][1] > reports[-1][0]
    if budget is not None:
        assert all(most <= budget + 1e-9 for _, most in reports)  # the cap admits each call on its worst case


def test_cancelling_one_request_frees_it_and_leaves_the_others_alone():
    small, large = pair()
    slow_large = FaultyBackend(large, lambda n, r: "stall", stall_seconds=0.05)
    c = Cascade(small, slow_large, ConfidenceGate(0.5), options=OPTIONS)
    reference = [trace(Cascade(*pair(), ConfidenceGate(0.5), options=OPTIONS).solve(p)) for p in ("a", "c")]

    async def main():
        tasks = [asyncio.create_task(c.asolve(p)) for p in ("a", "b", "c")]
        await asyncio.sleep(0.08)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, b, c_ = asyncio.run(main())
    assert isinstance(b, asyncio.CancelledError)
    assert [trace(a), trace(c_)] == reference
    time.sleep(0.1)  # the stalled batch the cancelled request was in ends in its thread
    assert small.cached == {} and large.cached == {}  # every request's state was released


def test_degrade_keeps_the_small_models_text_and_flags_the_result():
    small, large = pair()
    flaky = FaultyBackend(large, at_calls({1: "error"}))
    c = Cascade(small, flaky, ConfidenceGate(0.5), options=OPTIONS, on_large_failure="degrade")
    result = c.solve("p")
    assert result.answer == "4" and result.degraded
    assert all(s.author == "small" for s in result.steps)
    first = result.degraded_steps[0]
    assert "injected failure" in result.steps[first].failures[0]
    # the failed tier is dropped for the rest of the request: later escalations are refused
    later = [d for s in result.steps[first + 1:] for d in s.decisions if d.score >= d.threshold]
    assert later and all(d.unavailable and not d.escalated for d in later)
    assert flaky.calls == 1
    assert math.isclose(result.cost.total, math.fsum(s.cost for s in result.steps))


def test_fail_policy_names_backend_and_step_and_keeps_partial_cost():
    small, large = pair()
    flaky = FaultyBackend(large, at_calls({2: "error"}))
    c = Cascade(small, flaky, ConfidenceGate(0.5), options=OPTIONS)
    with pytest.raises(StepFailedError, match=r"step \d+, model 'large'.*injected failure") as info:
        c.solve("p")
    partial = info.value.partial
    assert partial.stop_reason == "error" and partial.steps
    # the failed step's small draft was paid for: the partial cost covers more than its steps
    assert partial.cost.total > math.fsum(s.cost for s in partial.steps)


def test_malformed_output_is_a_backend_failure():
    small, large = pair()
    c = Cascade(small, FaultyBackend(large, at_calls({1: "malformed"})), ConfidenceGate(0.5),
                options=OPTIONS, on_large_failure="degrade")
    result = c.solve("p")
    assert result.degraded and "log-probabilities" in result.steps[result.degraded_steps[0]].failures[0]
    with pytest.raises(StepFailedError, match="log-probabilities"):
        Cascade(FaultyBackend(pair()[0], at_calls({1: "malformed"})), pair()[1], ConfidenceGate(0.5),
                options=OPTIONS, on_large_failure="degrade").solve("p")  # the cheapest tier cannot degrade


def test_step_timeout_turns_a_stall_into_a_failure_without_hanging():
    small, large = pair()
    stall = 5.0
    stalled = FaultyBackend(large, at_calls({1: "stall"}), stall_seconds=stall)
    options = SolveOptions(max_steps=10, max_step_tokens=12, step_timeout=0.1)
    started = time.perf_counter()
    result = Cascade(small, stalled, ConfidenceGate(0.5), options=options,
                     on_large_failure="degrade").solve("p")
    # Without the step timeout the solve waits out the stall; with it, well under (a busy
    # machine slows the fake models' steps, so the bound is the stall, not a tight figure).
    assert time.perf_counter() - started < stall
    assert result.degraded and "step timeout of 0.1 s" in result.steps[result.degraded_steps[0]].failures[0]
    small, large = pair()
    with pytest.raises(StepFailedError, match="step timeout"):
        Cascade(small, FaultyBackend(large, at_calls({1: "stall"}), stall_seconds=1.0),
                ConfidenceGate(0.5), options=options).solve("p")


def test_request_timeout_returns_the_partial_trace():
    small, large = pair(steps=8)
    # The large model's first two steps answer at once and the third stalls far past the
    # request timeout, so where the timeout lands does not depend on how busy the machine is.
    slow = FaultyBackend(large, lambda n, r: "stall" if n >= 3 else None, stall_seconds=5.0)
    options = SolveOptions(max_steps=10, max_step_tokens=12, request_timeout=2.0)
    with pytest.raises(RequestTimeoutError, match="timeout of 2 s") as info:
        Cascade(small, slow, AlwaysLarge(), options=options).solve("p")
    partial = info.value.partial
    assert partial.stop_reason == "timeout" and len(partial.steps) == 2


def test_verification_failure_degrades_to_the_draft():
    small, large = pair()
    flaky = FaultyBackend(large, at_calls({1: "error"}))
    c = Cascade(small, flaky, VerifyGate(0.1), options=OPTIONS, on_large_failure="degrade")
    result = c.solve("p")
    assert result.answer == "4" and result.degraded and result.steps[0].author == "small"


def test_middle_tier_failure_in_three_tiers_falls_back_one_tier():
    small = FakeBackend("small", 10, counting_script(4, confident=False))
    medium = FakeBackend("medium", 100, counting_script(4, confident=False))
    large = FakeBackend("large", 1000, counting_script(4, confident=True))
    c = Cascade(models=[small, FaultyBackend(medium, at_calls({1: "error"})), large],
                gates=[AlwaysLarge(), ConfidenceGate(0.5)], options=OPTIONS, on_large_failure="degrade")
    result = c.solve("p")
    # medium failed drafting the first step; the AlwaysLarge gate's empty probe means the
    # cheapest tier writes that step; afterwards medium is unavailable, so large is never reached
    assert result.answer == "4" and result.degraded
    assert [s.author for s in result.steps] == ["small"] * 5


def test_bad_fault_policy_and_timeouts_are_clear_errors():
    small, large = pair()
    with pytest.raises(ConfigError, match="on_large_failure"):
        Cascade(small, large, on_large_failure="retry")
    for field in ("step_timeout", "request_timeout"):
        for bad in (0, -1, math.nan, math.inf, "1"):
            with pytest.raises(ConfigError, match=field):
                SolveOptions(**{field: bad})


def test_backend_returning_the_wrong_type_fails_the_request_cleanly():
    small, large = pair()

    class Broken(Backend):
        info = large.info

        def next_steps(self, requests):
            return [{"text": "oops"} for _ in requests]

        score_steps = next_steps

        def prefill_bound(self, request_id, problem, context):
            return 0

        def release(self, request_id):
            pass

    with pytest.raises(StepFailedError, match="returned dict, expected StepOutput"):
        Cascade(small, Broken(), AlwaysLarge(), options=OPTIONS).solve("p")


FAULTS = st.dictionaries(st.integers(1, 30), st.sampled_from(["error", "malformed"]), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.one_of(st.none(), st.floats(0, 80)), threshold=st.floats(0, 1),
       kind=st.sampled_from(["confidence", "route", "verify", "large"]), faults=FAULTS,
       policy=st.sampled_from(["fail", "degrade"]), n=st.integers(1, 7), concurrency=st.integers(1, 8))
def test_budgets_hold_and_no_request_is_lost_under_faults_and_concurrency(
        budget, threshold, kind, faults, policy, n, concurrency):
    gate = {"confidence": ConfidenceGate(threshold),
            "route": ConfidenceGate(threshold, mode="route", probe_tokens=2),
            "verify": VerifyGate(threshold), "large": AlwaysLarge()}[kind]
    small, large = pair()
    c = Cascade(small, FaultyBackend(large, at_calls(faults)), gate, options=OPTIONS, on_large_failure=policy)
    problems = [f"q{k}" for k in range(n)]
    outcomes = c.solve_many(problems, budget, concurrency=concurrency, return_exceptions=True)
    assert len(outcomes) == n  # none dropped, none duplicated, in order
    for problem, outcome in zip(problems, outcomes, strict=False):
        if isinstance(outcome, CascadeError):
            assert policy == "fail" and isinstance(outcome, StepFailedError)
            outcome = outcome.partial
        assert outcome.problem == problem
        total = outcome.cost.total
        if budget is not None:
            assert total <= budget + 1e-9
        assert math.isclose(total, math.fsum(u.cost for u in outcome.cost.per_tier), abs_tol=1e-12)
        if outcome.stop_reason != "error":
            assert math.isclose(total, math.fsum(s.cost for s in outcome.steps), abs_tol=1e-9)
    assert small.cached == {} and large.cached == {}


def test_solve_many_works_inside_a_running_event_loop():
    small, large = pair()
    c = Cascade(small, large, ConfidenceGate(0.5), options=OPTIONS)

    async def main():
        return c.solve("p")  # sync API called from async code: runs on its own thread

    assert asyncio.run(main()).answer == "4"


def test_backend_error_type_is_kept_and_others_are_wrapped():
    small, large = pair()

    class Raises(FakeBackend):
        def next_steps(self, requests):
            raise KeyError("boom")

    with pytest.raises(StepFailedError, match="next_steps raised KeyError") as info:
        Cascade(small, Raises("large", 1000, counting_script(4)), AlwaysLarge(), options=OPTIONS).solve("p")
    assert isinstance(info.value.__cause__, BackendError)
