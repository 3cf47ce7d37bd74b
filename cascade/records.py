"""Frozen records of what a cascade did: Decision, Step, Result."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from cascade.cost import Cost, Usage
from cascade.gates import Confidence

__all__ = ["Decision", "Step", "Result", "StopReason"]

StopReason = Literal["answer", "eos", "max_steps", "budget", "error", "timeout"]


@dataclass(frozen=True)
class Decision:
    """One gate decision: the output of tier `tier` was scored against `threshold`.

    escalated: tier + 1 took over the step. capped: the gate asked to escalate but the
    next tier's worst case did not fit in what was left of the budget, so it did not.
    unavailable: the gate asked to escalate but tier + 1 had failed earlier in this
    request and the cascade degrades (`on_large_failure="degrade"`), so it did not.
    """

    tier: int
    score: float
    threshold: float
    escalated: bool
    capped: bool = False
    unavailable: bool = False

    def to_json(self) -> dict:
        score = self.score if math.isfinite(self.score) else None
        threshold = self.threshold if math.isfinite(self.threshold) else None
        return {"tier": self.tier, "score": score, "threshold": threshold,
                "escalated": self.escalated, "capped": self.capped, "unavailable": self.unavailable}


@dataclass(frozen=True)
class Step:
    """One accepted step.

    text: the step without its trailing delimiter. tier / author: who wrote it.
    confidence: signals of the author's own tokens. decisions: every gate decision taken
    for this step, in order. usage: per tier, everything this step spent (probes,
    rejected drafts, verification and the accepted text). drafts: rejected outputs.
    degraded: a higher tier failed (or had failed) while this step was written, so a
    lower tier's text stands where the gate would have escalated (see `failures`).
    failures: the error messages of the calls that failed during this step.
    """

    index: int
    text: str
    tier: int
    author: str
    confidence: Confidence
    decisions: tuple[Decision, ...]
    usage: tuple[Usage, ...]
    drafts: tuple[str, ...] = ()
    degraded: bool = False
    failures: tuple[str, ...] = ()

    @property
    def cost(self) -> float:
        return math.fsum(u.cost for u in self.usage)

    @property
    def escalated(self) -> bool:
        return self.tier > 0

    @property
    def gate_score(self) -> float | None:
        return self.decisions[-1].score if self.decisions else None

    def to_json(self) -> dict:
        return {
            "index": self.index, "text": self.text, "tier": self.tier, "author": self.author,
            "confidence": self.confidence.to_json(),
            "decisions": [d.to_json() for d in self.decisions],
            "usage": [u.__dict__.copy() for u in self.usage], "cost": self.cost,
            "drafts": list(self.drafts), "degraded": self.degraded, "failures": list(self.failures),
        }


@dataclass(frozen=True)
class Result:
    """The outcome of one problem.

    answer: the extracted final answer, or None. stop_reason: why the loop ended.
    cap_intervened: the hard cap changed what happened (an escalation refused, a step
    shortened, or the request stopped). budget: the cap it ran under (None = none).
    set_aside: the steps a re-solve (a gate in "resolve" mode) replaced, in the order they
    were written, the draft that triggered it last; their cost is in `cost`. `steps` is
    the solve that stands.
    """

    problem: str
    answer: str | None
    steps: tuple[Step, ...]
    cost: Cost
    tier_names: tuple[str, ...]
    stop_reason: StopReason
    cap_intervened: bool
    budget: float | None
    set_aside: tuple[Step, ...] = ()

    @property
    def resolved(self) -> bool:
        """A higher tier solved the problem again from the start (resolve mode)."""
        return bool(self.set_aside)

    @property
    def text(self) -> str:
        return "\n".join(step.text for step in self.steps)

    @property
    def escalation_rate(self) -> float:
        """Fraction of steps not written by the cheapest tier."""
        if not self.steps:
            return 0.0
        return sum(step.tier > 0 for step in self.steps) / len(self.steps)

    @property
    def degraded(self) -> bool:
        """A higher tier failed during this request and lower tiers carried on."""
        return any(step.degraded for step in self.steps)

    @property
    def degraded_steps(self) -> tuple[int, ...]:
        """Indices of the steps a failure affected."""
        return tuple(step.index for step in self.steps if step.degraded)

    @property
    def tier_rates(self) -> tuple[float, ...]:
        """Fraction of steps written by each tier."""
        n = max(1, len(self.steps))
        return tuple(sum(step.tier == k for step in self.steps) / n for k in range(len(self.tier_names)))

    def to_json(self) -> dict:
        return {
            "problem": self.problem, "answer": self.answer,
            "cost": self.cost.to_json(), "escalation_rate": self.escalation_rate,
            "tier_names": list(self.tier_names), "tier_rates": list(self.tier_rates),
            "stop_reason": self.stop_reason, "cap_intervened": self.cap_intervened,
            "degraded": self.degraded, "degraded_steps": list(self.degraded_steps),
            "budget": self.budget, "steps": [step.to_json() for step in self.steps],
            "set_aside": [step.to_json() for step in self.set_aside],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json())
