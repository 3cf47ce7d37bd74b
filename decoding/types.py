"""Records and the backend protocol: what a cascade asks of a model, and what comes back.

This module owns the narrow interface between the cascade runtime and any model engine.
It knows nothing about gates, costs or budgets.

A request's context is plain text: the problem (which each backend renders with its own
prompt template) and the steps accepted so far, concatenated. Backends are free to keep
per-request caches keyed by `request_id`; the text is the source of truth, so a backend
whose cache diverged from the text (a rejected draft, a calibration sweep branching)
catches up by itself.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "StopReason",
    "ModelInfo",
    "StepRequest",
    "ScoreRequest",
    "StepOutput",
    "ScoreOutput",
    "Backend",
    "BackendError",
    "ModelLoadError",
]

StopReason = Literal["delimiter", "eos", "max_tokens"]


class BackendError(RuntimeError):
    """A model backend failed (engine error, server down, malformed output)."""

    def __init__(self, message: str, backend: str = "") -> None:
        super().__init__(f"[{backend}] {message}" if backend else message)
        self.backend = backend


class ModelLoadError(BackendError, ValueError):
    """A model could not be loaded from the given path or hub id."""


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model.

    name: path or hub id it was loaded from (or a user-given name).
    fingerprint: hex digest identifying the weights (calibration files are tied to it).
    num_parameters: used by the default FLOPs-based cost model.
    step_delimiter: text that ends a step ("\\n\\n" for real math models).
    entropy: how `StepOutput.entropies` are computed: "exact" (over the whole vocabulary)
        or "top-K" (estimated from the K most likely tokens an engine returns, a lower
        bound). Routers trained on one kind refuse drafts of the other.
    context_length: positions the model attends over (prompt + everything generated), or
        None when the backend does not know it; the runtime refuses a problem that leaves
        no room for a step in it.
    """

    name: str
    fingerprint: str
    num_parameters: int
    step_delimiter: str
    entropy: str = "exact"
    context_length: int | None = None


@dataclass(frozen=True)
class StepRequest:
    """Generate the next step of one request.

    context: steps accepted so far (text after the prompt), each ending in the delimiter.
    max_tokens: generation stops after this many tokens (a route gate's probe uses a
        small value; the step then continues with the probe text appended to context).
    temperature: 0 = greedy. With temperature > 0 the sampler is seeded from
        (seed, problem, context), so the same seed and context give the same step.
    return_hidden: also return the last-layer hidden state after the last token.
    """

    request_id: str
    problem: str
    context: str
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    return_hidden: bool = False


@dataclass(frozen=True)
class ScoreRequest:
    """Per-token log-probabilities of `text` following the problem's prompt + context."""

    request_id: str
    problem: str
    context: str
    text: str


@dataclass(frozen=True)
class StepOutput:
    """One generated step.

    text: decoded text of the generated tokens, including the delimiter when it stopped
        there (EOS is not part of the text).
    token_ids, logprobs, entropies: shape (generated_tokens,); logprobs of the chosen
        tokens and entropies (nats) of the distributions they were drawn from.
    prefill_tokens: tokens the backend had to feed to catch up with the context
        (0 when its cache already held it).
    seconds: wall-clock seconds of this call for this request.
    hidden: last-layer hidden state after the last token, shape (hidden_size,), or None.
    reused_tokens: leading tokens of the step the backend did not decode in this call
        because its cache already held them: it had just scored a draft from this context
        and its own greedy choices agreed with the draft's first tokens (see `HFBackend`).
        Those tokens were fed (and charged) when the draft was scored; `decoded_tokens`
        is what this call decoded.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    entropies: tuple[float, ...]
    stop_reason: StopReason
    prefill_tokens: int
    seconds: float
    hidden: tuple[float, ...] | None = field(default=None, repr=False)
    reused_tokens: int = 0

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decoded_tokens(self) -> int:
        return len(self.token_ids) - self.reused_tokens


@dataclass(frozen=True)
class ScoreOutput:
    """Log-probabilities of a given text. prefill_tokens counts the catch-up only;
    scored_tokens (= len(logprobs)) are also fed through the model.

    greedy_prefix: what this model would write greedily from the context as far as the
    pass shows it: the scored text's leading tokens that are its own greedy choices, then
    its greedy token at the first mismatch (the whole text when it agrees throughout and
    ends with the step delimiter); cut after the delimiter if it reaches one. None when
    the backend does not say (or the greedy token there is EOS). greedy_prefix_tokens:
    its length in this model's tokens.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    prefill_tokens: int
    seconds: float
    greedy_prefix: str | None = None
    greedy_prefix_tokens: int = 0

    @property
    def scored_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Backend(Protocol):
    """A model engine. Calls take a batch; a backend may run it as one batch or one by one.

    The four batch methods and `info` are required. The optional capabilities below are
    declared here with their defaults: a backend subclassing `Backend` inherits them and
    overrides what it has; one that does not subclass it declares them itself. The runtime
    reads them, never probes for methods.

    native_async: `anext_steps`/`ascore_steps` are the backend's own coroutines (a server
        or a process of its own): the runtime awaits them directly and may keep several
        batches in flight. False (default): the runtime calls `next_steps`/`score_steps`
        in a worker thread of the backend's own, one batch at a time.
    supports_fork: `fork` copies a request's cached state to another request id
        (calibration sweeps then share a prefix's work between branches). False (default):
        a sweep runs each candidate in a session of its own.
    state_key / adopt (with supports_fork): what a request's state will be in tokens, and
        taking a call's result over from a request that made the same call from the same
        tokens (a sweep's branches that reached one context by different histories then
        share the call). Default: None, nothing shared that way.
    """

    info: ModelInfo
    native_async: bool = False
    supports_fork: bool = False

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """Generate one step for each request (stop at the delimiter, EOS or max_tokens)."""
        ...

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        """Score each given text in one forward pass per request."""
        ...

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        """An upper bound on the tokens a call with this context would have to prefill."""
        ...

    def release(self, request_id: str) -> None:
        """Free the request's cached state (idempotent)."""
        ...

    async def anext_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """`next_steps` as a coroutine of the backend's own (only when `native_async`)."""
        raise NotImplementedError(f"{type(self).__name__} has no native anext_steps (native_async is False)")

    async def ascore_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        """`score_steps` as a coroutine of the backend's own (only when `native_async`)."""
        raise NotImplementedError(f"{type(self).__name__} has no native ascore_steps (native_async is False)")

    def fork(self, source_id: str, target_id: str) -> None:
        """Copy request `source_id`'s cached state to `target_id` (only when `supports_fork`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork a request (supports_fork is False)")

    def state_key(self, request: StepRequest | ScoreRequest) -> Hashable | None:
        """What `request.request_id` will hold once caught up on the request's context (its
        token ids), when that alone decides the call's output; None when unknown."""
        return None

    def adopt(self, source_id: str, request: StepRequest | ScoreRequest) -> None:
        """Give `request.request_id` the state `request` would leave in it, from `source_id`,
        which just ran the same call from an equal `state_key` (only when state_key says so)."""
        raise NotImplementedError(f"{type(self).__name__} cannot adopt a request's state")

    def close(self) -> None:
        """Free the engine's resources (a process, a server session). Default: nothing to free."""
