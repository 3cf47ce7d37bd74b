"""Budget-aware escalation under a hard cap, and the accuracy-budget curve.

A request runs under a hard cap C (cost units; the runtime never spends past it). A
`BudgetGate` wraps any gate and lets the request spend C where the gate's scores say it
helps most: at each step it knows what is left (C - spent), how many steps probably
remain (fitted from the problem's length) and what escalating this step would cost now
(the next tier's worst case, `GateState.escalation_cost`, which is small once the next
tier's KV cache is warm). From these it computes the fraction f of the remaining steps
it can still afford to escalate, and escalates a step when its score is among the top f
of the scores the cheapest tier's drafts get (a quantile fitted label-free), and at
least the gate's own floor `threshold`:

    m = max(1, expected_steps(problem) - steps so far)          remaining steps
    k = (C - spent - (m - 1) * step_cost) / escalation_cost     escalations affordable now
    f = clip(k / m, 0, 1);   threshold_at = max(threshold, Q(1 - f))   (inf when k < 1)

Rich requests escalate every step scoring above the floor; poor ones only their least
confident steps; one that cannot afford an escalation does not ask for one (so the cap
does not have to refuse it). Without a cap (budget None) it is the plain gate.

The product (`calibrate_budget_curve`): a user buys a *mean* budget B per request. The
request runs under the hard cap C = cap_factor * B, and the floor threshold is certified
label-free by conformal risk control with the cap as the loss bound (cost_max = C): for
exchangeable problems, E[cost] <= B (Angelopoulos et al., "Conformal Risk Control",
2022), while every single request stays <= C by construction. The curve also
calibrates, at the same budgets, the single-threshold methods (C3PO's per-query tail
bound P(cost > B) <= alpha by split conformal or Learn-then-Test, and risk control of
E[cost] without a cap), and reports each choice's expected accuracy proxy: agreement of
its answers with the top tier's on the calibration problems. And, at the same budgets
and under the same cap and guarantee, the problem-level re-solve (method "resolve"): the
inner gate in resolve mode, whose first doubted step hands the problem to the large model
to solve again from the start, threshold certified by the same risk control. It pays one
full large solve where the step cascade pays the large model's prefill at every escalated
step, so it is the better policy where budgets are wide enough for whole re-solves.

This module knows the runtime only through `Cascade.solve_many` and `cascade.calibrate.sweep`;
the statistics are `calibration`'s pure functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

import calibration as cal
from cascade.calibrate import SweepResult, default_thresholds, sweep, sweep_file
from cascade.errors import ConfigError
from cascade.gates import AlwaysLarge, AlwaysSmall, Gate, GateState
from cascade.records import Result
from cascade.runtime import Cascade
from cascade.specs import GateSpec, RouterSource, build_gate, gate_spec_of

__all__ = ["BudgetGate", "fit_budget_gate", "BudgetPoint", "BudgetCurve", "PacedPolicy",
           "calibrate_budget_curve", "budget_grid", "load_budget_curve", "CURVE_METHODS"]

logger = logging.getLogger(__name__)

CURVE_FORMAT = "stepcascade-budget-curve-v1"
PACING_FORMAT = "stepcascade-pacing-v1"

CurveMethod = Literal["budget", "resolve", "risk", "conformal", "ltt"]
CURVE_METHODS: tuple[str, ...] = ("budget", "resolve", "risk", "conformal", "ltt")


class _InnerGate:
    """What a wrapping gate (`BudgetGate`, `_PassiveGate`) takes from the gate it wraps: every
    member of the `Gate` protocol but the threshold, declared one by one."""

    inner: Gate

    @property
    def mode(self):
        return self.inner.mode

    @property
    def probe_tokens(self) -> int:
        return self.inner.probe_tokens

    @property
    def requires_verification(self) -> bool:
        return self.inner.requires_verification

    @property
    def requires_hidden(self) -> bool:
        return self.inner.requires_hidden

    @property
    def rewrite(self):
        return self.inner.rewrite

    @property
    def max_corrections(self) -> int:
        return self.inner.max_corrections

    def needs_verification(self, state: GateState) -> bool:
        return self.inner.needs_verification(state)

    def check_models(self, models) -> None:
        self.inner.check_models(models)

    def score(self, state: GateState) -> float:
        return self.inner.score(state)


@dataclass(frozen=True)
class BudgetGate(_InnerGate):
    """A gate whose threshold rises as the request's cap runs short (see the module docstring).

    inner: the gate whose score is used (any gate; its own threshold is ignored).
    threshold: the floor: no step scoring below it escalates, however rich the request.
    score_quantiles: the inner gate's scores on the cheapest tier's drafts at evenly
        spaced levels 0..1 (`fit_budget_gate`); empty = scores taken as uniform on [0, 1].
    steps_intercept, steps_slope: expected steps of a problem = intercept + slope * len(problem).
    step_cost: what one step by the cheapest tier costs (kept in reserve for each
        remaining step, cost units).
    """

    inner: Gate
    threshold: float = 0.0
    score_quantiles: tuple[float, ...] = ()
    steps_intercept: float = 5.0
    steps_slope: float = 0.0
    step_cost: float = 0.0

    budget_aware = True  # the runtime fills GateState.escalation_cost for it

    def __post_init__(self) -> None:
        if isinstance(self.inner, BudgetGate) or not isinstance(self.inner, Gate):
            raise ConfigError(f"BudgetGate wraps a gate (not a BudgetGate), got {type(self.inner).__name__}")
        if self.inner.mode == "resolve":
            # Its price of escalating is one step's, not a whole re-solve's.
            raise ConfigError("BudgetGate spreads step escalations over a request; a resolve-mode gate "
                              "hands over the whole problem: run it under the hard cap as it is "
                              "(calibrate_budget_curve method 'resolve' certifies its threshold)")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ConfigError(f"threshold must be a number, got {self.threshold!r}")
        q = self.score_quantiles
        if q and (len(q) < 2 or any(not math.isfinite(v) for v in q)
                  or any(b < a for a, b in zip(q, q[1:], strict=False))):
            raise ConfigError("score_quantiles must be >= 2 finite nondecreasing scores, got "
                              f"{list(q)[:5]}...")
        for name in ("steps_intercept", "steps_slope", "step_cost"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.step_cost < 0:
            raise ConfigError(f"step_cost must be >= 0, got {self.step_cost!r}")

    def expected_steps(self, problem: str) -> float:
        return max(1.0, self.steps_intercept + self.steps_slope * len(problem))

    def affordable_fraction(self, state: GateState) -> float:
        """f: the fraction of the remaining steps the request can still afford to escalate
        at today's price (0 when not even this escalation fits)."""
        if state.budget is None:
            return 1.0
        cost = state.escalation_cost
        if cost is None or cost <= 0:
            return 1.0
        m = max(1.0, self.expected_steps(state.problem) - state.step_index)
        affordable = (state.remaining - (m - 1.0) * self.step_cost) / cost
        if affordable < 1.0:
            return 0.0
        return min(1.0, affordable / m)

    def threshold_at(self, state: GateState) -> float:
        """The threshold this step's score meets (read by `cascade.gates.decide`)."""
        f = self.affordable_fraction(state)
        if f <= 0.0:
            return math.inf
        if f >= 1.0:
            return self.threshold
        return max(self.threshold, self.score_quantile(1.0 - f))

    def score_quantile(self, level: float) -> float:
        if not self.score_quantiles:
            return level
        q = np.asarray(self.score_quantiles)
        return float(np.interp(level, np.linspace(0.0, 1.0, q.size), q))


def fit_budget_gate(cascade: Cascade, problems: Sequence[str], gate: Gate | None = None, *,
                    threshold: float = 0.0, levels: int = 101) -> BudgetGate:
    """A BudgetGate around `gate` (default: the cascade's gate), fitted label-free on `problems`:
    the cheapest tier alone writes every step (the gate scores each draft, nothing escalates),
    which gives the score quantiles, the steps-per-problem-length line and the step cost."""
    if len(cascade.models) != 2:
        raise ConfigError(f"fit_budget_gate fits two-tier cascades, got {len(cascade.models)} tiers")
    inner = gate if gate is not None else cascade.gates[0]
    if isinstance(inner, BudgetGate):
        inner = inner.inner
    if inner.mode == "resolve":  # its step-level form; the curve's resolve family puts the mode back
        inner = dataclasses.replace(inner, mode="speculate")
    problems = list(problems)
    if len(problems) < 2:
        raise ConfigError(f"fit_budget_gate needs at least 2 problems, got {len(problems)}")
    scorer = _PassiveGate(inner)
    results = cascade.solve_many(problems, gates=[scorer])
    scores = [d.score for r in results for s in r.steps for d in s.decisions if d.tier == 0]
    if not scores:
        raise ConfigError("the cheapest tier wrote no step the gate could score on these problems")
    steps = np.array([len(r.steps) for r in results], dtype=float)
    lengths = np.array([len(p) for p in problems], dtype=float)
    if np.ptp(lengths) > 0:
        slope, intercept = np.polyfit(lengths, steps, 1)
    else:
        slope, intercept = 0.0, float(steps.mean())
    step_costs = [s.cost for r in results for s in r.steps]
    return BudgetGate(inner=inner, threshold=threshold,
                      score_quantiles=tuple(float(v) for v in np.quantile(scores, np.linspace(0, 1, levels))),
                      steps_intercept=float(intercept), steps_slope=float(slope),
                      step_cost=float(max(step_costs)) if step_costs else 0.0)


@dataclass(frozen=True)
class _PassiveGate(_InnerGate):
    """The inner gate's score, never escalating: records what it would say on every draft."""

    inner: Gate
    threshold: float = math.inf



# ---- the accuracy-budget curve -----------------------------------------------------------

def budget_grid(small_cost: float, large_cost: float, k: int = 11) -> tuple[float, ...]:
    """k budgets from the small-only to the large-only mean cost: the small-only cost, then
    (1/(k-1), 2/(k-1), ..., 1) times the large-only cost (so 0.5x is on the grid for odd k)."""
    if not (math.isfinite(small_cost) and math.isfinite(large_cost) and 0 <= small_cost < large_cost):
        raise ConfigError(f"need 0 <= small_cost < large_cost, got {small_cost}, {large_cost}")
    if k < 2:
        raise ConfigError(f"k must be >= 2, got {k}")
    fractions = np.linspace(0.0, 1.0, k)[1:]
    return tuple(float(round(b, 3)) for b in [small_cost, *(large_cost * fractions)] if b >= small_cost)


@dataclass(frozen=True)
class BudgetPoint:
    """One method's certified policy at one mean budget B.

    index: the chosen candidate (a column of the curve's sweep), None when nothing is
    certified (then `reason` says why). cap: the hard cap its requests run under (None =
    none). threshold: its (floor) threshold. agreement / mean_cost: on the calibration
    problems, its answers' agreement with the top tier (the label-free accuracy proxy)
    and its mean cost. statement: the guarantee, in words.
    """

    budget: float
    method: str
    index: int | None
    cap: float | None
    threshold: float | None
    agreement: float | None
    mean_cost: float | None
    statement: str
    reason: str = ""


@dataclass(frozen=True)
class BudgetCurve:
    """The accuracy-budget curve: for each method and budget, the certified policy.

    candidates: per sweep column, (family, threshold, cap): family "threshold" (the inner
    gate at a threshold, no cap), "budget" (the BudgetGate at a floor threshold under
    the cap) or "resolve" (the inner gate in resolve mode at a threshold under the cap).
    swept: the calibration sweep (arrays per problem and column).
    """

    gate: BudgetGate
    budgets: tuple[float, ...]
    cap_factor: float
    alpha: float
    delta: float
    candidates: tuple[tuple[str, float, float | None], ...]
    points: tuple[BudgetPoint, ...]
    swept: SweepResult | None  # None for a curve read back from its JSON (`load_budget_curve`)
    cost_max_uncapped: float
    n_problems: int = 0  # calibration problems (from `swept` when it is there)

    def __post_init__(self) -> None:
        if self.swept is not None:
            object.__setattr__(self, "n_problems", int(self.swept.costs.shape[0]))

    def point(self, method: str, budget: float) -> BudgetPoint:
        for p in self.points:
            if p.method == method and p.budget == budget:
                return p
        raise ConfigError(f"no point for method {method!r} at budget {budget!r}; methods "
                          f"{sorted({p.method for p in self.points})}, budgets {list(self.budgets)}")

    def policy(self, method: str, budget: float) -> tuple[list[Gate], float | None]:
        """(gates, hard cap) to solve with, e.g. `cascade.solve_many(problems, cap, gates=gates)`,
        for the largest grid budget <= `budget` where `method` certified a policy; below all
        of them, the cheapest tier alone (under the cap `budget`)."""
        usable = [p for p in self.points if p.method == method and p.budget <= budget and p.index is not None]
        if not usable:
            return [AlwaysSmall()], budget
        p = max(usable, key=lambda q: q.budget)
        family, threshold, cap = self.candidates[p.index]
        return [family_gate(self.gate, family, threshold)], cap

    def paced(self, method: str, budget: float, step: float = 2.0,
              state_file: str | Path | None = None) -> PacedPolicy:
        """`method`'s family ("budget" or "resolve") at the largest grid budget <= `budget`,
        paced online over a stream of requests (`PacedPolicy`), starting at its certified
        setting (the cheapest one when none was certified). state_file: where the pacer's
        state is kept after every request; if it exists, the pacer resumes from it."""
        if method not in ("budget", "resolve"):
            raise ConfigError(f"pacing moves along a capped family: method 'budget' or 'resolve', "
                              f"got {method!r}")
        grid = [b for b in self.budgets if b <= budget]
        if not grid:
            raise ConfigError(f"budget {budget!r} is below every budget of the curve {list(self.budgets)}")
        b = max(grid)
        columns = _family_columns(self.candidates, method, self.cap_factor * b)
        if columns.size == 0:
            raise ConfigError(f"the curve has no {method!r} columns at budget {b:g}; "
                              f"calibrate with that method")
        point = self.point(method, b)
        start = 0 if point.index is None else int(np.flatnonzero(columns == point.index)[0])
        return PacedPolicy(self, method, b, [int(j) for j in columns], step, start, state_file)

    def to_json(self) -> dict:
        """The curve as plain JSON: the fitted gate, the grid, each method's point per budget."""
        gate = {f.name: getattr(self.gate, f.name) for f in dataclasses.fields(self.gate)
                if f.name != "inner"}
        try:  # what `from_json` rebuilds the inner gate from (a router by its file and weights)
            inner_spec = gate_spec_of(self.gate.inner).to_json()
        except ConfigError:
            inner_spec = None  # a gate outside the registry, or a router not loaded from a file
        return {"format": CURVE_FORMAT,
                "gate": gate | {"inner": repr(self.gate.inner)}, "inner_spec": inner_spec,
                "budgets": list(self.budgets),
                "cap_factor": self.cap_factor, "alpha": self.alpha, "delta": self.delta,
                "n_problems": self.n_problems, "cost_max_uncapped": self.cost_max_uncapped,
                "candidates": [list(c) for c in self.candidates],
                "points": [dataclasses.asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, payload: object, routers: RouterSource | None = None) -> BudgetCurve:
        """A curve from its JSON form (`to_json`): the inner gate rebuilt from its recorded
        spec (routers: what an advantage gate's router file resolves to, as for
        `cascade.specs.build_gate`; a router whose weights differ from the recorded ones is
        refused), every certified point checked against the candidates. Raises ConfigError
        naming what is wrong."""
        if not isinstance(payload, dict) or payload.get("format") != CURVE_FORMAT:
            raise ConfigError(f"not an accuracy-budget curve (format {CURVE_FORMAT!r}, written by "
                              "`cascade calibrate --curve` or BudgetCurve.to_json)")
        try:
            spec = payload["inner_spec"]
            if spec is None:
                raise ConfigError("the curve does not record its gate in a form that can be rebuilt "
                                  "(a gate outside the registry, or a router not loaded from a file)")
            inner_spec = GateSpec.from_json(spec)

            def checked_router(file: str):
                router = routers(file) if callable(routers) else _router_from(routers, file)
                if inner_spec.router_weights is not None and repr(router) != inner_spec.router_weights:
                    raise ConfigError(f"the router at {file} is not the one this curve was calibrated "
                                      f"with ({inner_spec.router_weights}); calibrate again")
                return router

            inner = build_gate(inner_spec, checked_router if inner_spec.router is not None else None)
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["gate"].items()
                      if k != "inner"}
            gate = BudgetGate(inner, **fields)
            candidates = tuple((str(f), float(t), None if c is None else float(c))
                               for f, t, c in payload["candidates"])
            points = tuple(BudgetPoint(**p) for p in payload["points"])
            curve = cls(gate=gate, budgets=tuple(float(b) for b in payload["budgets"]),
                        cap_factor=float(payload["cap_factor"]), alpha=float(payload["alpha"]),
                        delta=float(payload["delta"]), candidates=candidates, points=points, swept=None,
                        cost_max_uncapped=float(payload["cost_max_uncapped"]),
                        n_problems=int(payload["n_problems"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"a malformed accuracy-budget curve: {type(error).__name__}: {error}") from None
        for p in curve.points:
            if p.index is not None and not (0 <= p.index < len(candidates)
                                            and candidates[p.index][1] == p.threshold
                                            and candidates[p.index][2] == p.cap):
                raise ConfigError(f"a malformed accuracy-budget curve: the {p.method} point at budget "
                                  f"{p.budget:g} names candidate {p.index}, which does not match it")
        return curve

    def summary(self) -> str:
        lines = [f"Accuracy-budget curve (alpha={self.alpha}, delta={self.delta}, "
                 f"n={self.n_problems}, "
                 f"cap = {self.cap_factor:g} x budget for the budget-aware policy)"]
        for method in dict.fromkeys(p.method for p in self.points):
            lines.append(f"  {method}:")
            for p in (q for q in self.points if q.method == method):
                if p.index is None:
                    lines.append(f"    budget {p.budget:g}: none certified ({p.reason[:100]})")
                else:
                    cap = "no cap" if p.cap is None else f"cap {p.cap:g}"
                    lines.append(f"    budget {p.budget:g}: threshold {p.threshold:g}, {cap}, "
                                 "expected agreement "
                                 f"{p.agreement:.3f}, mean cost {p.mean_cost:.1f}")
        return "\n".join(lines)


class PacedPolicy:
    """A curve family served to a stream of requests with its threshold paced online.

    Each request gets `policy()` (gates, hard cap); its finished cost goes to `observe`. The
    pacer (`calibration.BudgetPacer`) moves along the family's columns, cheapest first, so
    that the running mean cost stays at B whatever the traffic: `bound()` is the guaranteed
    ceiling on the mean cost so far (for any order of requests, no exchangeability; see
    `calibration.pacing`), and every request stays under the family's hard cap.

        paced = curve.paced("resolve", 40.0)
        for problem in stream:
            gates, cap = paced.policy()
            result = cascade.solve(problem, budget=cap, gates=gates)
            paced.observe(result)

    Requests served concurrently (a server) use `begin` instead: the pacer then counts what
    the requests still running are expected to spend when it picks the next threshold (the
    running ones are the long, dear ones, and a pacer that heard only of finished requests
    would serve too dear), `spend` reports a running request's cost so far, and `observe`
    takes its ticket. Calls may come from several threads. With a `state_file` the pacer's
    state is kept after every finished request (and running requests' spend at most once per
    `spend_keep_interval` seconds) and resumed from on the next start, so the ceiling covers
    every request across restarts, crashes included: a request that was running when the
    process died is charged what it had spent when the state was last kept.
    """

    # A kept state costs ~0.2 ms (write + rename): after every step of 64 running requests
    # it would take the server's loop for a large share of its time. A finished request is
    # kept at once; a running one's spend at most this often (seconds), so a crash can miss
    # only the steps of the last interval.
    spend_keep_interval = 0.05

    def __init__(self, curve: BudgetCurve, method: str, budget: float, columns: Sequence[int],
                 step: float, start: int, state_file: str | Path | None = None) -> None:
        self._kept_at = -math.inf
        self.curve, self.method, self.budget, self.columns = curve, method, float(budget), list(columns)
        self.pacer = cal.BudgetPacer(len(self.columns), self.budget, step=step, start=float(start))
        self._lock = threading.Lock()
        self.state_file = None if state_file is None else Path(state_file)
        if self.state_file is not None:
            if self.state_file.exists():
                self.pacer = self._resumed(self.state_file)
            try:
                self._save()  # now: an unwritable place fails here, not after the first request
            except OSError as error:
                raise ConfigError(f"pacing state {self.state_file}: cannot write it ({error})") from None

    def _identity(self) -> dict:
        """What a kept state must match to be resumed: the family's settings in order."""
        return {"method": self.method, "budget": self.budget,
                "settings": [list(self.curve.candidates[j]) for j in self.columns]}

    def _resumed(self, path: Path) -> cal.BudgetPacer:
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"pacing state {path}: not readable as JSON ({error}); move it away to start "
                              f"afresh") from None
        if not isinstance(payload, dict) or payload.get("format") != PACING_FORMAT:
            raise ConfigError(f"pacing state {path}: not a pacing state file (format {PACING_FORMAT!r})")
        if {k: payload.get(k) for k in ("method", "budget", "settings")} != self._identity():
            raise ConfigError(f"pacing state {path} paces another family (method {payload.get('method')!r}, "
                              f"budget {payload.get('budget')!r}, or other thresholds) than this one "
                              f"(method {self.method!r}, budget {self.budget:g}); move it away to start "
                              f"afresh")
        try:
            pacer = cal.BudgetPacer.from_json(payload.get("pacer"))
        except cal.CalibrationError as error:
            raise ConfigError(f"pacing state {path}: {error}") from None
        if (pacer.step, pacer.start) != (self.pacer.step, self.pacer.start):
            raise ConfigError(f"pacing state {path} was kept with step {pacer.step:g} from setting "
                              f"{pacer.start:g}, not step {self.pacer.step:g} from {self.pacer.start:g}: its "
                              f"ceiling would not carry over; use its step or move it away")
        return pacer

    def _save(self) -> None:
        """Keep the state (atomically: a crash leaves the previous state, never half of one)."""
        if self.state_file is None:
            return
        payload = {"format": PACING_FORMAT, **self._identity(), "pacer": self.pacer.to_json()}
        partial = self.state_file.with_name(self.state_file.name + ".partial")
        partial.write_text(json.dumps(payload) + "\n")
        partial.replace(self.state_file)
        self._kept_at = time.monotonic()

    @property
    def column(self) -> int:
        """The curve column the next request runs."""
        with self._lock:
            return self.columns[self.pacer.index]

    def _gates(self, column: int) -> tuple[list[Gate], float | None]:
        family, threshold, cap = self.curve.candidates[column]
        return [family_gate(self.curve.gate, family, threshold)], cap

    def policy(self) -> tuple[list[Gate], float | None]:
        """(gates, hard cap) for the next request, at the pacer's current threshold."""
        return self._gates(self.column)

    def begin(self) -> tuple[int, list[Gate], float | None]:
        """Start a request: (ticket, gates, hard cap). Report its spend so far with
        `spend(ticket, cost)` and its end, however it ends, with `observe(result, ticket)`."""
        with self._lock:
            ticket, setting = self.pacer.begin()
        return (ticket, *self._gates(self.columns[setting]))

    def spend(self, ticket: int, spent: float) -> None:
        """A running request's total cost so far (cost units)."""
        with self._lock:
            self.pacer.spend(ticket, spent)
            if self.state_file is not None and time.monotonic() - self._kept_at >= self.spend_keep_interval:
                self._keep()

    def observe(self, result: Result | float, ticket: int | None = None) -> None:
        """A finished request: its `Result` (the total cost is read) or its cost in cost units;
        `ticket`: the one `begin` gave it."""
        cost = float(result) if isinstance(result, (int, float)) else result.cost.total
        with self._lock:
            self.pacer.observe(cost, ticket)
            self._keep()

    def _keep(self) -> None:
        """`_save` for a request being served: a failure to write is logged, not raised."""
        try:
            self._save()
        except OSError as error:  # the request is served either way; the file falls behind
            logger.warning("pacing state %s not kept: %s", self.state_file, error)

    @property
    def mean_cost(self) -> float:
        """Mean cost of the requests observed so far."""
        return self.pacer.mean_cost

    def bound(self) -> float:
        """The guaranteed ceiling on that mean (`calibration.BudgetPacer.bound`)."""
        with self._lock:
            return self.pacer.bound()

    def statement(self) -> str:
        """The ceiling in words."""
        with self._lock:
            return self.pacer.statement()


def curve_candidates(budgets: Sequence[float], thresholds: Sequence[float],
                     budget_thresholds: Sequence[float],
                     cap_factor: float, resolve_thresholds: Sequence[float] = (),
                     ) -> list[tuple[str, float, float | None]]:
    """The sweep columns: the threshold family (uncapped), then per budget the budget family,
    then per budget the resolve family (none when `resolve_thresholds` is empty)."""
    columns: list[tuple[str, float, float | None]] = [("threshold", float(t), None) for t in thresholds]
    for b in budgets:
        columns += [("budget", float(t), float(cap_factor * b)) for t in budget_thresholds]
    for b in budgets:
        columns += [("resolve", float(t), float(cap_factor * b)) for t in resolve_thresholds]
    return columns


def family_gate(gate: BudgetGate, family: str, threshold: float) -> Gate:
    """The gate a curve column runs: the BudgetGate at a floor ("budget"), its inner gate at a
    threshold ("threshold"), or the inner gate in resolve mode ("resolve")."""
    if family == "budget":
        return dataclasses.replace(gate, threshold=threshold)
    if family == "resolve":
        try:
            return dataclasses.replace(gate.inner, threshold=threshold, mode="resolve")
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"method 'resolve' needs a gate that takes mode='resolve' (a confidence or "
                              f"advantage gate), got {type(gate.inner).__name__}: {error}") from None
    return dataclasses.replace(gate.inner, threshold=threshold)


def default_resolve_thresholds(gate: BudgetGate) -> list[float]:
    """The resolve family's default grid: 21 points in [0, 1] and the fitted quantiles of the
    cheapest tier's step scores from the median up (every level `fit_budget_gate` kept), where
    a problem's most doubted step lies: fine enough that the certified threshold can use most
    of a budget."""
    q = gate.score_quantiles
    return list(default_thresholds()) + [round(float(v), 6) for v in q[len(q) // 2:]]


def sweep_curve(cascade: Cascade, problems: Sequence[str],
                candidates: Sequence[tuple[str, float, float | None]],
                gate: BudgetGate, progress: Callable[[int, int], None] | None = None,
                checkpoint: str | Path | None = None) -> SweepResult:
    """Sweep the curve's columns: the BudgetGate columns (both families a BudgetGate runs: without
    a cap it is its inner gate at the floor) in one sweep, the resolve columns in another (a
    gate in another mode), joined in the columns' order. Columns of different sweeps share no
    calls, so the arrays are those of independent runs either way.

    checkpoint: a path prefix; each sweep's rows are appended to `<prefix>.<family>.jsonl` as
    problems finish, and a rerun with the same settings resumes from them (`sweep_file`)."""
    groups = {"budget": [j for j, c in enumerate(candidates) if c[0] != "resolve"],
              "resolve": [j for j, c in enumerate(candidates) if c[0] == "resolve"]}
    parts = []
    for family, columns in groups.items():
        if not columns:
            continue
        family_gates = [gate if family == "budget" else family_gate(gate, "resolve", 0.5)]
        thresholds, caps = [(candidates[j][1],) for j in columns], [candidates[j][2] for j in columns]
        if checkpoint is None:
            swept = sweep(cascade, problems, thresholds, gates=family_gates, caps=caps, progress=progress)
        else:
            swept = sweep_file(cascade, problems, thresholds, f"{checkpoint}.{family}.jsonl",
                               gates=family_gates, caps=caps, progress=progress)
        parts.append((columns, swept))
    return join_sweeps(parts, len(candidates))


def join_sweeps(parts: Sequence[tuple[Sequence[int], SweepResult]], n_columns: int) -> SweepResult:
    """One SweepResult of the same problems from sweeps of disjoint columns (column indices given)."""
    first = parts[0][1]
    n = len(first.problems)
    costs, escalation = np.zeros((n, n_columns)), np.zeros((n, n_columns))
    capped = np.zeros((n, n_columns), dtype=bool)
    answers: list[list[str | None]] = [[None] * n_columns for _ in range(n)]
    candidates: list[tuple[float, ...]] = [()] * n_columns
    for columns, part in parts:
        if part.problems != first.problems:
            raise ConfigError("join_sweeps needs sweeps of the same problems")
        idx = np.asarray(columns, dtype=np.intp)
        costs[:, idx], escalation[:, idx] = part.costs, part.escalation
        if part.cap_intervened is not None:
            capped[:, idx] = part.cap_intervened
        for i, row in enumerate(part.answers):
            for j, answer in zip(columns, row, strict=True):
                answers[i][j] = answer
        for j, c in zip(columns, part.candidates, strict=True):
            candidates[j] = c
    return SweepResult(candidates=tuple(candidates), problems=first.problems, costs=costs,
                       escalation=escalation,
                       answers=tuple(tuple(r) for r in answers), reference_answers=first.reference_answers,
                       reference_costs=first.reference_costs,
                       executed_tokens=sum(p.executed_tokens for _, p in parts),
                       independent_tokens=sum(p.independent_tokens for _, p in parts),
                       seconds=sum(p.seconds for _, p in parts), cap_intervened=capped)


def _family_columns(candidates, family: str, cap: float | None = None) -> np.ndarray:
    return np.array([j for j, (f, _, c) in enumerate(candidates)
                     if f == family and (cap is None or c == cap)], dtype=np.intp)


def select_on_curve(costs: np.ndarray, candidates: Sequence[tuple[str, float, float | None]],
                    objective: np.ndarray, method: str, budget: float, alpha: float, delta: float,
                    cap_factor: float, cost_max_uncapped: float) -> tuple[int, str]:
    """Certify one method at one budget on recorded arrays; returns (column, statement).

    costs: (n, K) calibration costs per sweep column; objective: (K,) label-free values
    (agreement), maximised among certified columns. Columns of a family are ordered
    cheapest first (thresholds descending). Raises calibration.CalibrationError when
    nothing is certified."""
    if method in ("budget", "resolve"):
        columns = _family_columns(candidates, method, cap_factor * budget)
        if columns.size == 0:
            raise cal.CalibrationError(f"no {method}-family columns swept for budget {budget:g}")
        cap = cap_factor * budget
        selection = cal.select_risk_control(costs[:, columns], budget, np.arange(columns.size), cost_max=cap)
        statement = (f"E[cost] <= {budget:g} (conformal risk control, cost_max = the hard cap {cap:g}; "
                     f"every request <= {cap:g})")
    else:
        columns = _family_columns(candidates, "threshold")
        order = np.arange(columns.size)
        if method == "risk":
            selection = cal.select_risk_control(costs[:, columns], budget, order, cost_max=cost_max_uncapped)
        elif method == "conformal":
            selection = cal.select_conformal(costs[:, columns], budget, alpha, order)
        elif method == "ltt":
            selection = cal.select_ltt(costs[:, columns], budget, alpha, delta, order)
        else:
            raise ConfigError(f"method must be one of {CURVE_METHODS}, got {method!r}")
        statement = ""
    best = cal.choose_by_objective(selection, objective[columns])
    chosen = selection.at(best)
    return int(columns[best]), statement or chosen.statement()


def calibrate_budget_curve(cascade: Cascade, problems: Sequence[str], *,
                           budgets: Sequence[float] | None = None,
                           methods: Sequence[str] = CURVE_METHODS, cap_factor: float = 2.0,
                           alpha: float = 0.1, delta: float = 0.05,
                           thresholds: Sequence[float] | None = None,
                           budget_thresholds: Sequence[float] | None = None,
                           resolve_thresholds: Sequence[float] | None = None,
                           gate: BudgetGate | None = None, fit_problems: Sequence[str] | None = None,
                           swept: SweepResult | None = None,
                           progress: Callable[[int, int], None] | None = None) -> BudgetCurve:
    """The accuracy-budget curve of a two-tier cascade, calibrated on unlabeled `problems`.

    budgets: mean budgets B (cost units); default `budget_grid` between the small-only and
    the large-only mean cost of a pilot (the first 20 problems run each way). For each B
    and method, the certified policy and its agreement with the top tier:
    - "budget": BudgetGate under the hard cap cap_factor * B, floor threshold certified by
      conformal risk control with cost_max = that cap: E[cost] <= B (exchangeable problems);
    - "resolve": the inner gate in resolve mode (a doubted step hands the problem to the
      large model, which solves it again) under the same cap, threshold certified the same way;
    - "risk": one threshold, no cap, conformal risk control with cost_max = the request's
      worst case without a cap: E[cost] <= B;
    - "conformal": one threshold, split conformal (C3PO's setting): P(cost > B) <= alpha;
    - "ltt": one threshold, Learn-then-Test: P(P(cost > B) > alpha) <= delta.
    gate: a fitted BudgetGate (default: `fit_budget_gate` on `fit_problems`, else on `problems`).
    thresholds / budget_thresholds: the two families' grids (default: 21 points in [0, 1]).
    resolve_thresholds: the resolve family's grid (default: `default_resolve_thresholds`).
    """
    problems = list(problems)
    if not problems:
        raise ConfigError("calibrate_budget_curve needs at least one problem")
    if not (isinstance(cap_factor, (int, float)) and math.isfinite(cap_factor) and cap_factor >= 1):
        raise ConfigError(f"cap_factor must be a finite number >= 1 (the cap is cap_factor x budget), "
                          f"got {cap_factor!r}")
    unknown = set(methods) - set(CURVE_METHODS)
    if unknown or not methods:
        raise ConfigError(f"methods must be a non-empty subset of {CURVE_METHODS}, got {list(methods)}")
    if gate is None:
        gate = fit_budget_gate(cascade, list(fit_problems or problems))
    if budgets is None:
        pilot = problems[:20]
        small = np.mean([r.cost.total for r in cascade.solve_many(pilot, gates=[AlwaysSmall()])])
        large = np.mean([r.cost.total for r in cascade.solve_many(pilot, gates=[AlwaysLarge()])])
        budgets = budget_grid(float(small), float(large))
    budgets = tuple(sorted(float(b) for b in budgets))
    if any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise ConfigError(f"budgets must be finite and > 0, got {list(budgets)}")
    grid = sorted({float(t) for t in (thresholds or default_thresholds())}, reverse=True)
    floors = sorted({float(t) for t in (budget_thresholds or default_thresholds())}, reverse=True)
    resolve_grid = ()
    if "resolve" in methods:
        family_gate(gate, "resolve", 0.5)  # refuse a gate without a resolve mode before any work
        resolve_grid = sorted({float(t) for t in (resolve_thresholds or default_resolve_thresholds(gate))},
                              reverse=True)
    # Only the families the methods read are swept.
    candidates = curve_candidates(budgets, grid if set(methods) & {"risk", "conformal", "ltt"} else [],
                                  floors if "budget" in methods else [], cap_factor, resolve_grid)
    if swept is None:
        swept = sweep_curve(cascade, problems, candidates, gate, progress=progress)
    elif swept.costs.shape[1] != len(candidates):
        raise ConfigError(f"swept has {swept.costs.shape[1]} columns, the curve needs {len(candidates)}")
    cost_max = uncapped_cost_max(cascade, problems)
    agreement = swept.agreement.mean(axis=0)
    points = []
    for method in methods:
        for b in budgets:
            try:
                j, statement = select_on_curve(swept.costs, candidates, agreement, method, b, alpha, delta,
                                               cap_factor, cost_max)
            except cal.CalibrationError as error:
                points.append(BudgetPoint(b, method, None, None, None, None, None, "", str(error)))
                continue
            family, threshold, cap = candidates[j]
            points.append(BudgetPoint(b, method, j, cap, threshold, float(agreement[j]),
                                      float(swept.costs[:, j].mean()), statement))
    return BudgetCurve(gate=gate, budgets=budgets, cap_factor=float(cap_factor), alpha=alpha, delta=delta,
                       candidates=tuple(candidates), points=tuple(points), swept=swept,
                       cost_max_uncapped=cost_max)


def uncapped_cost_max(cascade: Cascade, problems: Sequence[str]) -> float:
    """An upper bound on one request's cost without a cap: every tier prefills the longest
    prompt and every step's tokens once (KV caches keep what was read) and writes
    max_steps * max_step_tokens tokens."""
    options = cascade.options
    tokens = options.max_steps * options.max_step_tokens
    total = 0.0
    for tier, model in enumerate(cascade.models):
        prompt = max(model.prefill_bound("cost-bound", p, "") for p in problems)
        model.release("cost-bound")
        total += cascade.cost_model.charge(tier, prompt + 2 * tokens, 2 * tokens)
    return float(total)


def _router_from(routers: RouterSource | None, file: str):
    if routers is None or file not in routers:
        raise ConfigError(f"the curve's gate needs the router {file}; pass routers= (e.g. "
                          "{file: cascade.router.load_router(file)})")
    return routers[file]


def load_budget_curve(path: str | Path, models: Sequence | None = None,
                      routers: RouterSource | None = None) -> BudgetCurve:
    """Read a curve written by `cascade calibrate --curve` (or `BudgetCurve.to_json`).

    models: the backends it will run on; refused when the file records other models (name
    and weight fingerprint). routers: see `BudgetCurve.from_json`. Raises ConfigError for a
    missing, unreadable or malformed file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no accuracy-budget curve at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the accuracy-budget curve {str(path)!r}: {error}") from None
    curve = BudgetCurve.from_json(payload, routers)
    recorded = payload.get("models")
    if models is not None and recorded is not None:
        have = [{"name": m.info.name, "fingerprint": m.info.fingerprint} for m in models]
        if have != recorded:
            raise ConfigError(f"the curve {str(path)!r} was calibrated for models {recorded}, not {have}")
    return curve
