"""Draft-then-verify and oracle gates."""

from __future__ import annotations

import math

import pytest
from fakes import FakeBackend

from bench.oracle import OracleGate
from cascade import Cascade, ConfigError, SolveOptions, VerifyGate, make_gate
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
