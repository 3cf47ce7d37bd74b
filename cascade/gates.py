"""Gates: a gate maps the state of a step to a score; `score >= threshold` escalates.

A gate never decides by itself: `decide` below is the one place where a score meets a
threshold. So a calibration sweep over thresholds is a replay over recorded scores,
and any gate can be calibrated by the same machinery.

Modes:
- "route": the gate sees a probe of the lower tier's first `probe_tokens` tokens of the
  step (0 = nothing: decide before the step) and decides before the step is finished
  (STEER-style). If it does not escalate, the lower tier finishes the step.
- "speculate": the lower tier drafts the whole step; the gate judges the draft; a
  rejected draft is thrown away (its cost still counts).
- "resolve": the lower tier drafts as in "speculate", but an escalation hands the whole
  problem to the next tier, which solves it again from the start: the steps so far are set
  aside (`Result.set_aside`; their cost counts) and every later step starts at that tier. A
  problem-level cascade decided at the first step the gate doubts, so the lower tier stops
  as soon as its answer would be replaced. It pays one full solve by the next tier instead
  of that tier's prefill of the context at every escalated step (see docs/calibration.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from cascade.checks import check_number, check_threshold
from cascade.errors import ConfigError
from decoding import ScoreOutput, StepOutput

__all__ = [
    "Mode",
    "Signal",
    "Confidence",
    "GateState",
    "Gate",
    "ConfidenceGate",
    "AlwaysSmall",
    "AlwaysLarge",
    "VerifyGate",
    "AdvantageModel",
    "AdvantageGate",
    "decide",
    "effective_threshold",
    "GATES",
    "SIGNALS",
]

Mode = Literal["route", "speculate", "resolve"]
Signal = Literal["min_prob", "mean_prob", "entropy", "first_k"]
SIGNALS: tuple[str, ...] = ("min_prob", "mean_prob", "entropy", "first_k")


@dataclass(frozen=True)
class Confidence:
    """Confidence signals of a generated step (or probe), from its token log-probabilities.

    mean_logprob: mean log-probability of the step's tokens (nats).
    min_prob: smallest token probability in the step.
    mean_entropy: mean entropy of the next-token distributions (nats).
    first_k_mean_logprob: mean log-probability of the first k tokens (a pre-step signal).
    An empty step has full confidence (logprob 0, probability 1, entropy 0).
    """

    mean_logprob: float
    min_prob: float
    mean_entropy: float
    first_k_mean_logprob: float
    tokens: int

    @classmethod
    def of(cls, output: StepOutput, k: int = 4) -> Confidence:
        lps, ents = output.logprobs, output.entropies
        if not lps:
            return cls(0.0, 1.0, 0.0, 0.0, 0)
        first = lps[: max(1, k)]
        return cls(
            mean_logprob=math.fsum(lps) / len(lps),
            min_prob=math.exp(min(lps)),
            mean_entropy=math.fsum(ents) / len(ents) if ents else 0.0,
            first_k_mean_logprob=math.fsum(first) / len(first),
            tokens=len(lps),
        )

    def value(self, signal: Signal) -> float:
        """The signal as a confidence in [0, 1] (1 = certain)."""
        if signal == "min_prob":
            return self.min_prob
        if signal == "mean_prob":
            return math.exp(self.mean_logprob)  # geometric mean of token probabilities
        if signal == "entropy":
            return math.exp(-self.mean_entropy)
        if signal == "first_k":
            return math.exp(self.first_k_mean_logprob)
        raise ConfigError(f"unknown signal {signal!r}; choose one of {SIGNALS}")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GateState:
    """All a gate may look at when judging tier `tier`'s output for one step.

    output: the probe (route mode) or the whole draft (speculate mode).
    verification: the next tier's scoring of the draft, when the gate asks for it.
    budget: the request's hard cap in cost units (None = no cap).
    spent: what the request has spent so far, this step's calls included (cost units).
    escalation_cost: the most it would cost now for tier + 1 to write this step (its
        worst case, as the hard cap counts it); filled in for gates that read it
        (`budget_aware`), else None. With `step_index` (steps so far), these let a
        gate weigh what an escalation costs against what is left (cascade.budget).
    """

    problem: str
    step_index: int
    tier: int
    context: str
    output: StepOutput
    confidence: Confidence
    verification: ScoreOutput | None = None
    budget: float | None = None
    spent: float = 0.0
    escalation_cost: float | None = None

    @property
    def remaining(self) -> float:
        """What is left of the cap (inf without one)."""
        return math.inf if self.budget is None else self.budget - self.spent


@runtime_checkable
class Gate(Protocol):
    """One scalar threshold and a score; higher score = more reason to escalate.

    Thresholds are checked against the range the gate's score can take: [0, 1] for the
    built-in scored gates (confidence, verify, advantage: their scores are probabilities
    or one minus a confidence), [0, inf] for AlwaysSmall (score 0), [0, 1] for AlwaysLarge
    (score 1). A score must be a real number (numpy's included), never NaN or a string.

    Required: threshold, mode, probe_tokens, requires_verification, score(state). The
    optional capabilities below are declared here with their defaults: a gate subclassing
    `Gate` inherits them and overrides what it uses; one that does not subclass it
    declares them itself. The runtime reads them, never probes for them.

    requires_hidden: the judged tier returns its hidden state with the draft (a learned
        router reads it). Default False.
    rewrite, max_corrections: what a rejected draft becomes. "step" (default): the next
        tier writes the step. "token": the verifying tier's greedy text up to its first
        disagreement is kept and the drafting tier goes on, at most `max_corrections`
        times per step (see `VerifyGate`). Default max_corrections 0.
    needs_verification(state): with `requires_verification`, is this draft worth the next
        tier's scoring pass? Default: every draft is.
    check_models(models): refuse the (judged, next) models it was not made for (a gate
        carrying a trained router). Default: any models.
    """

    threshold: float
    mode: Mode
    probe_tokens: int
    requires_verification: bool
    requires_hidden: bool = False
    rewrite: Literal["step", "token"] = "step"
    max_corrections: int = 0

    def score(self, state: GateState) -> float: ...

    def needs_verification(self, state: GateState) -> bool:
        return True

    def check_models(self, models: Sequence) -> None:
        return None


def _set_threshold(gate: object, name: str = "threshold", *, low: float = 0.0, high: float = 1.0) -> None:
    """Check a frozen gate's threshold field and store it as a plain float (a numpy number
    given is accepted, and recorded the same way as a float)."""
    object.__setattr__(gate, name, check_threshold(getattr(gate, name), name, low=low, high=high))


def _check_mode(mode: str, probe_tokens: int) -> None:
    if mode not in ("route", "speculate", "resolve"):
        raise ConfigError(f"mode must be 'route', 'speculate' or 'resolve', got {mode!r}")
    if not isinstance(probe_tokens, int) or probe_tokens < 0:
        raise ConfigError(f"probe_tokens must be an integer >= 0, got {probe_tokens!r}")


@dataclass(frozen=True)
class ConfidenceGate(Gate):
    """Escalate when the lower tier is unsure of its own step (STEER-style, no extra model).

    score = 1 - confidence, confidence in [0, 1] from `signal`; so threshold t escalates
    steps whose confidence is <= 1 - t. Higher threshold = fewer escalations = cheaper.
    """

    threshold: float = 0.5
    signal: Signal = "min_prob"
    mode: Mode = "speculate"
    probe_tokens: int = 4
    requires_verification: bool = False

    def __post_init__(self) -> None:
        _set_threshold(self)  # score = 1 - a confidence in [0, 1]
        _check_mode(self.mode, self.probe_tokens)
        if self.signal not in SIGNALS:
            raise ConfigError(f"signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.mode == "route" and self.probe_tokens == 0:
            raise ConfigError("a route-mode ConfidenceGate needs probe_tokens >= 1 to see any confidence")

    def score(self, state: GateState) -> float:
        return 1.0 - state.confidence.value(self.signal)


@dataclass(frozen=True)
class AlwaysSmall(Gate):
    """Never escalate: the lower tier writes every step."""

    threshold: float = math.inf
    mode: Mode = "route"
    probe_tokens: int = 0
    requires_verification: bool = False

    def __post_init__(self) -> None:
        _set_threshold(self, high=math.inf)  # its score is always 0

    def score(self, state: GateState) -> float:
        return 0.0


@dataclass(frozen=True)
class AlwaysLarge(Gate):
    """Always escalate, before the lower tier writes anything."""

    threshold: float = 0.0
    mode: Mode = "route"
    probe_tokens: int = 0
    requires_verification: bool = False

    def __post_init__(self) -> None:
        _set_threshold(self)  # its score is always 1

    def score(self, state: GateState) -> float:
        return 1.0


@dataclass(frozen=True)
class VerifyGate(Gate):
    """Draft-then-verify (SpecReason-style): the next tier scores the draft in one forward
    pass; reject (escalate) when its confidence in the draft is low.

    score = 1 - exp(mean log-probability) of the draft under the next tier ("mean"), or
    1 - its smallest token probability ("min"). The verification's prefill is charged
    to the next tier; an accepted draft is then already in that tier's KV cache.

    rewrite: what happens to a rejected draft. "step": the next tier writes the step (with
    greedy decoding an HF backend starts it from the draft's prefix it agrees with).
    "token": the next tier's greedy text up to and including its first disagreement with
    the draft (`ScoreOutput.greedy_prefix`, known from the verification pass itself) is
    kept, and the drafting tier goes on from there, its continuation verified the same
    way; after `max_corrections` corrections (or when a backend reports no greedy prefix,
    or when sampling) the next tier writes the rest of the step. Two-tier cascades, or
    the gate below the top tier.

    screen: an advantage router (`AdvantageModel`) asked first: a draft it gives
    P(large better) < screen_threshold is accepted without verification (score 0), so
    the next tier is called only for drafts worth checking. Its tokens are prefilled
    later, with the next call it gets. None (the default): every draft is verified.
    """

    threshold: float = 0.5
    reduce: Literal["mean", "min"] = "mean"
    mode: Mode = "speculate"
    probe_tokens: int = 0
    requires_verification: bool = True
    rewrite: Literal["step", "token"] = "step"
    max_corrections: int = 8
    screen: AdvantageModel | None = None
    screen_threshold: float = 0.0

    def __post_init__(self) -> None:
        _set_threshold(self)  # score = 1 - a probability
        if self.rewrite not in ("step", "token"):
            raise ConfigError(f"rewrite must be 'step' or 'token', got {self.rewrite!r}")
        if isinstance(self.max_corrections, bool) or not isinstance(self.max_corrections, int) \
                or self.max_corrections < 0:
            raise ConfigError(f"max_corrections must be an integer >= 0, got {self.max_corrections!r}")
        if self.mode != "speculate" or not self.requires_verification:
            raise ConfigError("VerifyGate judges whole drafts: mode must be 'speculate'")
        if self.reduce not in ("mean", "min"):
            raise ConfigError(f"reduce must be 'mean' or 'min', got {self.reduce!r}")
        if self.screen is not None and not isinstance(self.screen, AdvantageModel):
            raise ConfigError(f"screen must be a router with advantage_probability(state) and "
                              f"check_models(models) (subclass cascade.gates.AdvantageModel), got "
                              f"{type(self.screen).__name__} (load one with cascade.load_router)")
        _set_threshold(self, "screen_threshold")  # compared with P(large better)

    @property
    def requires_hidden(self) -> bool:
        """A screen reads the drafting model's hidden state (as AdvantageGate does)."""
        return self.screen is not None

    def check_models(self, models: Sequence) -> None:
        """Refuse a screen trained for other models than (drafting, verifying) `models`."""
        if self.screen is not None:
            self.screen.check_models(models)

    def needs_verification(self, state: GateState) -> bool:
        """Is this draft (state without a verification yet) worth the next tier's pass?"""
        return self.screen is None or not state.output.token_ids or \
            float(self.screen.advantage_probability(state)) >= self.screen_threshold

    def score(self, state: GateState) -> float:
        if state.verification is None or not state.verification.logprobs:
            return 0.0  # nothing to verify (empty draft, or the cap left no room to score it)
        logprobs = state.verification.logprobs
        value = math.fsum(logprobs) / len(logprobs) if self.reduce == "mean" else min(logprobs)
        return 1.0 - math.exp(value)


@runtime_checkable
class AdvantageModel(Protocol):
    """What `AdvantageGate` needs of a router (`cascade.router.Router` and
    `cascade.sequence_router.SequenceRouter` are ones)."""

    def advantage_probability(self, state: GateState) -> float:
        """P(the next tier's step would be meaningfully better than this draft)."""
        ...

    def check_models(self, models: Sequence) -> None:
        """Refuse (drafting, next tier) models it was not trained for. Default: any models
        (a router that does not subclass AdvantageModel declares it itself)."""


@dataclass(frozen=True)
class AdvantageGate(Gate):
    """Escalate when a learned router says the next tier's step would be meaningfully
    better than the draft (Arbitrage-style): score = P(large better), in [0, 1].

    The router reads the drafting model's hidden state, so the runtime asks that tier's
    backend for it (`requires_hidden`). Load a trained router with
    `cascade.router.load_router(path, models=(small, large))`, which refuses a router
    trained for other models. One scalar threshold: calibration applies unchanged.
    """

    router: AdvantageModel
    threshold: float = 0.5
    mode: Mode = "speculate"
    probe_tokens: int = 0
    requires_verification: bool = False
    requires_hidden: bool = True

    def __post_init__(self) -> None:
        _set_threshold(self)  # score = P(large better)
        if not isinstance(self.router, AdvantageModel):
            raise ConfigError(f"AdvantageGate needs a router with advantage_probability(state) and "
                              f"check_models(models) (subclass cascade.gates.AdvantageModel), got "
                              f"{type(self.router).__name__} (load one with cascade.router.load_router)")
        if (self.mode not in ("speculate", "resolve") or self.requires_verification
                or not self.requires_hidden):
            raise ConfigError("AdvantageGate judges whole drafts from their hidden state: mode must be "
                              "'speculate' or 'resolve', requires_hidden True, requires_verification False")

    def check_models(self, models: Sequence) -> None:
        """Refuse a router trained for other models than (drafting, next tier) `models`."""
        self.router.check_models(models)

    def score(self, state: GateState) -> float:
        if not state.output.token_ids:
            return 0.0  # no draft (the cap left no room): nothing to judge
        return float(self.router.advantage_probability(state))


def effective_threshold(gate: Gate, state: GateState) -> float:
    """The threshold the gate's score meets in this state: `gate.threshold`, or for a
    budget-aware gate (one with `threshold_at(state)`, e.g. `cascade.budget.BudgetGate`)
    the threshold it sets from what is left of the request's budget."""
    threshold_at = getattr(gate, "threshold_at", None)
    if threshold_at is None:
        return gate.threshold
    threshold = float(threshold_at(state))
    if math.isnan(threshold):
        raise ConfigError(f"{type(gate).__name__} returned a NaN threshold at step {state.step_index}")
    return threshold


def decide(gate: Gate, state: GateState) -> tuple[float, bool]:
    """The one place a score meets a threshold: returns (score, escalate)."""
    raw = gate.score(state)
    try:
        score = check_number(raw, "score")
    except ConfigError:
        raise ConfigError(f"{type(gate).__name__}.score returned {raw!r} ({type(raw).__name__}) at step "
                          f"{state.step_index}; a gate's score must be a real number, not NaN") from None
    return score, score >= effective_threshold(gate, state)


# Gate kinds by name, one vocabulary with bench's policies ("small", "large"); names from
# outside are read, checked and built in `cascade.specs` (`make_gate`, `build_gate`).
GATES: dict[str, type] = {
    "small": AlwaysSmall,
    "large": AlwaysLarge,
    "confidence": ConfidenceGate,
    "verify": VerifyGate,
    "advantage": AdvantageGate,
}
