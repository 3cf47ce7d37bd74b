"""Draft-then-verify and oracle gates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from fakes import FakeBackend

from bench.oracle import OracleGate
from cascade import Cascade, ConfigError, Gate, GateState, SolveOptions, VerifyGate, make_gate
from cascade.gates import AdvantageModel
from decoding import HFBackend, ScoreRequest


def test_verify_gate_decisions_match_scoring_by_hand(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    gate = VerifyGate(threshold=0.6)
    result = Cascade(small, large, gate, options=SolveOptions(max_steps=4, max_step_tokens=6)).solve("a=3;?a")
    context = ""
    checked = 0
    for step in result.steps:
        draft = step.drafts[0] if step.drafts else step.text + "\n"
        if step.tier == 0 and not step.text.endswith("\n") and len(step.text) == 6:
            draft = step.text  # cut at max tokens: no delimiter in the draft
        by_hand = large.score_steps([ScoreRequest(f"hand{step.index}", "a=3;?a", context, draft)])[0]
        expected = 1 - math.exp(sum(by_hand.logprobs) / len(by_hand.logprobs))
        decision = step.decisions[0]
        assert decision.score == pytest.approx(expected, abs=1e-5)
        assert decision.escalated == (expected >= 0.6)
        checked += 1
        context += (step.text + "\n")
    assert checked == len(result.steps) > 0
    # Verification is charged to the large model even for accepted drafts.
    assert result.cost.per_tier[1].prefill_tokens > 0


def test_verify_gate_settings():
    with pytest.raises(ConfigError, match="speculate"):
        VerifyGate(mode="route")
    with pytest.raises(ConfigError, match="reduce"):
        VerifyGate(reduce="median")
    assert isinstance(make_gate("verify", threshold=0.3), VerifyGate)
    with pytest.raises(ConfigError, match="unknown gate"):
        make_gate("psychic")


def test_oracle_gate_escalates_exactly_wrong_steps():
    def wrong_every_other(problem: str, context: str):
        k = context.count("\n")
        lines = ["b=1+2=3", "c=3+1=5", "#### 5"]
        text = (lines[k] if k < len(lines) else "#### 5") + "\n"
        return text, [-0.01] * len(text)

    def right(problem: str, context: str):
        k = context.count("\n")
        lines = ["b=1+2=3", "c=3+1=4", "#### 4"]
        text = (lines[k] if k < len(lines) else "#### 4") + "\n"
        return text, [-0.01] * len(text)

    small = FakeBackend("small", 10, wrong_every_other)
    large = FakeBackend("large", 100, right)
    result = Cascade(small, large, OracleGate(), options=SolveOptions(max_steps=5, max_step_tokens=12)
                     ).solve("a=1;b=a+2;c=b+1;?c")
    # "#### 5" is wrong once the large model stated c=4, so the answer line escalates too.
    assert [s.author for s in result.steps] == ["small", "large", "large"]
    assert result.answer == "4"


def _tiny_pair(tiny_dirs):
    return (HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n"),
            HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n"))


PROBLEMS = ["a=3;?a", "a=7;b=a+2;?b", "a=12;b=a-3;c=b*2;?c", "x=5;?x"]


def _drive(cascade, problem, options, gates):
    """Run one step machine by hand; returns (result, how many times it sent calls together)."""
    machine = cascade.step_machine(problem, None, gates, options)
    together, value = 0, None

    def run(tier, request):
        model = cascade.models[tier]
        return (model.next_steps if hasattr(request, "max_tokens") else model.score_steps)([request])[0]

    while True:
        try:
            calls = machine.send(value)
        except StopIteration as stop:
            return stop.value, together
        if isinstance(calls, list):
            together += 1
            value = [run(*c) for c in calls]
        else:
            value = run(*calls)


@pytest.mark.parametrize("threshold", [0.8, 0.5, 0.2])
def test_draft_ahead_writes_the_same_steps_and_charges_its_thrown_drafts(tiny_dirs, threshold):
    small, large = _tiny_pair(tiny_dirs)
    base = SolveOptions(max_steps=5, max_step_tokens=6)
    ahead = SolveOptions(max_steps=5, max_step_tokens=6, draft_ahead=True)
    cascade = Cascade(small, large, VerifyGate(threshold), options=base)
    sent_together = 0
    for problem in PROBLEMS:
        plain, never = _drive(cascade, problem, base, [VerifyGate(threshold)])
        early, together = _drive(cascade, problem, ahead, [VerifyGate(threshold)])
        assert never == 0
        sent_together += together
        assert [(s.text, s.tier, s.drafts, [d.escalated for d in s.decisions]) for s in early.steps] == \
            [(s.text, s.tier, s.drafts, [d.escalated for d in s.decisions]) for s in plain.steps]
        assert early.answer == plain.answer
        # The large model's work is the same; the small one's at least the same (thrown drafts).
        assert early.cost.per_tier[1].cost == pytest.approx(plain.cost.per_tier[1].cost)
        assert early.cost.per_tier[0].generated_tokens >= plain.cost.per_tier[0].generated_tokens
        # Every early draft lands in some step's usage: used by the next step or thrown away.
        assert early.cost.total == pytest.approx(sum(u.cost for s in early.steps for u in s.usage))
    assert sent_together > 0


def test_token_rewrite_that_rejects_everything_writes_the_large_models_greedy_steps(tiny_dirs):
    """threshold 0 rejects every draft: each round keeps the large model's greedy text up to
    its first disagreement, so the steps must be exactly what the large model writes alone."""
    small, large = _tiny_pair(tiny_dirs)
    options = SolveOptions(max_steps=4, max_step_tokens=8)
    cascade = Cascade(small, large, VerifyGate(0.0, rewrite="token", max_corrections=100), options=options)
    alone = Cascade(small, large, make_gate("always-large"), options=options)
    fixed_any = False
    for problem in PROBLEMS:
        mixed, reference = cascade.solve(problem), alone.solve(problem)
        assert [s.text for s in mixed.steps] == [s.text for s in reference.steps]
        assert all(s.tier == 1 for s in mixed.steps)
        fixed_any |= any(len(s.decisions) > 1 for s in mixed.steps)  # corrected, then drafted on
    assert fixed_any


@pytest.mark.parametrize("budget", [5.0, 12.0, 20.0, 35.0, 60.0])
def test_draft_ahead_and_token_rewrite_honour_the_hard_cap(tiny_dirs, budget):
    small, large = _tiny_pair(tiny_dirs)
    options = SolveOptions(max_steps=5, max_step_tokens=6, draft_ahead=True)
    for gate in (VerifyGate(0.5), VerifyGate(0.5, rewrite="token"), VerifyGate(0.1, rewrite="token")):
        cascade = Cascade(small, large, gate, options=options)
        for problem in PROBLEMS:
            result = cascade.solve(problem, budget)
            assert result.cost.total <= budget + 1e-9


def test_token_rewrite_settings():
    with pytest.raises(ConfigError, match="rewrite"):
        VerifyGate(rewrite="word")
    with pytest.raises(ConfigError, match="max_corrections"):
        VerifyGate(max_corrections=-1)
    with pytest.raises(ConfigError, match="draft_ahead"):
        SolveOptions(draft_ahead="yes")


@pytest.mark.parametrize("fault", ["stall", "error"])  # of the verification
def test_draft_ahead_survives_a_failing_verifier_and_a_failing_early_draft(tiny_dirs, fault):
    """Calls sent together fail one by one: a stalled or failing verification (degrade) lets
    the draft stand; a failing early draft is only dropped, and the next step drafts again."""
    from decoding import FaultyBackend, at_calls

    small, large = _tiny_pair(tiny_dirs)
    options = SolveOptions(max_steps=4, max_step_tokens=12, draft_ahead=True, step_timeout=0.5)
    problem = next(p for p in PROBLEMS if _drive(Cascade(small, large, VerifyGate(0.5), options=options),
                                                 p, options, [VerifyGate(0.5)])[1] > 0)
    # Which calls of each model were sent together: run the machine by hand and count.
    machine = Cascade(small, large, VerifyGate(0.5), options=options).step_machine(
        problem, None, [VerifyGate(0.5)], options)
    counts, first_pair, value = [0, 0], None, None
    while True:
        try:
            calls = machine.send(value)
        except StopIteration:
            break
        batch = calls if isinstance(calls, list) else [calls]
        outputs = []
        for tier, request in batch:
            counts[tier] += 1
            model = (small, large)[tier]
            outputs.append((model.next_steps if hasattr(request, "max_tokens")
                            else model.score_steps)([request])[0])
        if isinstance(calls, list) and first_pair is None:
            first_pair = tuple(counts)  # (small call number, large call number) of the pair
        value = outputs if isinstance(calls, list) else outputs[0]
    assert first_pair is not None
    plain = Cascade(small, large, VerifyGate(0.5), options=SolveOptions(max_steps=4, max_step_tokens=12))
    reference = [s.text for s in plain.solve(problem).steps]

    flaky_large = FaultyBackend(large, at_calls({first_pair[1]: fault}), stall_seconds=2.0)
    result = Cascade(small, flaky_large, VerifyGate(0.5), options=options,
                     on_large_failure="degrade").solve(problem)
    assert result.degraded and flaky_large.injected == [(first_pair[1], fault)]

    # A failing early draft (an error: a stalled one would keep the small model's only
    # worker busy, so its next call times out too, a failure of the small model itself).
    flaky_small = FaultyBackend(small, at_calls({first_pair[0]: "error"}))
    early = Cascade(flaky_small, large, VerifyGate(0.5), options=options).solve(problem)
    assert flaky_small.injected == [(first_pair[0], "error")]
    assert [s.text for s in early.steps] == reference


class _MinProbScreen(AdvantageModel):
    """A stand-in router for VerifyGate.screen: P(large better) = 1 - the draft's min_prob."""

    def advantage_probability(self, state) -> float:
        return 1.0 - state.confidence.min_prob


class _CountingScores:
    """Wraps a backend; counts the drafts it is asked to score."""

    def __init__(self, backend):
        self.backend, self.scored = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def score_steps(self, requests):
        self.scored += len(requests)
        return self.backend.score_steps(requests)


def test_a_screened_verify_gate_verifies_only_the_drafts_its_router_picks(tiny_dirs):
    small, large = _tiny_pair(tiny_dirs)
    counted = _CountingScores(large)
    options = SolveOptions(max_steps=4, max_step_tokens=8)
    screen = _MinProbScreen()
    plain = Cascade(small, large, VerifyGate(0.6), options=options)
    for problem in PROBLEMS:
        everything = Cascade(small, large, VerifyGate(0.6, screen=screen, screen_threshold=0.0),
                             options=options)
        a, b = everything.solve(problem), plain.solve(problem)  # screen at 0: every draft is verified
        assert [(s.text, s.tier) for s in a.steps] == [(s.text, s.tier) for s in b.steps]
        assert a.cost.total == pytest.approx(b.cost.total)
        nothing = Cascade(small, counted, VerifyGate(0.6, screen=screen, screen_threshold=1.0),
                          options=options)
        before = counted.scored
        alone = nothing.solve(problem)
        assert counted.scored == before and all(s.tier == 0 for s in alone.steps)  # never verified
        assert alone.cost.per_tier[1].cost == 0.0
    # In between (the median draft's screen score): exactly the drafts the screen picks are
    # verified, and a draft it does not pick stands unscored (score 0, never escalated).
    drafts = [1.0 - s.confidence.min_prob for p in PROBLEMS
              for s in Cascade(small, large, make_gate("always-small"), options=options).solve(p).steps]
    cut = sorted(drafts)[len(drafts) // 2]
    gate = VerifyGate(0.6, screen=screen, screen_threshold=cut)
    picked = skipped = 0
    for problem in PROBLEMS:
        before = counted.scored
        result = Cascade(small, counted, gate, options=options).solve(problem)
        verified = [d for s in result.steps for d in s.decisions if d.score > 0.0]
        assert counted.scored - before == len(verified)  # one verification per scored decision
        for step in result.steps:
            if step.tier == 0:
                screened_out = 1.0 - step.confidence.min_prob < cut
                assert (step.decisions[0].score == 0.0) == screened_out
                skipped += screened_out
        picked += len(verified)
    assert picked > 0 and skipped > 0  # both paths ran
    assert gate.requires_hidden and not VerifyGate().requires_hidden
    with pytest.raises(ConfigError, match="screen"):
        VerifyGate(screen="router.pt")


@pytest.mark.parametrize("budget", [5.0, 20.0, 60.0])
def test_a_screened_verify_gate_honours_the_hard_cap(tiny_dirs, budget):
    small, large = _tiny_pair(tiny_dirs)
    options = SolveOptions(max_steps=5, max_step_tokens=6, draft_ahead=True)
    for rewrite in ("step", "token"):
        gate = VerifyGate(0.3, rewrite=rewrite, screen=_MinProbScreen(), screen_threshold=0.2)
        for problem in PROBLEMS:
            result = Cascade(small, large, gate, options=options).solve(problem, budget)
            assert result.cost.total <= budget + 1e-9


def test_a_gate_of_your_own_on_the_problem_text_routes_whole_problems_before_anything_is_written():
    """Query-level routing (docs/concepts.md): a route-mode gate with no probe whose score
    reads only `state.problem` sends every step of a problem the same way, and the tier it
    passes over is never called: no draft is written twice, none is paid for."""
    @dataclass(frozen=True)
    class LongProblemsToLarge(Gate):
        threshold: float = 0.5
        mode: str = "route"
        probe_tokens: int = 0
        requires_verification: bool = False

        def score(self, state: GateState) -> float:
            return 1.0 if state.problem.count(";") >= 3 else 0.0

    def script(answer: str):
        def write(problem: str, context: str):
            lines = ["b=1+2=3", f"#### {answer}"]
            k = context.count("\n")
            text = (lines[k] if k < len(lines) else f"#### {answer}") + "\n"
            return text, [-0.01] * len(text)
        return write

    small, large = FakeBackend("small", 10, script("3")), FakeBackend("large", 100, script("4"))
    options = SolveOptions(max_steps=5, max_step_tokens=12)
    cascade = Cascade(small, large, LongProblemsToLarge(), options=options)
    routed = cascade.solve("a=1;b=a+2;c=b+1;?c")
    kept = cascade.solve("a=1;?a")
    assert [s.author for s in routed.steps] == ["large", "large"] and routed.answer == "4"
    assert [s.author for s in kept.steps] == ["small", "small"] and kept.answer == "3"
    passed_over = (routed.cost.per_tier[0], kept.cost.per_tier[1])
    assert all(u.prefill_tokens == u.generated_tokens == 0 and u.cost == 0 for u in passed_over)
    assert routed.escalation_rate == 1.0 and kept.escalation_rate == 0.0
