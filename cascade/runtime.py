"""The step runtime: `Cascade` and the per-request step machine.

One request is a generator (the *step machine*) that yields model calls and receives
their outputs; it owns the step logic, the gate decisions, the hard cap and the cost
ledger, and knows nothing about how calls are executed. The *driver* runs many step
machines together on an asyncio event loop, one task per request: each backend has a
queue, and the calls that reach it while it is busy go to it as one batch when it is
free (a synchronous backend runs in a worker thread of its own; a backend with
`anext_steps`/`ascore_steps` coroutines is awaited directly and may have several
batches in flight). `asolve` is one request on the caller's loop; `solve` and
`solve_many` run the same driver to completion from synchronous code.

The cascade has N >= 2 tiers, cheapest first, and N - 1 gates; gate i judges tier i's
output and decides whether tier i + 1 takes over the step. Two models are the N = 2 case.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cascade.answer import extract_answer
from cascade.calibration_file import Calibration
from cascade.checks import check_budget, check_problem, check_problems
from cascade.cost import Cost, CostModel, Usage
from cascade.errors import ConfigError, RequestTimeoutError, StepFailedError
from cascade.gates import Confidence, ConfidenceGate, Gate, GateState, decide, effective_threshold
from cascade.records import Decision, Result, Step
from cascade.specs import ModelSpec, load_models, step_limits
from decoding import (
    Backend,
    BackendError,
    ScoreOutput,
    ScoreRequest,
    StepOutput,
    StepRequest,
)

__all__ = ["SolveOptions", "Cascade", "tier_names_for"]

Call = tuple[int, StepRequest | ScoreRequest]


@dataclass(frozen=True)
class SolveOptions:
    """Request-level settings.

    max_steps: steps before the loop gives up (the answer may then be None).
    max_step_tokens: tokens one step may take (per tier call).
    temperature: 0 = greedy; > 0 samples, seeded by (seed, problem, context).
    seed: see temperature. return_hidden: backends return hidden states (for routers).
    step_timeout: seconds one model call may take before it counts as a failure of that
        model (None = no limit); the fault policy (`on_large_failure`) then applies.
    request_timeout: seconds a whole request may take (None = no limit); past it the
        request ends with `RequestTimeoutError` carrying the partial Result.
    draft_ahead: while the next tier verifies a draft (a gate with
        `requires_verification`), the drafting tier already writes the following step from
        it, on the chance it is accepted; an accepted draft's next step is then ready when
        the verdict comes. The two calls run at the same time when the models do (each in
        a process of its own: `isolate=True`; separate devices or servers). Steps, answers
        and decisions are the same as without it; an early draft thrown away with a
        rejected step is charged to that step. It is only sent when what is left of the
        budget covers it on top of the verification and a whole step by the next tier,
        so it never takes an escalation's money.
    """

    max_steps: int = 32
    max_step_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    return_hidden: bool = False
    step_timeout: float | None = None
    request_timeout: float | None = None
    draft_ahead: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.draft_ahead, bool):
            raise ConfigError(f"draft_ahead must be True or False, got {self.draft_ahead!r}")
        for name in ("max_steps", "max_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        for name in ("step_timeout", "request_timeout"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a number of seconds > 0 or None, got {value!r}")


def tier_names_for(n: int) -> tuple[str, ...]:
    if n == 2:
        return ("small", "large")
    if n == 3:
        return ("small", "medium", "large")
    return tuple(f"tier{k}" for k in range(n))


class Cascade:
    """N models, cheapest first, and N - 1 gates between them.

        Cascade(small, large, gate)                      # two tiers
        Cascade(models=[small, medium, large], gates=[g1, g2])

    Models are `decoding.Backend`s; prices default to FLOPs ratios (`CostModel.flops`).
    on_large_failure: what a request does when a tier above the cheapest fails (an
        error, a timeout, malformed output): "fail" ends it with `StepFailedError`
        (naming the model and the step, carrying the partial Result); "degrade" drops
        that tier for the rest of the request, keeps the lower tier's text, and flags
        the Result (`degraded`, `degraded_steps`). A failure of the cheapest tier always
        fails the request.
    """

    def __init__(self, small: Backend | None = None, large: Backend | None = None,
                 gate: Gate | None = None, *, models: Sequence[Backend] | None = None,
                 gates: Sequence[Gate] | None = None, cost_model: CostModel | None = None,
                 tier_names: Sequence[str] | None = None,
                 options: SolveOptions = SolveOptions(), calibration=None,
                 on_large_failure: Literal["fail", "degrade"] = "fail") -> None:
        if on_large_failure not in ("fail", "degrade"):
            raise ConfigError(f"on_large_failure must be 'fail' or 'degrade', got {on_large_failure!r}")
        self.on_large_failure = on_large_failure
        if models is None:
            if small is None or large is None:
                raise ConfigError("give small= and large=, or models=[...]")
            models = [small, large]
        elif small is not None or large is not None:
            raise ConfigError("give either small=/large= or models=, not both")
        models = list(models)
        if len(models) < 2:
            raise ConfigError(f"a cascade needs at least 2 models, got {len(models)}")
        for model in models:
            if isinstance(model, type) or not isinstance(model, Backend):
                raise ConfigError(f"{model!r} is not a model backend: it needs info, next_steps, "
                                  "score_steps, "
                                  "prefill_bound and release, and the optional capabilities native_async, "
                                  "supports_fork, anext_steps, ascore_steps, fork and close (subclass "
                                  "decoding.Backend to inherit their defaults)")
        if gates is None:
            gates = [gate if gate is not None else ConfidenceGate()] * (len(models) - 1)
        elif gate is not None:
            raise ConfigError("give either gate= or gates=, not both")
        self.models = models
        self.gates = self._check_gates(gates)
        delimiters = {m.info.step_delimiter for m in models}
        if len(delimiters) != 1:
            names = {m.info.name: m.info.step_delimiter for m in models}
            raise ConfigError(f"the models disagree on the step delimiter: {names}")
        self.delimiter = delimiters.pop()
        self.cost_model = cost_model or CostModel.flops([m.info.num_parameters for m in models])
        if len(self.cost_model.prices) != len(models):
            raise ConfigError(f"cost_model has {len(self.cost_model.prices)} price entries "
                              f"for {len(models)} models")
        for k in range(1, len(models)):
            # Every step starts at tier 0 and escalates upwards: the order is the cascade's meaning.
            below, above = self.cost_model.prices[k - 1].output, self.cost_model.prices[k].output
            if above < below:
                raise ConfigError(f"models must be ordered cheapest first: {models[k - 1].info.name!r} "
                                  f"({below:g} per token) comes before the cheaper {models[k].info.name!r} "
                                  f"({above:g} per token)")
        self.tier_names = tuple(tier_names) if tier_names else tier_names_for(len(models))
        if len(self.tier_names) != len(models):
            raise ConfigError(f"tier_names has {len(self.tier_names)} names for {len(models)} models")
        self.options = options
        self._drivers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Driver] = \
            weakref.WeakKeyDictionary()
        self.calibration = None
        if calibration is not None:
            calibration.check_models(self)
            self.calibration = calibration

    def _check_gates(self, gates: Sequence[Gate]) -> list[Gate]:
        if isinstance(gates, (str, bytes, Gate)) or not isinstance(gates, Iterable):
            raise ConfigError(f"gates must be a list of {len(self.models) - 1} gate(s), one per position, "
                              f"got {gates!r}; for one gate at every position give gate=")
        gates = list(gates)
        if len(gates) != len(self.models) - 1:
            raise ConfigError(f"{len(self.models)} models need {len(self.models) - 1} gates, "
                              f"got {len(gates)}")
        for gate in gates:
            if isinstance(gate, type):
                raise ConfigError(f"{gate.__name__} is a gate class, not a gate: give an instance, "
                                  f"e.g. {gate.__name__}()")
            if not isinstance(gate, Gate):
                raise ConfigError(f"{gate!r} is not a gate: it needs threshold, mode, probe_tokens, "
                                  "requires_verification and score(state), and the optional capabilities "
                                  "requires_hidden, rewrite, max_corrections, needs_verification(state) and "
                                  "check_models(models) (subclass cascade.Gate to inherit their defaults)")
        for k, gate in enumerate(gates):
            # A gate that carries a router checks it was trained for the models it sits between.
            gate.check_models(self.models[k:k + 2])
        return gates

    @classmethod
    def from_pretrained(cls, small: str | Path | None = None, large: str | Path | None = None,
                        gate: Gate | None = None, *, models: Sequence[str | Path] | None = None,
                        gates: Sequence[Gate] | None = None, step_delimiter: str = "\n\n",
                        prompt_template: str | None = None, dtype: str = "float32",
                        device: str = "cpu", options: SolveOptions = SolveOptions(),
                        cost_model: CostModel | None = None, isolate: bool = False) -> Cascade:
        """Load each model through `cascade.specs.load_models` (local path, hub id, embedded:<tier>
        or a .gguf file).

        isolate: every model above the first runs in a process of its own
        (`decoding.ProcessBackend`): concurrent requests then use a core (or drive a GPU)
        per model instead of sharing one GIL; traces are the same."""
        paths = list(models) if models is not None else [p for p in (small, large) if p is not None]
        if models is not None and (small is not None or large is not None):
            raise ConfigError("give either small=/large= or models=, not both")
        if len(paths) < 2:
            raise ConfigError("from_pretrained needs small= and large= (or models=[...])")
        backends = load_models([ModelSpec(p, backend="process" if isolate and k > 0 else None,
                                          template=prompt_template, delimiter=step_delimiter, dtype=dtype,
                                          device=device) for k, p in enumerate(paths)])
        return cls(models=backends, gate=gate, gates=gates, options=options, cost_model=cost_model)

    @classmethod
    def from_calibration(cls, path: str | Path, models: Sequence[Backend] | None = None,
                         options: SolveOptions | None = None) -> Cascade:
        """A cascade that looks its thresholds up in a saved calibration.

        Without `models`, the models are loaded by the names the calibration recorded
        ("embedded:<tier>" for the shipped ones); either way their fingerprints must match.
        """
        calibration = Calibration.load(path)
        if models is None:
            models = load_models([ModelSpec(m["name"]) for m in calibration.models])
        gates = calibration.gates_for(math.inf)
        return cls(models=models, gates=gates, options=options or _default_options(models),
                   calibration=calibration)

    # ---- public entry points ------------------------------------------------------------

    def solve(self, problem: str, budget: float | None = None, *,
              gates: Sequence[Gate] | None = None, options: SolveOptions | None = None) -> Result:
        """Solve one problem. `budget` is a hard cap in cost units (None = no cap)."""
        return self.solve_many([problem], budget, gates=gates, options=options)[0]

    async def asolve(self, problem: str, budget: float | None = None, *,
                     gates: Sequence[Gate] | None = None, options: SolveOptions | None = None,
                     on_step: Callable[[Step], None] | None = None,
                     on_spend: Callable[[float, float], None] | None = None) -> Result:
        """Solve one problem on the running event loop; concurrent `asolve` calls on one
        loop advance together and share each backend's batches.

        on_step: called with each accepted Step as soon as it is decided (streaming).
        on_spend: called as the request sends model calls, with (spent, at_most): the cost of
        the calls it has finished, and that plus the most the calls now sent can cost. A
        request cancelled or failed mid-call has spent between the two (its last call's work
        is done or abandoned, not returned): what to charge it when every unit must be counted.
        Cancelling the task frees the request's backend state and disturbs no other request.
        """
        budget, gates, options = self._prepare(budget, gates, options)
        return await self._driver().run(
            self.step_machine(check_problem(problem), budget, gates, options, on_step=on_step,
                              on_spend=on_spend), options)

    def solve_many(self, problems: Iterable[str], budget: float | None = None, *,
                   gates: Sequence[Gate] | None = None, options: SolveOptions | None = None,
                   concurrency: int = 16, return_exceptions: bool = False) -> list[Result]:
        """Solve many problems, advancing up to `concurrency` requests step by step together.

        A request that fails does not disturb the others. With return_exceptions=True its
        error (a CascadeError carrying the partial result) takes its place in the list;
        otherwise the first error is raised once every request has ended."""
        problems = check_problems(problems)
        budget, gates, options = self._prepare(budget, gates, options)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")

        async def run_all() -> list:
            slots = asyncio.Semaphore(concurrency)

            async def one(problem: str) -> Result:
                async with slots:
                    return await self._driver().run(self.step_machine(problem, budget, gates, options),
                                                    options)

            return await asyncio.gather(*(one(p) for p in problems), return_exceptions=True)

        outcomes = _run_sync(run_all())
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        return outcomes

    def _prepare(self, budget, gates, options) -> tuple[float | None, list[Gate], SolveOptions]:
        budget = check_budget(budget)
        if gates is None and self.calibration is not None and budget is not None:
            # The threshold certified for the largest calibrated budget <= this one; the
            # budget itself is still enforced as a hard cap.
            gates = self.calibration.gates_for(budget)
        gates = self._check_gates(gates) if gates is not None else self.gates
        options = options or self.options
        if not isinstance(options, SolveOptions):
            raise ConfigError(f"options must be a SolveOptions, got {type(options).__name__}")
        return budget, gates, options

    def _driver(self) -> _Driver:
        loop = asyncio.get_running_loop()
        driver = self._drivers.get(loop)
        if driver is None:
            driver = self._drivers[loop] = _Driver(self.models)
        return driver

    # ---- the step machine ---------------------------------------------------------------

    def step_machine(self, problem: str, budget: float | None, gates: Sequence[Gate],
                     options: SolveOptions, request_id: str | None = None,
                     on_step: Callable[[Step], None] | None = None,
                     on_spend: Callable[[float, float], None] | None = None
                     ) -> Generator[Call, StepOutput | ScoreOutput, Result]:
        """The generator that solves one problem; see the module docstring."""
        run = _Run(self, problem, budget, list(gates), options, request_id or uuid.uuid4().hex, on_step,
                   on_spend)
        return run.machine()


class _Deadline(Exception):
    """Thrown into a step machine when its request has run past `request_timeout`."""


_EMPTY = StepOutput("", (), (), (), "max_tokens", 0, 0.0)


def _check_output(output: object, expected: type, name: str) -> None:
    """Malformed backend output is a BackendError (so the fault policy applies), not a
    wrong answer or a crash somewhere downstream."""
    if not isinstance(output, expected):
        raise BackendError(f"returned {type(output).__name__}, expected {expected.__name__}", name)
    if len(output.logprobs) != len(output.token_ids):
        raise BackendError(f"returned {len(output.token_ids)} tokens but {len(output.logprobs)} "
                           "log-probabilities", name)
    if any(not math.isfinite(lp) or lp > 1e-6 for lp in output.logprobs):
        raise BackendError("returned log-probabilities that are not finite numbers <= 0", name)
    if isinstance(output, StepOutput) and (not isinstance(output.text, str)
                                           or len(output.entropies) != len(output.token_ids)):
        raise BackendError("returned a step whose text or entropies do not match its tokens", name)
    if output.prefill_tokens < 0:
        raise BackendError(f"reported {output.prefill_tokens} prefill tokens", name)
    if isinstance(output, StepOutput) and not 0 <= output.reused_tokens <= output.generated_tokens:
        raise BackendError(f"reported {output.reused_tokens} reused tokens for a step of "
                           f"{output.generated_tokens}", name)


@dataclass
class _StepLog:
    """What the step being written has gathered: its gate decisions, the rejected drafts,
    the failures of degraded tiers, each tier's output so far (a failed tier's step falls
    back to the one below) and the token fixes made."""

    decisions: list[Decision] = field(default_factory=list)
    drafts: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    outputs: dict[int, StepOutput] = field(default_factory=dict)
    degraded: bool = False
    corrections: int = 0


@dataclass(frozen=True)
class _Handover:
    """A resolve-mode escalation: `tier` solves the problem again; `draft` is the step
    that triggered it (set aside with the steps before it)."""

    tier: int
    draft: Step


class _Run:
    """State of one request while its step machine runs.

    A step is written by one small piece per mechanism, composed by `write_step`: the
    draft (`attempt`, reusing a draft-ahead), the route probe (`finish`, `keep_lower`),
    verification and screening (`verification_for`), the gate's decision (`judge`), the
    token fix (`correction`, `take_fix`, `with_fixed_text`), draft-ahead (`wants_ahead`,
    `verify_and_draft_ahead`, `take_ahead`, `drop_ahead`) and degrade-on-failure (`fail`,
    `fall_back`); `climb` runs them tier by tier.
    """

    def __init__(self, cascade: Cascade, problem: str, budget: float | None,
                 gates: list[Gate], options: SolveOptions, request_id: str,
                 on_step: Callable[[Step], None] | None = None,
                 on_spend: Callable[[float, float], None] | None = None) -> None:
        self.cascade = cascade
        self.problem = problem
        self.budget = budget
        self.gates = gates
        self.options = options
        self.request_id = request_id
        self.on_step = on_step
        self.on_spend = on_spend
        self.n = len(cascade.models)
        self.context = ""
        # Text of the step being written that the verifying tier has already fixed (its
        # corrections of rejected drafts, VerifyGate(rewrite="token")); "" at each step start.
        self.fixed = ""
        self.fixed_tokens = 0
        self.steps: list[Step] = []
        self.spent = [Usage()] * self.n
        self.step_usage = [Usage()] * self.n
        self.cap_intervened = False
        self.failed: set[int] = set()  # tiers that failed in this request (degrade mode)
        # Resolve mode: the tier every step starts at (raised when a tier takes the problem
        # over) and the steps the re-solves replaced.
        self.floor = 0
        self.set_aside: list[Step] = []
        # draft_ahead: the cheapest tier's draft of the next step, written while this step's
        # draft was verified: (the context it continues, the output, what it cost). Its cost
        # counts against the budget at once and joins a step's usage when used or dropped.
        self.ahead: tuple[str, StepOutput, Usage] | None = None

    @property
    def here(self) -> str:
        """Where the step being written goes on from: the context and its fixed text."""
        return self.context + self.fixed

    def step_tokens_left(self) -> int:
        """Tokens the step may still take (the fixed text counted in the top tier's tokens)."""
        return max(1, self.options.max_step_tokens - self.fixed_tokens)

    # -- money ----------------------------------------------------------------------------

    def used(self) -> float:
        """What the request has spent so far (the step being written and an early draft included)."""
        used = math.fsum(u.cost for u in self.spent) + math.fsum(u.cost for u in self.step_usage)
        return used + (self.ahead[2].cost if self.ahead is not None else 0.0)

    def remaining(self) -> float:
        return math.inf if self.budget is None else self.budget - self.used()

    def gate_state(self, index: int, tier: int, output: StepOutput, gate: Gate) -> GateState:
        """What gate `tier` sees of this step; a budget-aware gate (`cascade.budget.BudgetGate`)
        also gets the price of escalating now. `budget_aware` is read with a default because
        it is an optional marker outside the Gate protocol's required members."""
        escalation = self.worst(tier + 1, self.here, self.step_tokens_left()) \
            if getattr(gate, "budget_aware", False) else None
        return GateState(self.problem, index, tier, self.here, output,
                         Confidence.of(output, gate.probe_tokens or 4),
                         budget=self.budget, spent=self.used(), escalation_cost=escalation)

    def usage(self, tier: int, prefill: int, generated: int, seconds: float) -> Usage:
        return Usage(prefill, generated, seconds, self.cascade.cost_model.charge(tier, prefill, generated))

    def charge(self, tier: int, prefill: int, generated: int, seconds: float) -> None:
        self.step_usage[tier] = self.step_usage[tier] + self.usage(tier, prefill, generated, seconds)

    def worst(self, tier: int, context: str, max_tokens: int) -> float:
        """The most a step call by `tier` from `context` could cost."""
        return self.cascade.cost_model.worst_case(tier, self.prefill_bound(tier, context), max_tokens)

    def worst_score(self, tier: int, text: str) -> float:
        """The most scoring `text` (the context and the step) by `tier` could cost."""
        return self.cascade.cost_model.charge(tier, self.prefill_bound(tier, text), 0)

    def prefill_bound(self, tier: int, context: str) -> int:
        return self.cascade.models[tier].prefill_bound(self.request_id, self.problem, context)

    def token_allowance(self, tier: int, context: str, wanted: int) -> int:
        """Tokens tier may decode now without the request spending past its cap."""
        if self.budget is None:
            return wanted
        bound = self.prefill_bound(tier, context)
        return min(wanted, self.cascade.cost_model.affordable_tokens(tier, bound, self.remaining()))

    def fits_step(self, tier: int) -> bool:
        """Does a whole step by `tier` (worst case) fit in what is left?"""
        return self.token_allowance(tier, self.here, self.step_tokens_left()) >= self.step_tokens_left()

    def fits_resolve(self, tier: int) -> bool:
        """Does the first step of a re-solve by `tier` (worst case, from the problem alone) fit?"""
        return self.token_allowance(tier, "", self.options.max_step_tokens) >= self.options.max_step_tokens

    def resolves(self, tier: int) -> bool:
        """Does an escalation by gate `tier` hand the whole problem to the next tier? (resolve
        mode, from the tier the request's steps start at; below it, after the cap sent a
        step down, an escalation is a step's)"""
        return self.gates[tier].mode == "resolve" and tier >= self.floor

    def degrades(self, tier: int) -> bool:
        """May the request carry on without `tier` after it failed? (never the cheapest)"""
        return tier > 0 and self.cascade.on_large_failure == "degrade"

    # -- calls ----------------------------------------------------------------------------

    def step_request(self, tier: int, context: str, max_tokens: int) -> StepRequest:
        return StepRequest(self.request_id, self.problem, context, max_tokens,
                           self.options.temperature, self.options.seed,
                           # A gate that reads hidden states (AdvantageGate) gets them.
                           self.options.return_hidden
                           or (tier < self.n - 1 and self.gates[tier].requires_hidden))

    def checked_step(self, tier: int, request: StepRequest, output: object) -> StepOutput:
        """A generated step, checked (malformed output is the model's failure)."""
        name = self.cascade.models[tier].info.name
        _check_output(output, StepOutput, name)
        if output.generated_tokens > request.max_tokens:
            raise BackendError(f"returned {output.generated_tokens} tokens, more than the "
                               f"{request.max_tokens} asked for", name)
        return output

    def step_usage_of(self, tier: int, output: StepOutput) -> Usage:
        # Tokens reused from a scored draft were charged when it was scored.
        return self.usage(tier, output.prefill_tokens, output.decoded_tokens, output.seconds)

    def took_step(self, tier: int, request: StepRequest, output: object) -> StepOutput:
        """Check a generated step and charge it."""
        output = self.checked_step(tier, request, output)
        self.step_usage[tier] = self.step_usage[tier] + self.step_usage_of(tier, output)
        return output

    def took_score(self, tier: int, output: object) -> ScoreOutput:
        """Check a verification and charge it."""
        _check_output(output, ScoreOutput, self.cascade.models[tier].info.name)
        self.charge(tier, output.prefill_tokens + output.scored_tokens, 0, output.seconds)
        return output

    def generate(self, tier: int, context: str, max_tokens: int):
        request = self.step_request(tier, context, max_tokens)
        if self.on_spend is not None:
            self.sending(self.worst(tier, context, max_tokens))
        return self.took_step(tier, request, (yield (tier, request)))

    def verify(self, tier: int, text: str):
        if self.on_spend is not None:
            self.sending(self.worst_score(tier, self.here + text))
        return self.took_score(tier, (yield (tier, ScoreRequest(self.request_id, self.problem,
                                                               self.here, text))))

    def sending(self, at_most: float) -> None:
        """Tell `on_spend` of calls about to be sent that can cost at most `at_most`."""
        spent = self.used()
        self.on_spend(spent, spent + at_most)

    # -- mechanism: draft -----------------------------------------------------------------

    def attempt(self, tier: int):
        """Tier's output for the step: the early draft made while the last step was verified
        (draft-ahead), a route probe, a speculative draft, or (top tier) the step itself."""
        max_tokens = self.step_tokens_left()
        if tier == self.n - 1:
            return (yield from self.generate(tier, self.here, max_tokens))
        if tier == 0:
            early = self.take_ahead()
            if early is not None:
                return early
        gate = self.gates[tier]
        allowance = self.token_allowance(tier, self.here, max_tokens)
        size = min(gate.probe_tokens, allowance) if gate.mode == "route" else allowance
        if size < 1:
            return _EMPTY
        return (yield from self.generate(tier, self.here, size))

    # -- mechanism: route probe -------------------------------------------------------------

    def finish(self, tier: int, output: StepOutput):
        """A lower tier keeps the step: a route probe that did not finish the step goes on."""
        gate = self.gates[tier]
        if gate.mode == "route" and output.stop_reason == "max_tokens":
            rest = self.token_allowance(tier, self.here + output.text,
                                        self.step_tokens_left() - output.generated_tokens)
            if rest > 0:
                continuation = yield from self.generate(tier, self.here + output.text, rest)
                output = _join(output, continuation)
        return output

    def keep_lower(self, log: _StepLog, tier: int, output: StepOutput):
        """The step stays with `tier` (below the top): finish its route probe. A middle tier
        failing there hands the step back to the tier below (degrade). Returns (tier, output)."""
        while tier < self.n - 1:
            try:
                return tier, (yield from self.finish(tier, output))
            except BackendError as error:
                tier, output = self.fall_back(log, tier, error)
        return tier, output

    # -- mechanism: verify / screen ---------------------------------------------------------

    def verification_for(self, log: _StepLog, tier: int, gate: Gate, state: GateState):
        """The next tier's scoring of tier's draft, when the gate asks for one: a draft with
        text, a next tier still up, the gate's screen letting it through, and room in the
        budget for the pass (else the draft stands unverified and the cap is noted). Sent
        with an early draft of the next step when draft-ahead applies. None when not run."""
        output = state.output
        if not (gate.requires_verification and output.text and tier + 1 not in self.failed
                and gate.needs_verification(state)):
            return None
        if self.worst_score(tier + 1, self.here + output.text) > self.remaining():
            self.cap_intervened = True  # no room to verify: the draft stands
            return None
        try:
            if self.wants_ahead(tier, output):
                return (yield from self.verify_and_draft_ahead(tier, output))
            return (yield from self.verify(tier + 1, output.text))
        except BackendError as error:
            self.fail(log, tier + 1, error)
            return None

    def judge(self, log: _StepLog, index: int, tier: int, output: StepOutput):
        """Gate `tier` judges its tier's output (verifying it first if the gate asks) and the
        decision is recorded; returns (escalate to tier + 1, the verification or None). An
        escalation is refused when the next tier has failed (degrade) or its whole step
        does not fit in the budget (the cap)."""
        gate = self.gates[tier]
        state = self.gate_state(index, tier, output, gate)
        verification = yield from self.verification_for(log, tier, gate, state)
        if verification is not None:
            state = dataclasses.replace(state, verification=verification, spent=self.used())
        score, escalate = decide(gate, state)
        unavailable = escalate and tier + 1 in self.failed
        fits = self.fits_resolve(tier + 1) if self.resolves(tier) else self.fits_step(tier + 1)
        capped = escalate and not unavailable and not fits
        moves = escalate and not unavailable and not capped
        log.decisions.append(Decision(tier, score, effective_threshold(gate, state), moves, capped,
                                      unavailable))
        self.cap_intervened |= capped
        log.degraded |= unavailable
        return moves, verification

    # -- mechanism: token fix ---------------------------------------------------------------

    def correction(self, tier: int, gate: Gate, verification: ScoreOutput | None, done: int) -> str | None:
        """The text a rejected draft's verification fixes, when the gate asks for token-level
        rewriting (VerifyGate(rewrite="token")) and it applies: greedy decoding, the top tier
        verifying, a greedy prefix reported, fewer than `max_corrections` so far, and room
        in the budget for another draft, its verification and the top tier finishing the
        step (so a correction never takes the money the step needs)."""
        if gate.rewrite != "token" or verification is None or tier + 2 != self.n \
                or self.options.temperature > 0 or done >= gate.max_corrections:
            return None
        fix, tokens = verification.greedy_prefix, verification.greedy_prefix_tokens
        if not fix or not isinstance(fix, str) \
                or self.cascade.delimiter in fix[: -len(self.cascade.delimiter)] \
                or not isinstance(tokens, int) or tokens < 1:
            return None  # nothing reported, or a malformed report: the top tier writes the step
        if self.fixed_tokens + tokens > self.options.max_step_tokens:
            return None  # past the step's length limit: the top tier writes the rest, cut there
        if self.budget is not None:
            here = self.here + fix
            left = max(1, self.step_tokens_left() - tokens)
            verification = self.cascade.cost_model.charge(
                tier + 1, self.prefill_bound(tier + 1, here) + left, 0)
            if (self.worst(tier, here, left) + verification + self.worst(tier + 1, here, left)
                    > self.remaining()):
                return None
        return fix

    def take_fix(self, log: _StepLog, fix: str, verification: ScoreOutput) -> bool:
        """Keep the verifying tier's fixed text (the drafting tier goes on from there,
        verified again); True when it completes the step (a delimiter, or the step's length)."""
        self.fixed += fix
        self.fixed_tokens += verification.greedy_prefix_tokens
        log.corrections += 1
        return (self.fixed.endswith(self.cascade.delimiter)
                or self.fixed_tokens >= self.options.max_step_tokens)

    def with_fixed_text(self, tier: int, output: StepOutput) -> tuple[int, StepOutput]:
        """The step's fixed text joined to the output that completes it (the step counts as
        escalated: the verifying tier wrote part of it)."""
        tier = max(tier, 1)
        ends = "delimiter" if self.fixed.endswith(self.cascade.delimiter) else "max_tokens"
        output = dataclasses.replace(output, text=self.fixed + output.text,
                                     stop_reason=output.stop_reason if output.text else ends)
        self.fixed, self.fixed_tokens = "", 0
        return tier, output

    # -- mechanism: draft-ahead -------------------------------------------------------------

    def wants_ahead(self, tier: int, output: StepOutput) -> bool:
        """Draft the next step while this draft is verified? (see SolveOptions.draft_ahead)"""
        if not self.options.draft_ahead or tier != 0 or output.stop_reason != "delimiter" \
                or extract_answer(output.text) is not None or len(self.steps) + 1 >= self.options.max_steps:
            return False  # the draft ends the request, or no step follows it
        if self.budget is None:
            return True
        ahead_context = self.here + output.text
        verification = self.worst_score(tier + 1, ahead_context)
        return verification + self.worst(tier, ahead_context, self.options.max_step_tokens) \
            + self.worst(tier + 1, self.here, self.step_tokens_left()) <= self.remaining()

    def verify_and_draft_ahead(self, tier: int, output: StepOutput):
        """Verification of tier's draft by tier + 1, and tier's draft of the step after it,
        sent together; keeps the early draft in `self.ahead` (a failed early draft is
        dropped: the next step asks again). Returns the verification."""
        ahead_context = self.here + output.text
        score = ScoreRequest(self.request_id, self.problem, self.here, output.text)
        request = self.step_request(tier, ahead_context, self.options.max_step_tokens)
        if self.on_spend is not None:
            self.sending(self.worst_score(tier + 1, ahead_context)
                         + self.worst(tier, ahead_context, self.options.max_step_tokens))
        verification, ahead = yield [(tier + 1, score), (tier, request)]
        try:
            if isinstance(ahead, BackendError):
                raise ahead
            ahead = self.checked_step(tier, request, ahead)
            self.ahead = (ahead_context, ahead, self.step_usage_of(tier, ahead))
        except BackendError:
            pass  # only a chance taken: the next step asks again, and fails there if it must
        if isinstance(verification, BackendError):
            raise verification
        return self.took_score(tier + 1, verification)

    def take_ahead(self) -> StepOutput | None:
        """The early draft, when it continues exactly where the step starts (its cost joins
        the step); an early draft from another context is dropped."""
        if self.ahead is None:
            return None
        context, output, usage = self.ahead
        if context != self.here:
            self.drop_ahead()
            return None
        self.ahead = None
        self.step_usage[0] = self.step_usage[0] + usage
        return output

    def drop_ahead(self) -> None:
        """The early draft will not be used: its cost joins the current step's usage."""
        if self.ahead is not None:
            self.step_usage[0] = self.step_usage[0] + self.ahead[2]
            self.ahead = None

    # -- mechanism: degrade on failure ------------------------------------------------------

    def fail(self, log: _StepLog, tier: int, error: BackendError) -> None:
        """A tier failed: the request fails, unless it degrades (`on_large_failure`), in
        which case the tier is dropped for the rest of the request and the step is flagged."""
        if not self.degrades(tier):
            raise error
        log.degraded = True
        self.failed.add(tier)
        log.failures.append(f"{self.cascade.tier_names[tier]}: {error}")

    def fall_back(self, log: _StepLog, tier: int, error: BackendError) -> tuple[int, StepOutput]:
        """Tier failed while writing: the tier below keeps the output it already has."""
        if tier - 1 not in log.outputs:
            raise error  # the step started at `tier` (resolve mode): climb handles it
        self.fail(log, tier, error)
        return tier - 1, log.outputs[tier - 1]

    # -- mechanism: resolve -----------------------------------------------------------------

    def first_tier(self) -> int:
        """The tier a step starts at: the cheapest, or after a re-solve the tier that took
        the problem over, unless a whole step by it no longer fits in the budget (the cap:
        the tier below writes the step, within what is left)."""
        tier = self.floor
        while tier > 0 and not self.fits_step(tier):
            self.cap_intervened = True
            tier -= 1
        return tier

    def resolve(self, handover: _Handover) -> None:
        """The next tier solves the problem again from the start: the steps so far and the
        draft that triggered it are set aside (their cost stays spent)."""
        self.set_aside.extend(self.steps)
        self.set_aside.append(handover.draft)
        self.steps = []
        self.context = ""
        self.floor = handover.tier

    # -- one step -------------------------------------------------------------------------

    def climb(self, log: _StepLog, index: int):
        """Tiers take the step in turn while their gates escalate; returns (tier, output) of
        the tier that keeps it. A token fix keeps the drafting tier on the step. A resolve-mode
        escalation returns (tier, None): tier + 1 solves the problem again."""
        tier = self.first_tier()
        while True:
            try:
                output = yield from self.attempt(tier)
            except BackendError as error:
                if tier == self.floor and tier > 0:
                    # The tier that took the problem over failed: under degrade the tier below
                    # carries the re-solve on from where it is; else the request fails.
                    self.fail(log, tier, error)
                    self.floor = tier = tier - 1
                    continue
                tier, output = self.fall_back(log, tier, error)
                if log.drafts and log.drafts[-1] == output.text:
                    log.drafts.pop()  # the draft stands after all
                return tier, output
            if tier == self.n - 1:
                return tier, output
            log.outputs[tier] = output
            escalate, verification = yield from self.judge(log, index, tier, output)
            if not escalate:
                return tier, output
            self.drop_ahead()  # it continued the draft just rejected
            if self.resolves(tier):
                return tier, None
            if output.text:
                log.drafts.append(output.text)
            fix = self.correction(tier, self.gates[tier], verification, log.corrections)
            if fix is None:
                tier += 1
            elif self.take_fix(log, fix, verification):
                return tier + 1, _EMPTY

    def write_step(self, index: int):
        """Write step `index`; returns (Step, StepOutput of the accepted text), None at the
        cap, or a `_Handover` when a resolve-mode gate hands the problem to the next tier.

        Every step starts at the cheapest tier (after a re-solve, at the tier that took the
        problem over); gate k judges tier k's output and may hand the step to tier k + 1.
        Under `on_large_failure="degrade"`, a failed tier k > 0 is dropped for the rest of
        the request and tier k - 1's output stands.
        """
        log = _StepLog()
        self.fixed, self.fixed_tokens = "", 0
        tier, output = yield from self.climb(log, index)
        if output is None:
            return _Handover(tier + 1, self.as_step(index, tier, log.outputs[tier], log))
        tier, output = yield from self.keep_lower(log, tier, output)
        if self.fixed:
            tier, output = self.with_fixed_text(tier, output)
        elif output.generated_tokens == 0:
            self.cap_intervened = True  # nothing fits in what is left of the budget
            return None
        return self.as_step(index, tier, output, log), output

    def as_step(self, index: int, tier: int, output: StepOutput, log: _StepLog) -> Step:
        text = output.text
        if text.endswith(self.cascade.delimiter):
            text = text[: -len(self.cascade.delimiter)]
        return Step(index=index, text=text, tier=tier, author=self.cascade.tier_names[tier],
                    confidence=Confidence.of(output), decisions=tuple(log.decisions),
                    usage=tuple(self.step_usage), drafts=tuple(log.drafts), degraded=log.degraded,
                    failures=tuple(log.failures))

    def settle(self) -> None:
        """Move the step being written into the request's totals (spent work is never lost)."""
        self.spent = [a + b for a, b in zip(self.spent, self.step_usage, strict=False)]
        self.step_usage = [Usage()] * self.n

    def check_fits(self) -> None:
        """Refuse a problem whose prompt and one whole step do not fit in a model's context
        (past it a model writes garbage, or fails, at full cost)."""
        for tier, model in enumerate(self.cascade.models):
            limit = model.info.context_length
            if limit is None:
                continue
            prompt = self.prefill_bound(tier, "")
            if prompt + self.options.max_step_tokens > limit:
                raise ConfigError(f"problem too long for model {model.info.name!r}: its prompt is {prompt} "
                                  f"tokens, and with max_step_tokens={self.options.max_step_tokens} a step "
                                  f"needs {prompt + self.options.max_step_tokens} positions; the model's "
                                  f"context holds {limit}")

    def machine(self):
        try:
            self.check_fits()
            stop_reason = "max_steps"
            index = 0
            while index < self.options.max_steps:  # each solve (a re-solve starts over) has max_steps
                self.step_usage = [Usage()] * self.n
                try:
                    written = yield from self.write_step(index)
                except BackendError as error:
                    self.settle()
                    raise StepFailedError(str(error), backend=error.backend or "?", step_index=index,
                                          partial=self.result("error")) from error
                except _Deadline:
                    self.settle()
                    raise RequestTimeoutError(
                        f"request ran past its timeout of {self.options.request_timeout:g} s "
                        f"during step {index}", partial=self.result("timeout")) from None
                self.settle()
                if written is None:
                    stop_reason = "budget"
                    break
                if isinstance(written, _Handover):
                    self.resolve(written)
                    index = 0
                    continue
                index += 1
                step, output = written
                self.steps.append(step)
                self.context += output.text
                if output.stop_reason != "delimiter" and output.stop_reason != "eos":
                    self.context += self.cascade.delimiter  # a step cut at max tokens still ends
                if self.on_step is not None:
                    self.on_step(step)
                if extract_answer(step.text) is not None:
                    stop_reason = "answer"
                    break
                if output.stop_reason == "eos":
                    stop_reason = "eos"
                    break
            return self.result(stop_reason)
        finally:
            for model in self.cascade.models:
                model.release(self.request_id)

    def result(self, stop_reason: str) -> Result:
        if self.ahead is not None:  # an early draft the request ended without using
            self.spent[0] = self.spent[0] + self.ahead[2]
            self.ahead = None
        return Result(problem=self.problem, answer=extract_answer(self.context),
                      steps=tuple(self.steps), cost=Cost(tuple(self.spent)),
                      tier_names=self.cascade.tier_names, stop_reason=stop_reason,
                      cap_intervened=self.cap_intervened, budget=self.budget,
                      set_aside=tuple(self.set_aside))


def _default_options(models: Sequence[Backend]) -> SolveOptions:
    max_steps, max_step_tokens = step_limits(models)
    return SolveOptions(max_steps=max_steps, max_step_tokens=max_step_tokens)


def _join(first: StepOutput, second: StepOutput) -> StepOutput:
    """A probe and its continuation as one step output."""
    hidden = second.hidden if second.hidden is not None else first.hidden
    return StepOutput(first.text + second.text, first.token_ids + second.token_ids,
                      first.logprobs + second.logprobs, first.entropies + second.entropies,
                      second.stop_reason, first.prefill_tokens + second.prefill_tokens,
                      first.seconds + second.seconds, hidden, first.reused_tokens + second.reused_tokens)


# ---- the async driver --------------------------------------------------------------------

# One worker thread per synchronous backend object, whichever cascade or event loop calls
# it: a model's calls never overlap (HF sessions and torch modules are not thread-safe),
# while different models may run at the same time. Keyed weakly, so a dropped backend
# takes its idle thread with it.
_WORKERS: weakref.WeakKeyDictionary[object, ThreadPoolExecutor] = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()


def _worker_for(backend: Backend) -> ThreadPoolExecutor:
    with _WORKERS_LOCK:
        try:
            worker = _WORKERS.get(backend)
        except TypeError:  # an unhashable backend: give it a worker of its own, kept on it
            worker = getattr(backend, "_cascade_worker", None)
            if worker is None:
                worker = ThreadPoolExecutor(1, thread_name_prefix=f"cascade-{backend.info.name}")
                backend._cascade_worker = worker  # type: ignore[attr-defined]
            return worker
        if worker is None:
            worker = ThreadPoolExecutor(1, thread_name_prefix=f"cascade-{backend.info.name}")
            _WORKERS[backend] = worker
        return worker


class _TierQueue:
    """Batches one backend's calls within one event loop.

    Calls queue up while the backend is busy; when it is free, every queued call of one
    kind goes to it as one batch. So all requests that reach the same tier in the same
    round share a batch, and a backend is kept busy while any request waits for it.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.queues: dict[type, list[tuple[StepRequest | ScoreRequest, asyncio.Future]]] = {
            StepRequest: [], ScoreRequest: []}
        self.busy = False
        self.native = backend.native_async
        self.in_flight: set[asyncio.Task] = set()

    def submit(self, request: StepRequest | ScoreRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queues[type(request)].append((request, future))
        if not self.busy:
            self.busy = True
            # Scheduled, not run now: the other requests woken in this round queue first.
            loop.call_soon(lambda: loop.create_task(self._drain()))
        return future

    async def _drain(self) -> None:
        try:
            while any(self.queues.values()):
                for kind in (StepRequest, ScoreRequest):
                    batch = [(r, f) for r, f in self.queues[kind] if not f.done()]
                    self.queues[kind] = []
                    if not batch:
                        continue
                    if self.native:
                        # A server batches by itself: keep several batches in flight.
                        task = asyncio.get_running_loop().create_task(self._run(kind, batch))
                        self.in_flight.add(task)  # the loop keeps only weak references to tasks
                        task.add_done_callback(self.in_flight.discard)
                    else:
                        await self._run(kind, batch)
                await asyncio.sleep(0)  # let woken requests queue their next calls
        finally:
            self.busy = False
            if any(self.queues.values()):  # a call queued during the last await
                self.busy = True
                asyncio.get_running_loop().create_task(self._drain())

    async def _run(self, kind: type, batch: list) -> None:
        requests = [request for request, _ in batch]
        name = self.backend.info.name
        steps = kind is StepRequest
        sync_name = "next_steps" if steps else "score_steps"
        try:
            if self.native:
                outputs = await (self.backend.anext_steps if steps else self.backend.ascore_steps)(requests)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(
                    _worker_for(self.backend), self.backend.next_steps if steps else self.backend.score_steps,
                    requests)
            outputs = list(outputs)
            if len(outputs) != len(requests):
                raise BackendError(f"returned {len(outputs)} outputs for {len(requests)} requests", name)
        except Exception as error:  # noqa: BLE001 - every request of the batch learns of it
            if not isinstance(error, BackendError):
                error = BackendError(f"{sync_name} raised {type(error).__name__}: {error}", name)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), output in zip(batch, outputs, strict=False):
            if not future.done():
                future.set_result(output)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class _Driver:
    """Runs step machines on one event loop, each a task, sharing one `_TierQueue` per tier."""

    def __init__(self, models: Sequence[Backend]) -> None:
        self.models = list(models)
        self.queues = [_TierQueue(model) for model in self.models]

    async def run(self, machine: Generator, options: SolveOptions) -> Result:
        loop = asyncio.get_running_loop()
        deadline = None if options.request_timeout is None else loop.time() + options.request_timeout
        value: object = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    calls = machine.throw(error) if error is not None else machine.send(value)
                except StopIteration as stop:
                    return stop.value
                value, error = None, None
                timeout = options.step_timeout
                if deadline is not None:
                    left = max(0.0, deadline - loop.time())
                    timeout = left if timeout is None else min(timeout, left)
                if isinstance(calls, list):
                    # Calls sent together (SolveOptions.draft_ahead): each answer or failure
                    # goes back in its place; only the request's deadline is thrown.
                    outcomes = await asyncio.gather(
                        *(self.call(tier, request, timeout, deadline, options, loop)
                          for tier, request in calls))
                    if any(isinstance(o, _Deadline) for o in outcomes):
                        error = _Deadline()
                    else:
                        value = outcomes
                    continue
                outcome = await self.call(*calls, timeout, deadline, options, loop)
                if isinstance(outcome, BaseException):
                    error = outcome
                else:
                    value = outcome
        finally:
            machine.close()  # a cancelled request frees its backend sessions (the finally in it)

    async def call(self, tier: int, request: StepRequest | ScoreRequest, timeout: float | None,
                   deadline: float | None, options: SolveOptions, loop: asyncio.AbstractEventLoop) -> object:
        """One model call: its output, or the BackendError / _Deadline it ended with."""
        future = self.queues[tier].submit(request)
        # A timer fails the future itself (no wait_for wrapper): the request wakes
        # in the same round as the rest of its batch, which keeps batches whole.
        timer = None if timeout is None else loop.call_later(timeout, _expire, future)
        try:
            return await future
        except asyncio.TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                return _Deadline()
            return BackendError(f"no answer within the step timeout of {options.step_timeout:g} s",
                                self.models[tier].info.name)
        except BackendError as failure:
            return failure
        finally:
            if timer is not None:
                timer.cancel()


def _run_sync(coroutine):
    """Run a coroutine to completion from synchronous code, even under a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="cascade-solve")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]
