"""`cascade serve`: a cascade exposed as one OpenAI-compatible model over HTTP.

Owns the HTTP edge: request parsing and validation, authentication, the mapping of a
completion request to `Cascade.asolve` and of a `Result` to a completion (plain or
streamed as server-sent events, one event per step as it is decided), request logs,
and graceful shutdown. It knows nothing about how models run: the cascade is built
once, before the server starts, from paths fixed on the command line; no request field
reaches the filesystem.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
Extra body fields (all optional): `budget` (hard cap, cost units), `gate` (a name from
`cascade.GATES`), `threshold`, `signal`, `mode`, `max_steps`. `max_tokens` caps the
tokens of each step (one tier call). The response carries `usage` (tokens read and
written over every tier) and a `cascade` field: cost, budget, escalation rate, answer,
per-step authors and costs, cap_intervened, degraded.

Paced serving (`cascade serve --curve FILE --pace B`, `ServerConfig(paced=...)`): every request
runs the curve's gate at a threshold a `cascade.PacedPolicy` moves as requests finish, so that
the mean cost of the requests served stays at B whatever the traffic, under the family's hard
cap; the response's `cascade.pacing` says the threshold it ran and the ceiling the mean cost is
guaranteed to be under (`calibration.pacing`). Such a server takes no per-request gate fields;
a request's `budget` can only lower its cap.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 bad
request, 401 bad or missing API key, 404 unknown model or path, 413 body too large,
502 a model failed (partial result attached), 503 shutting down, 504 request timeout.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at runtime, and Request is imported inside create_app.
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from app.options import gate_specs_from_args, model_specs_from_args, routers_from_args, solve_options
from cascade import DEFAULT_EMBEDDED_GATE
from cascade.budget import PacedPolicy, load_budget_curve
from cascade.checks import check_threshold
from cascade.errors import CascadeError, ConfigError, RequestTimeoutError, StepFailedError
from cascade.gates import GATES, AlwaysSmall
from cascade.records import Result, Step
from cascade.router import load_router
from cascade.runtime import Cascade, SolveOptions, tier_names_for
from cascade.specs import (
    GATE_ALIASES,
    GateSpec,
    build_gate,
    build_gates,
    canonical_gate_name,
    load_models,
)

__all__ = ["ServerConfig", "ServerLimits", "create_app", "serve"]

logger = logging.getLogger("cascade.server")

# Body fields each endpoint accepts; anything else is rejected by name (a typo such as
# "budjet" must not silently run without a cap).
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "seed", "stream", "stream_options", "n", "user",
                  "budget", "gate", "threshold", "signal", "mode", "max_steps"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may ask for.

    max_body_bytes: size of the JSON body. max_prompt_chars: the problem text.
    max_tokens: the largest `max_tokens` (tokens per step) a request may set.
    max_steps: the largest `max_steps`. max_budget: the largest `budget` (cost units).
    require_budget: reject requests without a `budget` (every request capped).
    request_timeout: seconds one request may run (None = no limit).
    shutdown_grace: seconds in-flight requests get to finish after SIGTERM/SIGINT;
        those still running then end with a 503 carrying their partial result.
    max_running: requests solved at once (each holds its KV state in every tier it has
        used, so this bounds the memory the model engines need). max_waiting: requests
        accepted beyond those, waiting in arrival order for a slot; past running + waiting,
        a request gets 429 with Retry-After at once instead of queueing without end.
    """

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 16_384
    max_tokens: int = 4096
    max_steps: int = 256
    max_budget: float = 1e9
    require_budget: bool = False
    request_timeout: float | None = 600.0
    shutdown_grace: float = 30.0
    max_running: int = 64
    max_waiting: int = 256

    def __post_init__(self) -> None:
        waiting = self.max_waiting
        if isinstance(waiting, bool) or not isinstance(waiting, int) or waiting < 0:
            raise ConfigError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        for name in ("max_body_bytes", "max_prompt_chars", "max_tokens", "max_steps", "max_running"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_budget", "shutdown_grace") + (("request_timeout",) if self.request_timeout else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id clients send as `model`. api_key: when set, every /v1 request
    needs `Authorization: Bearer <api_key>` (compared in constant time).
    log_prompts: also log prompt text (off: logs carry sizes, never bodies).
    tier_retry_seconds: under `on_large_failure="degrade"`, a tier that failed is dropped
    for this long (requests meanwhile do not call it, and say why in their response); the
    first request after that tries it again.
    paced: serve every request with this paced policy (`BudgetCurve.paced`): its gates and cap,
    and every finished request's cost goes back to it (requests run concurrently; the ceiling
    on the mean cost holds over the requests it has seen finish)."""

    model_name: str = "stepcascade"
    api_key: str | None = None
    log_prompts: bool = False
    limits: ServerLimits = ServerLimits()
    tier_retry_seconds: float = 30.0
    paced: PacedPolicy | None = None

    def __post_init__(self) -> None:
        value = self.tier_retry_seconds
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise ConfigError(f"tier_retry_seconds must be a finite number >= 0, got {value!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8):
            raise ConfigError("api_key must be a string of at least 8 characters")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", extra: dict | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.extra = status, message, param, kind, extra
        self.headers = headers


@dataclass(frozen=True)
class _Job:
    """A validated request: what to solve and how."""

    problem: str
    budget: float | None
    gates: list | None
    options: SolveOptions
    stream: bool


class _Drain:
    """Shutdown state: `draining` once a stop signal arrived (new requests get 503);
    `expired` fires when the grace period is over (in-flight requests are cancelled)."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = asyncio.Event()

    def begin(self, grace: float) -> None:
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(grace, self.expired.set)


def _number(body: dict, name: str, *, integer: bool = False, low: float | None = None,
            high: float | None = None, strict_low: bool = False):
    value = body.get(name)
    if value is None:
        return None
    wanted = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (integer and not isinstance(value, int)):
        raise _BadRequest(400, f"{name} must be {wanted}, got {value!r}", name)
    if not math.isfinite(value):
        raise _BadRequest(400, f"{name} must be finite, got {value!r}", name)
    if low is not None and (value < low or (strict_low and value == low)):
        raise _BadRequest(400, f"{name} must be {'>' if strict_low else '>='} {low:g}, got {value!r}", name)
    if high is not None and value > high:
        raise _BadRequest(400, f"{name} must be <= {high:g}, got {value!r}", name)
    return value


@dataclass(frozen=True)
class _DroppedTier:
    tier: int
    name: str
    model: str
    reason: str
    since: float  # time.time() of the failure
    until: float  # time.monotonic() when it is tried again

    def to_json(self) -> dict:
        return {"tier": self.name, "model": self.model, "reason": self.reason,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
                "retry_in_seconds": round(max(0.0, self.until - time.monotonic()), 1)}


class _TierHealth:
    """Tiers above the cheapest that failed while the cascade degrades: each is dropped for
    `retry_seconds` (requests cap the cascade below it instead of waiting on a dead model
    every time), then the next request tries it again. A failure is logged once, with why."""

    def __init__(self, runner: Cascade, retry_seconds: float) -> None:
        self.runner = runner
        self.retry_seconds = retry_seconds
        self.down: dict[int, _DroppedTier] = {}

    def dropped(self) -> list[_DroppedTier]:
        now = time.monotonic()
        for tier in [t for t, d in self.down.items() if d.until <= now]:
            logger.info("tier %s (%s) is tried again after %.0f s dropped", self.down[tier].name,
                        self.down[tier].model, self.retry_seconds)
            del self.down[tier]
        return sorted(self.down.values(), key=lambda d: d.tier)

    def record(self, result: Result | None, request_id: str) -> None:
        """Mark the tiers that failed in `result` (its steps' failures) as dropped."""
        if result is None or self.runner.on_large_failure != "degrade":
            return
        names = list(self.runner.tier_names)
        for step in result.steps:
            for failure in step.failures:
                name, _, reason = failure.partition(": ")
                if name not in names or names.index(name) in self.down:
                    continue
                tier = names.index(name)
                model = self.runner.models[tier].info.name
                self.down[tier] = _DroppedTier(tier, name, model, reason, time.time(),
                                               time.monotonic() + self.retry_seconds)
                logger.warning("request %s: tier %s (%s) failed at step %d and is dropped for %g s "
                               "(--on-large-failure degrade; lower tiers write its steps): %s", request_id,
                               name, model, step.index, self.retry_seconds, reason[:500])

    def gates_for(self, gates: list | None) -> list | None:
        """The request's gates with the cascade capped below the lowest dropped tier."""
        dropped = self.dropped()
        if not dropped:
            return gates
        gates = list(gates if gates is not None else self.runner.gates)
        gates[dropped[0].tier - 1] = AlwaysSmall()  # never hand a step up to the dropped tier
        return gates


class _App:
    """The request handlers, closed over one cascade and one config."""

    def __init__(self, runner: Cascade, config: ServerConfig) -> None:
        self.runner = runner
        self.config = config
        self.limits = config.limits
        self.drain = _Drain()
        self.inflight = 0  # accepted and not yet answered: running + waiting
        self.running = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop, at first use
        self.created = int(time.time())
        self.health = _TierHealth(runner, config.tier_retry_seconds)

    # ---- parsing --------------------------------------------------------------------------

    async def read_body(self, request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise _BadRequest(413, f"request body of {declared} bytes is over the limit of "
                                   f"{self.limits.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _BadRequest(413, "request body is over the limit of "
                                       f"{self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as error:
            raise _BadRequest(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "the body must be a JSON object")
        return body

    def check_auth(self, request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.config.api_key}"
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
            raise _BadRequest(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              kind="authentication_error")

    def parse(self, body: dict, allowed: set[str], problem: str) -> _Job:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise _BadRequest(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed)}", unknown[0])
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(400, "model is required (a string)", "model")
        if model != self.config.model_name:
            raise _BadRequest(404, f"unknown model {model[:100]!r}; this server serves "
                                   f"{[self.config.model_name]}", "model", kind="not_found_error")
        if not problem.strip():
            raise _BadRequest(400, "the prompt is empty", "prompt")
        if len(problem) > self.limits.max_prompt_chars:
            raise _BadRequest(400, f"the prompt has {len(problem)} characters, over the limit of "
                                   f"{self.limits.max_prompt_chars}", "prompt")
        n = _number(body, "n", integer=True)
        if n not in (None, 1):
            raise _BadRequest(400, f"n must be 1 (one cascade run per request), got {n!r}", "n")
        budget = _number(body, "budget", low=0, high=self.limits.max_budget)
        if budget is None and self.limits.require_budget:
            raise _BadRequest(400, "budget is required by this server (a hard cap in cost units)", "budget")
        options = self.runner.options
        changes: dict[str, Any] = {}
        max_tokens = _number(body, "max_tokens", integer=True, low=1, high=self.limits.max_tokens)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", integer=True, low=1,
                                 high=self.limits.max_tokens)
        if max_tokens is not None:
            changes["max_step_tokens"] = max_tokens
        max_steps = _number(body, "max_steps", integer=True, low=1, high=self.limits.max_steps)
        if max_steps is not None:
            changes["max_steps"] = max_steps
        temperature = _number(body, "temperature", low=0, high=10)
        if temperature is not None:
            changes["temperature"] = float(temperature)
        seed = _number(body, "seed", integer=True, low=0)
        if seed is not None:
            changes["seed"] = seed
        if self.limits.request_timeout is not None:
            timeout = options.request_timeout
            changes["request_timeout"] = min(timeout, self.limits.request_timeout) if timeout \
                else self.limits.request_timeout
        try:
            options = dataclasses.replace(options, **changes)
        except CascadeError as error:
            raise _BadRequest(400, str(error)) from None
        paced = self.config.paced
        if paced is not None:
            given = sorted({"gate", "threshold", "signal", "mode"} & set(body))
            if given:
                raise _BadRequest(400, f"this server paces its gate to a mean cost of {paced.budget:g} "
                                       f"(cascade serve --pace): it takes no {', '.join(given)}", given[0])
        gates = self.parse_gates(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest(400, f"stream must be true or false, got {stream!r}", "stream")
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise _BadRequest(400, "stream_options must be an object", "stream_options")
        served = paced.policy()[0] if paced is not None else (gates or self.runner.gates)
        if stream and any(gate.mode == "resolve" for gate in served):
            # Steps are sent as they are decided, and a re-solve replaces steps already sent.
            raise _BadRequest(400, "stream is not supported with a resolve-mode gate (a re-solve replaces "
                                   "the steps written so far); ask without stream", "stream")
        return _Job(problem, None if budget is None else float(budget), gates, options, stream)

    def parse_gates(self, body: dict) -> list | None:
        """The request's gate fields as gates (through `cascade.specs`, like every gate name);
        None: the served gates."""
        name, threshold = body.get("gate"), _number(body, "threshold")
        signal, mode = body.get("signal"), body.get("mode")
        try:
            if name is not None:
                if not isinstance(name, str):
                    raise _BadRequest(400, f"gate must be a string, got {name!r}", "gate")
                if GATE_ALIASES.get(name, name) not in GATES:
                    raise _BadRequest(400, f"unknown gate {name[:50]!r}; choose one of {list(GATES)}", "gate")
                kind = canonical_gate_name(name)
                if kind != "confidence" and (signal is not None or mode is not None):
                    raise _BadRequest(400, f"signal and mode apply to gate 'confidence', not {name!r}",
                                      "gate")
                spec = GateSpec(kind, threshold=threshold, signal=signal, mode=mode,
                                router="" if kind == "advantage" else None)
                if kind == "advantage":  # the served routers: a request cannot send one
                    routers = [getattr(g, "router", None) for g in self.runner.gates]
                    if any(r is None for r in routers):
                        raise _BadRequest(400, "gate 'advantage' needs the server's router: start it with "
                                               "--gate advantage --router FILE", "gate")
                    return [build_gate(spec, {"": r}) for r in routers]
                return [build_gate(spec)] * len(self.runner.gates)
            if signal is not None or mode is not None:
                raise _BadRequest(400, "signal and mode need gate='confidence'", "gate")
            if threshold is not None:
                threshold = check_threshold(threshold)
                gates = []
                for gate in self.runner.gates:
                    if not dataclasses.is_dataclass(gate):
                        raise _BadRequest(400, f"the served gate {type(gate).__name__} takes no threshold "
                                               "override; send gate= too", "threshold")
                    gates.append(dataclasses.replace(gate, threshold=threshold))
                return gates
        except CascadeError as error:
            raise _BadRequest(400, str(error)) from None
        return None

    # ---- running --------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """429 when max_running requests run and max_waiting more wait already."""
        limits = self.limits
        if self.running + self.waiting >= limits.max_running + limits.max_waiting:
            raise _BadRequest(429, f"the server is at capacity: {self.running} requests running and "
                                   f"{self.waiting} waiting (max_running {limits.max_running}, max_waiting "
                                   f"{limits.max_waiting}); retry later", kind="server_overloaded",
                              headers={"Retry-After": "1"})

    async def run(self, job: _Job, request_id: str, on_step=None) -> Result:
        """Wait for one of the max_running slots (in arrival order), then solve. A request
        still waiting when the shutdown grace expires gets a 503 without having started."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_running)
        self.waiting += 1
        slot = asyncio.ensure_future(self._slots.acquire())
        expiry = asyncio.ensure_future(self.drain.expired.wait())
        try:
            done, _ = await asyncio.wait({slot, expiry}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away while waiting
            self._abandon(slot)
            raise
        finally:
            self.waiting -= 1
            expiry.cancel()
        if slot not in done:
            self._abandon(slot)
            raise _BadRequest(503, "the server is shutting down; this request was still waiting for a slot",
                              kind="server_shutting_down")
        self.running += 1
        try:
            return await self._solve(job, request_id, on_step)
        finally:
            self.running -= 1
            self._slots.release()

    def _abandon(self, slot: asyncio.Future) -> None:
        """Stop waiting for a slot; one acquired at that very moment goes back."""
        if not slot.done():
            slot.cancel()
        elif not slot.cancelled():
            self._slots.release()

    async def _solve(self, job: _Job, request_id: str, on_step=None) -> Result:
        """Solve at the request's gates, or at the pacer's when the server paces its gate."""
        paced, budget, chosen = self.config.paced, job.budget, job.gates
        if paced is None:
            return await self._run(job, request_id, budget, chosen, on_step)
        # The pacer's threshold now (a request's budget only lowers its cap); while the
        # request runs the pacer is told what it has spent, and however it ends, what it cost:
        # a request that fails or is cancelled mid-call is charged as if that call had cost
        # its most (its work is done or abandoned, not returned), so that no spent unit
        # escapes the pacer's count.
        ticket, chosen, cap = paced.begin()
        budget = cap if budget is None or cap is None else min(cap, budget)
        at_most = [0.0]

        def on_spend(spent: float, most: float) -> None:
            at_most[0] = most
            paced.spend(ticket, spent)

        cost: Result | float = 0.0
        try:
            cost = await self._run(job, request_id, budget, chosen, on_step, on_spend)
            return cost
        except CascadeError as error:
            partial = getattr(error, "partial", None)
            cost = max(partial.cost.total, at_most[0]) if isinstance(partial, Result) else at_most[0]
            raise
        except BaseException:  # cancelled (client gone, shutdown)
            cost = at_most[0]
            raise
        finally:
            paced.observe(cost, ticket)

    async def _run(self, job: _Job, request_id: str, budget: float | None, chosen, on_step,
                   on_spend=None) -> Result:
        """Solve with `chosen` gates (less the tiers dropped as failed), unless the shutdown
        grace expires first (then 503 with the partial)."""
        gates = self.health.gates_for(chosen)
        if gates is not chosen:
            logger.info("request %s: %s", request_id, "; ".join(
                f"tier {d.name} ({d.model}) dropped since {d.to_json()['since']}: {d.reason[:200]}"
                for d in self.health.dropped()))
        task = asyncio.ensure_future(self.runner.asolve(job.problem, budget, gates=gates, options=job.options,
                                                        on_step=on_step, on_spend=on_spend))
        expiry = asyncio.ensure_future(self.drain.expired.wait())
        try:
            done, _ = await asyncio.wait({task, expiry}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away
            task.cancel()
            raise
        finally:
            expiry.cancel()
        if task in done:
            try:
                result = task.result()
            except CascadeError as error:
                self.health.record(getattr(error, "partial", None), request_id)
                raise
            self.health.record(result, request_id)
            return result
        task.cancel()
        raise _BadRequest(503, "the server is shutting down; this request was cancelled before it finished",
                          kind="server_shutting_down")

    def failure(self, error: BaseException) -> _BadRequest:
        """A solve that ended in an error, as an HTTP error with the partial result."""
        if isinstance(error, _BadRequest):
            return error
        partial = getattr(error, "partial", None)
        extra = {"partial": _extension(partial, self)} if isinstance(partial, Result) else None
        if isinstance(error, StepFailedError):
            return _BadRequest(502, str(error), kind="upstream_error", extra=extra)
        if isinstance(error, RequestTimeoutError):
            return _BadRequest(504, str(error), kind="timeout", extra=extra)
        if isinstance(error, ConfigError):
            return _BadRequest(400, str(error))
        if isinstance(error, CascadeError):
            return _BadRequest(500, str(error), kind="cascade_error", extra=extra)
        logger.exception("unexpected error while solving", exc_info=error)
        return _BadRequest(500, f"internal error ({type(error).__name__})", kind="internal_error")


def _extension(result: Result, state: "_App") -> dict:
    """The `cascade` field of a response: what the cascade did and spent, and, when it
    degraded, why: the failures of this request and the tiers dropped by earlier ones."""
    runner = state.runner
    dropped = [d.to_json() for d in state.health.dropped()]
    return {
        "answer": result.answer, "cost": result.cost.total, "budget": result.budget,
        "escalation_rate": result.escalation_rate, "stop_reason": result.stop_reason,
        "cap_intervened": result.cap_intervened, "degraded": result.degraded or bool(dropped),
        "degraded_steps": list(result.degraded_steps),
        "degraded_reasons": [f"step {s.index}: {f}" for s in result.steps for f in s.failures],
        "dropped_tiers": dropped, "authors": [s.author for s in result.steps],
        "steps": [_step_json(s) for s in result.steps],
        # resolve mode: the steps a higher tier's re-solve replaced (their cost is in "cost")
        "set_aside": [_step_json(s) for s in result.set_aside],
        "per_tier": [{"name": name, "prefill_tokens": u.prefill_tokens,
                      "generated_tokens": u.generated_tokens, "cost": u.cost}
                     for name, u in zip(result.tier_names, result.cost.per_tier, strict=False)],
        "models": [m.info.name for m in runner.models],
        "pacing": _pacing(state.config.paced),
    }


def _pacing(paced: PacedPolicy | None) -> dict | None:
    """The pacer's state after this request: its next threshold, the requests it has seen
    finish, their mean cost and the ceiling that mean is guaranteed to be under, and the
    requests still running (which the next threshold already counts)."""
    if paced is None:
        return None
    _, threshold, cap = paced.curve.candidates[paced.column]
    return {"budget": paced.budget, "method": paced.method, "next_threshold": threshold, "cap": cap,
            "requests": paced.pacer.n, "mean_cost": paced.mean_cost,
            "ceiling": paced.bound() if paced.pacer.n else None, "running": len(paced.pacer.running)}


def _step_json(step: Step) -> dict:
    return {"index": step.index, "text": step.text, "author": step.author, "tier": step.tier,
            "cost": step.cost, "escalated": step.escalated, "degraded": step.degraded}


def _usage(result: Result) -> dict:
    prompt = sum(u.prefill_tokens for u in result.cost.per_tier)
    completion = sum(u.generated_tokens for u in result.cost.per_tier)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(result: Result) -> str:
    return "stop" if result.stop_reason in ("answer", "eos") else "length"


def _error_body(error: _BadRequest) -> dict:
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}
    if error.extra:
        body.update(error.extra)
    return {"error": body}


def create_app(runner: Cascade, config: ServerConfig = ServerConfig()):
    """The ASGI app (FastAPI) serving `runner` as the model `config.model_name`."""
    # fastapi and uvicorn are the optional [serve] extra: imported only when a server is made.
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if not isinstance(runner, Cascade):
        raise ConfigError(f"create_app needs a Cascade, got {type(runner).__name__}")
    state = _App(runner, config)
    app = FastAPI(title="stepcascade", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cascade_app = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404/405 in the OpenAI error shape
        error = _BadRequest(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(_error_body(error), status_code=exc.status_code)

    def reject(error: _BadRequest, request_id: str, started: float):
        logger.info("request %s rejected: %d %s (%.1f ms)", request_id, error.status, error.message[:200],
                    1000 * (time.perf_counter() - started))
        return JSONResponse(_error_body(error), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health():
        counts = {"inflight": state.inflight, "running": state.running, "waiting": state.waiting}
        if state.drain.draining:
            return JSONResponse({"status": "shutting_down", **counts}, status_code=503)
        paced = state.config.paced
        return {"status": "ok", **counts, **({"pacing": _pacing(paced)} if paced is not None else {})}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            state.check_auth(request)
        except _BadRequest as error:
            return JSONResponse(_error_body(error), status_code=error.status)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": state.created, "owned_by": "stepcascade",
                                            "tiers": [m.info.name for m in runner.models]}]}

    async def handle(request: Request, chat: bool):
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        started = time.perf_counter()
        try:
            if state.drain.draining:
                raise _BadRequest(503, "the server is shutting down", kind="server_shutting_down")
            state.check_auth(request)
            body = await state.read_body(request)
            problem = _chat_problem(body) if chat else _completion_problem(body)
            job = state.parse(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS, problem)
            state.check_capacity()
        except _BadRequest as error:
            return reject(error, request_id, started)
        logger.info("request %s: %s, prompt %d chars, budget %s, stream %s%s", request_id,
                    "chat" if chat else "completion", len(job.problem), job.budget, job.stream,
                    f", prompt {job.problem!r}" if config.log_prompts else "")
        if job.stream:
            return StreamingResponse(_stream(state, job, chat, request_id, started),
                                     media_type="text/event-stream")
        state.inflight += 1
        try:
            result = await state.run(job, request_id)
        except BaseException as error:  # noqa: BLE001 - every failure is answered
            if isinstance(error, asyncio.CancelledError):
                raise
            return reject(state.failure(error), request_id, started)
        finally:
            state.inflight -= 1
        _log_done(request_id, result, started)
        text = runner.delimiter.join(step.text for step in result.steps)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": _finish_reason(result)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(result)}
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": config.model_name, "choices": [choice],
                "usage": _usage(result), "cascade": _extension(result, state)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _completion_problem(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise _BadRequest(400, "prompt is required (the problem text)", "prompt")
    if not isinstance(prompt, str):
        raise _BadRequest(400, "prompt must be a string (or a list of one string); token-id prompts are "
                               "not accepted, the cascade renders the prompt per model", "prompt")
    return prompt


def _chat_problem(body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "messages is required (a non-empty list)", "messages")
    problem = None
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant",
                                                                           "developer"):
            raise _BadRequest(400, "each message needs a role of system, developer, user or assistant",
                              "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _BadRequest(400, "only text content parts are accepted", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _BadRequest(400, "message content must be a string", "messages")
        if message["role"] == "user":
            problem = content
    if problem is None:
        raise _BadRequest(400, "messages has no user message (the problem)", "messages")
    return problem


def _log_done(request_id: str, result: Result, started: float) -> None:
    logger.info("request %s done: %d steps, cost %.2f, escalation %.0f%%, %s%s (%.1f ms)", request_id,
                len(result.steps), result.cost.total, 100 * result.escalation_rate, result.stop_reason,
                ", degraded" if result.degraded else "", 1000 * (time.perf_counter() - started))


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(state: _App, job: _Job, chat: bool, request_id: str, started: float):
    """Server-sent events: one chunk per accepted step as it is decided, then a final chunk
    with finish_reason, usage and the cascade summary, then [DONE]."""
    runner, config = state.runner, state.config
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, extra: dict | None = None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {"id": request_id, "object": kind, "created": created, "model": config.model_name,
               "choices": [choice]}
        if extra:
            out.update(extra)
        return out

    def on_step(step: Step) -> None:
        loop.call_soon_threadsafe(steps.put_nowait, step)

    state.inflight += 1
    task = asyncio.ensure_future(state.run(job, request_id, on_step=on_step))
    try:
        first = True
        while True:
            getter = asyncio.ensure_future(steps.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                step = getter.result()
                yield _sse(chunk(step.text + runner.delimiter, None, {"cascade": {"step": _step_json(step)}},
                                 first=first))
                first = False
                continue
            getter.cancel()
            while not steps.empty():  # steps decided in the same round as the end
                step = steps.get_nowait()
                yield _sse(chunk(step.text + runner.delimiter, None, {"cascade": {"step": _step_json(step)}},
                                 first=first))
                first = False
            break
        try:
            result = task.result()
        except BaseException as error:  # noqa: BLE001 - reported in the stream
            if isinstance(error, asyncio.CancelledError):
                raise
            failure = state.failure(error)
            logger.info("request %s failed mid-stream: %d %s", request_id, failure.status,
                        failure.message[:200])
            yield _sse(_error_body(failure))
            yield _sse("[DONE]")
            return
        _log_done(request_id, result, started)
        # usage always rides on the final chunk (stream_options.include_usage is implied)
        extra = {"cascade": _extension(result, state), "usage": _usage(result)}
        yield _sse(chunk(None if chat else "", _finish_reason(result), extra, first=first))
        yield _sse("[DONE]")
    finally:
        if not task.done():
            task.cancel()  # the client went away: free the request's state
        state.inflight -= 1


def serve(runner: Cascade, config: ServerConfig = ServerConfig(), *, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests then get
    `config.limits.shutdown_grace` seconds to finish, and a clean 503 after that."""
    import uvicorn  # the optional [serve] extra

    app = create_app(runner, config)
    state: _App = app.state.cascade_app
    grace = config.limits.shutdown_grace

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            loop = getattr(self, "_cascade_loop", None)
            if loop is not None:
                # Cancel what is still running a little before uvicorn's own deadline, so
                # those requests get a 503 response instead of a dropped connection.
                loop.call_soon_threadsafe(state.drain.begin, max(0.1, grace - 1.0))
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutting down; a drained shutdown
            # is a clean exit (status 0) for `cascade serve`.
            self._captured_signals.clear()

        async def serve(self, sockets=None) -> None:
            self._cascade_loop = asyncio.get_running_loop()
            await super().serve(sockets)

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                    timeout_graceful_shutdown=int(math.ceil(grace)) + 1))
    server.run()


# ---- the `cascade serve` command (app.cli registers it) ----


def add_serve_arguments(parser) -> None:
    """The `serve`-specific flags (model, gate and step flags: `app.options`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="stepcascade", help="the model id clients send")
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="require 'Authorization: Bearer <key>' with the key read from env var VAR")
    parser.add_argument("--log-prompts", action="store_true", help="log prompt text (default: sizes only)")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="engine for local tiers")
    parser.add_argument("--remote", action="append", default=[], metavar="TIER=[NAME@]URL[,URL...]",
                        help="serve a tier from OpenAI-compatible server(s) (round robin); the tier's local "
                             "directory still gives its tokenizer and identity; NAME: served model name "
                             "(default: the tier name)")
    parser.add_argument("--on-large-failure", default="fail", choices=["fail", "degrade"],
                        help="a failing tier above the cheapest ends the request (fail) or is dropped and "
                             "the tier below writes its steps (degrade)")
    parser.add_argument("--retry-dropped-tier", type=float, default=ServerConfig.tier_retry_seconds,
                        metavar="SECONDS", help="--on-large-failure degrade: how long a failed tier stays "
                                                "dropped before a request tries it again")
    parser.add_argument("--step-timeout", type=float, default=None, help="seconds per model call")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-prompt-chars", type=int, default=ServerLimits.max_prompt_chars)
    parser.add_argument("--max-budget", type=float, default=ServerLimits.max_budget)
    parser.add_argument("--require-budget", action="store_true", help="reject requests without a budget")
    parser.add_argument("--shutdown-grace", type=float, default=ServerLimits.shutdown_grace)
    parser.add_argument("--max-running", type=int, default=ServerLimits.max_running,
                        help="requests solved at once (bounds the engines' KV memory)")
    parser.add_argument("--max-waiting", type=int, default=ServerLimits.max_waiting,
                        help="requests waiting for a slot beyond --max-running; past both: 429")
    parser.add_argument("--curve", default=None, metavar="FILE",
                        help="with --pace: an accuracy-budget curve (cascade calibrate --curve)")
    parser.add_argument("--pace", type=float, default=None, metavar="B",
                        help="pace the curve's threshold online so that the mean cost of the requests "
                             "served stays at B (the curve's largest budget <= B), under its hard cap")
    parser.add_argument("--pace-method", default="resolve", choices=["resolve", "budget"],
                        help="--pace: the curve family to move along (default resolve)")
    parser.add_argument("--pace-step", type=float, default=2.0,
                        help="--pace: thresholds moved per B of over- or underspend (default 2)")
    parser.add_argument("--pace-state", default=None, metavar="FILE",
                        help="--pace: keep the pacer's state in FILE after every request and resume from "
                             "it on the next start, so the mean-cost ceiling covers every request across "
                             "restarts")


def _parse_remote(specs: list[str], tier_names: tuple[str, ...]) -> dict[int, tuple[str, list[str]]]:
    remote: dict[int, tuple[str, list[str]]] = {}
    for spec in specs:
        tier, sep, rest = spec.partition("=")
        if not sep or not rest:
            raise ConfigError(f"--remote {spec!r}: expected TIER=[NAME@]URL[,URL...]")
        if tier not in tier_names:
            raise ConfigError(f"--remote {spec!r}: unknown tier {tier!r}; tiers: {list(tier_names)}")
        name, _, urls = rest.partition("@") if "@" in rest else ("", "", rest)
        remote[tier_names.index(tier)] = (name or tier, [u for u in urls.split(",") if u])
    return remote


def build_served_cascade(args) -> Cascade:
    """The cascade `cascade serve` serves, from the command line's fixed model paths."""
    specs = model_specs_from_args(args, backend=args.backend)  # --template per tier, --delimiter, --isolate
    remote = _parse_remote(args.remote, tier_names_for(len(specs)))
    specs = [dataclasses.replace(spec, backend="openai", endpoints=tuple(remote[k][1]),
                                 served_name=remote[k][0]) if k in remote else spec
             for k, spec in enumerate(specs)]
    gate_specs = gate_specs_from_args(args, len(specs))  # --gate with its settings (and --router)
    routed = gate_specs is not None and any(g.router is not None for g in gate_specs)
    routers = routers_from_args(args) if routed else None
    gates = build_gates(gate_specs, routers) if gate_specs else None
    if gates is None and all(spec.is_embedded for spec in specs):
        gates = [DEFAULT_EMBEDDED_GATE] * (len(specs) - 1)
    options = solve_options(args, specs, step_timeout=args.step_timeout)
    return Cascade(models=load_models(specs), gates=gates, options=options,
                   on_large_failure=args.on_large_failure)


def run_from_args(args) -> int:
    """`cascade serve`: build the cascade, then serve it until stopped."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    limits = ServerLimits(max_prompt_chars=args.max_prompt_chars, max_budget=args.max_budget,
                          require_budget=args.require_budget, request_timeout=args.request_timeout,
                          shutdown_grace=args.shutdown_grace, max_running=args.max_running,
                          max_waiting=args.max_waiting)
    if (args.curve is None) != (args.pace is None):
        raise ConfigError("--curve and --pace go together: --curve FILE --pace B serves the curve's gate "
                          "paced to a mean cost of B")
    if args.pace_state is not None and args.pace is None:
        raise ConfigError("--pace-state keeps a pacer's state: it needs --curve FILE --pace B")
    if args.pace is not None and args.gate is not None:
        raise ConfigError("--pace serves the curve's own gate; drop --gate")
    runner = build_served_cascade(args)
    paced = None
    if args.pace is not None:
        curve = load_budget_curve(args.curve, models=runner.models,
                                  routers=lambda file: load_router(file, models=runner.models))
        paced = curve.paced(args.pace_method, args.pace, step=args.pace_step, state_file=args.pace_state)
    config = ServerConfig(model_name=args.model_name, api_key=api_key, log_prompts=args.log_prompts,
                          limits=limits, tier_retry_seconds=args.retry_dropped_tier, paced=paced)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if paced is not None and paced.pacer.n:
        logger.info("pacing resumed from %s: %s", args.pace_state, paced.statement())
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: reachable from other machines%s", args.host,
                       "" if api_key else " and no API key is set")
    logger.info("serving %s (%s) on http://%s:%d", config.model_name,
                ", ".join(m.info.name for m in runner.models), args.host, args.port)
    try:
        serve(runner, config, host=args.host, port=args.port)
    finally:
        for model in runner.models:  # engines and HTTP clients shut down with the server
            close = getattr(model, "close", None)
            if callable(close):
                close()
    return 0
