"""The step runtime: `Cascade` and the per-request step machine.

One request is a generator (the *step machine*) that yields model calls and receives
their outputs; it owns the step logic, the gate decisions, the hard cap and the cost
ledger, and knows nothing about how calls are executed. A *driver* runs many step
machines together: each round it groups the pending calls by (tier, kind) and sends
each group to its backend as one batch. `solve` is the driver with one request,
`solve_many` the same driver with many.

The cascade has N >= 2 tiers, cheapest first, and N - 1 gates; gate i judges tier i's
output and decides whether tier i + 1 takes over the step. Two models are the N = 2 case.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterable, Sequence

from decoding import Backend, BackendError, HFBackend, ScoreOutput, ScoreRequest, StepOutput, StepRequest

from cascade.answer import extract_answer
from cascade.cost import Cost, CostModel, Usage
from cascade.errors import ConfigError, StepFailedError
from cascade.gates import Confidence, ConfidenceGate, Gate, GateState, decide
from cascade.records import Decision, Result, Step

__all__ = ["SolveOptions", "Cascade", "tier_names_for"]

Call = tuple[int, StepRequest | ScoreRequest]


@dataclass(frozen=True)
class SolveOptions:
    """Request-level settings.

    max_steps: steps before the loop gives up (the answer may then be None).
    max_step_tokens: tokens one step may take (per tier call).
    temperature: 0 = greedy; > 0 samples, seeded by (seed, problem, context).
    seed: see temperature. return_hidden: backends return hidden states (for routers).
    """

    max_steps: int = 32
    max_step_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    return_hidden: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")


def tier_names_for(n: int) -> tuple[str, ...]:
    if n == 2:
        return ("small", "large")
    if n == 3:
        return ("small", "medium", "large")
    return tuple(f"tier{k}" for k in range(n))


def _check_problem(problem: object) -> str:
    if not isinstance(problem, str):
        raise ConfigError(f"problem must be a string, got {type(problem).__name__}")
    if not problem.strip():
        raise ConfigError("problem is empty")
    return problem


def _check_budget(budget: object) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"budget must be a number or None, got {budget!r}")
    if not math.isfinite(budget) or budget < 0:
        raise ConfigError(f"budget must be finite and >= 0 (cost units), got {budget!r}")
    return float(budget)


class Cascade:
    """N models, cheapest first, and N - 1 gates between them.

        Cascade(small, large, gate)                      # two tiers
        Cascade(models=[small, medium, large], gates=[g1, g2])

    Models are `decoding.Backend`s; prices default to FLOPs ratios (`CostModel.flops`).
    """

    def __init__(self, small: Backend | None = None, large: Backend | None = None,
                 gate: Gate | None = None, *, models: Sequence[Backend] | None = None,
                 gates: Sequence[Gate] | None = None, cost_model: CostModel | None = None,
                 tier_names: Sequence[str] | None = None,
                 options: SolveOptions = SolveOptions(), calibration=None) -> None:
        if models is None:
            if small is None or large is None:
                raise ConfigError("give small= and large=, or models=[...]")
            models = [small, large]
        elif small is not None or large is not None:
            raise ConfigError("give either small=/large= or models=, not both")
        models = list(models)
        if len(models) < 2:
            raise ConfigError(f"a cascade needs at least 2 models, got {len(models)}")
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
        self.tier_names = tuple(tier_names) if tier_names else tier_names_for(len(models))
        if len(self.tier_names) != len(models):
            raise ConfigError(f"tier_names has {len(self.tier_names)} names for {len(models)} models")
        self.options = options
        self.calibration = None
        if calibration is not None:
            calibration.check_models(self)
            self.calibration = calibration

    def _check_gates(self, gates: Sequence[Gate]) -> list[Gate]:
        gates = list(gates)
        if len(gates) != len(self.models) - 1:
            raise ConfigError(f"{len(self.models)} models need {len(self.models) - 1} gates, "
                              f"got {len(gates)}")
        for gate in gates:
            if not isinstance(gate, Gate):
                raise ConfigError(f"{gate!r} is not a gate (needs threshold, mode, probe_tokens, "
                                  "requires_verification and score(state))")
        return gates

    @classmethod
    def from_pretrained(cls, small: str | Path | None = None, large: str | Path | None = None,
                        gate: Gate | None = None, *, models: Sequence[str | Path] | None = None,
                        gates: Sequence[Gate] | None = None, step_delimiter: str = "\n\n",
                        prompt_template: str | None = None, dtype: str = "float32",
                        device: str = "cpu", options: SolveOptions = SolveOptions(),
                        cost_model: CostModel | None = None) -> "Cascade":
        """Load each model with `HFBackend.from_pretrained` (local path or hub id)."""
        paths = list(models) if models is not None else [p for p in (small, large) if p is not None]
        if models is not None and (small is not None or large is not None):
            raise ConfigError("give either small=/large= or models=, not both")
        if len(paths) < 2:
            raise ConfigError("from_pretrained needs small= and large= (or models=[...])")
        backends = [HFBackend.from_pretrained(p, step_delimiter=step_delimiter,
                                              prompt_template=prompt_template, dtype=dtype,
                                              device=device) for p in paths]
        return cls(models=backends, gate=gate, gates=gates, options=options, cost_model=cost_model)

    @classmethod
    def from_calibration(cls, path: str | Path, models: Sequence[Backend] | None = None,
                         options: SolveOptions | None = None) -> "Cascade":
        """A cascade that looks its thresholds up in a saved calibration.

        Without `models`, the models are loaded by the names the calibration recorded
        ("embedded:<tier>" for the shipped ones); either way their fingerprints must match.
        """
        from cascade.calibrate import Calibration

        calibration = Calibration.load(path)
        if models is None:
            models = [_load_named(m["name"]) for m in calibration.models]
        gates = calibration.gates_for(math.inf)
        return cls(models=models, gates=gates, options=options or _default_options(models),
                   calibration=calibration)

    # ---- public entry points ------------------------------------------------------------

    def solve(self, problem: str, budget: float | None = None, *,
              gates: Sequence[Gate] | None = None, options: SolveOptions | None = None) -> Result:
        """Solve one problem. `budget` is a hard cap in cost units (None = no cap)."""
        return self.solve_many([problem], budget, gates=gates, options=options)[0]

    def solve_many(self, problems: Iterable[str], budget: float | None = None, *,
                   gates: Sequence[Gate] | None = None, options: SolveOptions | None = None,
                   concurrency: int = 16, return_exceptions: bool = False) -> list[Result]:
        """Solve many problems, advancing up to `concurrency` requests step by step together.

        A request that fails does not disturb the others. With return_exceptions=True its
        error (a CascadeError carrying the partial result) takes its place in the list;
        otherwise the first error is raised once every request has ended."""
        problems = [_check_problem(p) for p in problems]
        budget = _check_budget(budget)
        if gates is None and self.calibration is not None and budget is not None:
            # The threshold certified for the largest calibrated budget <= this one; the
            # budget itself is still enforced as a hard cap.
            gates = self.calibration.gates_for(budget)
        gates = self._check_gates(gates) if gates is not None else self.gates
        options = options or self.options
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        machines = [self.step_machine(p, budget, gates, options) for p in problems]
        outcomes = drive(self.models, machines, concurrency)
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        return outcomes

    # ---- the step machine ---------------------------------------------------------------

    def step_machine(self, problem: str, budget: float | None, gates: Sequence[Gate],
                     options: SolveOptions, request_id: str | None = None
                     ) -> Generator[Call, StepOutput | ScoreOutput, Result]:
        """The generator that solves one problem; see the module docstring."""
        run = _Run(self, problem, budget, list(gates), options, request_id or uuid.uuid4().hex)
        return run.machine()


class _Run:
    """State of one request while its step machine runs."""

    def __init__(self, cascade: Cascade, problem: str, budget: float | None,
                 gates: list[Gate], options: SolveOptions, request_id: str) -> None:
        self.cascade = cascade
        self.problem = problem
        self.budget = budget
        self.gates = gates
        self.options = options
        self.request_id = request_id
        self.n = len(cascade.models)
        self.context = ""
        self.steps: list[Step] = []
        self.spent = [Usage()] * self.n
        self.step_usage = [Usage()] * self.n
        self.cap_intervened = False

    # -- money ----------------------------------------------------------------------------

    def remaining(self) -> float:
        if self.budget is None:
            return math.inf
        used = math.fsum(u.cost for u in self.spent) + math.fsum(u.cost for u in self.step_usage)
        return self.budget - used

    def charge(self, tier: int, prefill: int, generated: int, seconds: float) -> None:
        cost = self.cascade.cost_model.charge(tier, prefill, generated)
        self.step_usage[tier] = self.step_usage[tier] + Usage(prefill, generated, seconds, cost)

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
        return self.token_allowance(tier, self.context, self.options.max_step_tokens) \
            >= self.options.max_step_tokens

    # -- calls ----------------------------------------------------------------------------

    def generate(self, tier: int, context: str, max_tokens: int):
        request = StepRequest(self.request_id, self.problem, context, max_tokens,
                              self.options.temperature, self.options.seed,
                              # A gate that reads hidden states (AdvantageGate) gets them.
                              self.options.return_hidden or (tier < self.n - 1 and getattr(
                                  self.gates[tier], "requires_hidden", False)))
        output = yield (tier, request)
        if output.generated_tokens > max_tokens:
            raise BackendError(f"returned {output.generated_tokens} tokens, more than the "
                               f"{max_tokens} asked for", self.cascade.models[tier].info.name)
        self.charge(tier, output.prefill_tokens, output.generated_tokens, output.seconds)
        return output

    def verify(self, tier: int, text: str):
        output = yield (tier, ScoreRequest(self.request_id, self.problem, self.context, text))
        self.charge(tier, output.prefill_tokens + output.scored_tokens, 0, output.seconds)
        return output

    # -- one step -------------------------------------------------------------------------

    def write_step(self, index: int):
        """Write step `index`; returns (Step, StepOutput of the accepted text) or None at the cap."""
        max_tokens = self.options.max_step_tokens
        decisions: list[Decision] = []
        drafts: list[str] = []
        tier = 0
        while True:
            if tier == self.n - 1:
                output = yield from self.generate(tier, self.context, max_tokens)
                break
            gate = self.gates[tier]
            allowance = self.token_allowance(tier, self.context, max_tokens)
            if gate.mode == "route":
                probe_size = min(gate.probe_tokens, allowance)
                if probe_size > 0:
                    output = yield from self.generate(tier, self.context, probe_size)
                else:
                    output = StepOutput("", (), (), (), "max_tokens", 0, 0.0)
            else:
                if allowance < 1:
                    output = StepOutput("", (), (), (), "max_tokens", 0, 0.0)
                else:
                    output = yield from self.generate(tier, self.context, allowance)
            verification = None
            if gate.requires_verification and output.text:
                bound = self.prefill_bound(tier + 1, self.context + output.text)
                if self.cascade.cost_model.charge(tier + 1, bound, 0) <= self.remaining():
                    verification = yield from self.verify(tier + 1, output.text)
                else:
                    self.cap_intervened = True  # no room to verify: the draft stands
            state = GateState(self.problem, index, tier, self.context, output,
                              Confidence.of(output, getattr(gate, "probe_tokens", 4) or 4), verification)
            score, escalate = decide(gate, state)
            capped = escalate and not self.fits_step(tier + 1)
            decisions.append(Decision(tier, score, gate.threshold, escalate and not capped, capped))
            if capped:
                self.cap_intervened = True
            if escalate and not capped:
                if output.text:
                    drafts.append(output.text)
                tier += 1
                continue
            # The tier keeps the step: a route probe that did not finish the step goes on.
            if gate.mode == "route" and output.stop_reason == "max_tokens":
                rest = self.token_allowance(tier, self.context + output.text,
                                            max_tokens - output.generated_tokens)
                if rest > 0:
                    continuation = yield from self.generate(tier, self.context + output.text, rest)
                    output = _join(output, continuation)
            if output.generated_tokens == 0 and allowance < 1:
                self.cap_intervened = True
                return None
            break
        text = output.text
        if text.endswith(self.cascade.delimiter):
            text = text[: -len(self.cascade.delimiter)]
        step = Step(index=index, text=text, tier=tier, author=self.cascade.tier_names[tier],
                    confidence=Confidence.of(output), decisions=tuple(decisions),
                    usage=tuple(self.step_usage), drafts=tuple(drafts))
        return step, output

    def machine(self):
        try:
            stop_reason = "max_steps"
            for index in range(self.options.max_steps):
                self.step_usage = [Usage()] * self.n
                try:
                    written = yield from self.write_step(index)
                except BackendError as error:
                    raise StepFailedError(str(error), backend=error.backend or "?", step_index=index,
                                          partial=self.result("error")) from error
                if written is None:
                    self.spent = [a + b for a, b in zip(self.spent, self.step_usage)]
                    stop_reason = "budget"
                    break
                step, output = written
                self.steps.append(step)
                self.spent = [a + b for a, b in zip(self.spent, self.step_usage)]
                self.context += output.text
                if output.stop_reason != "delimiter" and output.stop_reason != "eos":
                    self.context += self.cascade.delimiter  # a step cut at max tokens still ends
                if extract_answer(step.text) is not None:
                    stop_reason = "answer"
                    break
                if output.stop_reason == "eos":
                    stop_reason = "eos"
                    break
            self.step_usage = [Usage()] * self.n
            return self.result(stop_reason)
        finally:
            for model in self.cascade.models:
                model.release(self.request_id)

    def result(self, stop_reason: str) -> Result:
        return Result(problem=self.problem, answer=extract_answer(self.context),
                      steps=tuple(self.steps), cost=Cost(tuple(self.spent)),
                      tier_names=self.cascade.tier_names, stop_reason=stop_reason,
                      cap_intervened=self.cap_intervened, budget=self.budget)


def _load_named(name: str) -> Backend:
    from cascade.embedded import EMBEDDED_DELIMITER, embedded_path

    if name.startswith("embedded:"):
        tier = name.split(":", 1)[1]
        return HFBackend.from_pretrained(embedded_path(tier), step_delimiter=EMBEDDED_DELIMITER, name=name)
    return HFBackend.from_pretrained(name)


def _default_options(models: Sequence[Backend]) -> SolveOptions:
    from cascade.embedded import EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS

    if all(m.info.name.startswith("embedded:") for m in models):
        return SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS)
    return SolveOptions()


def _join(first: StepOutput, second: StepOutput) -> StepOutput:
    """A probe and its continuation as one step output."""
    hidden = second.hidden if second.hidden is not None else first.hidden
    return StepOutput(first.text + second.text, first.token_ids + second.token_ids,
                      first.logprobs + second.logprobs, first.entropies + second.entropies,
                      second.stop_reason, first.prefill_tokens + second.prefill_tokens,
                      first.seconds + second.seconds, hidden)


def drive(models: Sequence[Backend], machines: list[Generator],
          concurrency: int) -> list[Result | BaseException]:
    """Run step machines to completion, up to `concurrency` at a time, batching each round's
    calls per (tier, kind). Returns each machine's Result, or the error it ended with, in
    the machines' order."""
    results: list[Result | BaseException | None] = [None] * len(machines)
    pending: dict[int, Call] = {}
    waiting = iter(range(len(machines)))

    def advance(index: int, value=None, error: BaseException | None = None) -> None:
        try:
            call = machines[index].throw(error) if error is not None else machines[index].send(value)
        except StopIteration as stop:
            results[index] = stop.value
            pending.pop(index, None)
            start_next()
        except Exception as failure:  # noqa: BLE001 - recorded per request, returned
            results[index] = failure
            pending.pop(index, None)
            start_next()
        else:
            pending[index] = call

    def start_next() -> None:
        for index in waiting:
            advance(index)
            return

    for _ in range(concurrency):
        start_next()
    while pending:
        groups: dict[tuple[int, type], list[int]] = {}
        for index, (tier, request) in pending.items():
            groups.setdefault((tier, type(request)), []).append(index)
        for (tier, kind), indices in groups.items():
            requests = [pending[i][1] for i in indices]
            try:
                if kind is StepRequest:
                    outputs = models[tier].next_steps(requests)
                else:
                    outputs = models[tier].score_steps(requests)
                if len(outputs) != len(requests):
                    raise BackendError(f"returned {len(outputs)} outputs for {len(requests)} requests",
                                       models[tier].info.name)
            except BackendError as error:
                for index in indices:
                    advance(index, error=error)
                continue
            for index, output in zip(indices, outputs):
                advance(index, output)
    return results  # type: ignore[return-value]
