"""Label-free calibration of a cascade's gate thresholds, and the memoized sweep behind it.

`sweep` runs a cascade at many threshold candidates on each problem and records arrays
(cost, escalation, answer); `calibrate` hands them to the pure `calibration` package to
certify, for each budget B of a grid, a threshold whose cost exceeds B on a new problem
with probability at most alpha (with confidence 1 - delta for Learn-then-Test), and
picks among certified thresholds by a label-free objective (default: agreement of the
final answer with the top tier's own answer). The result is a frozen, versioned,
checksummed `Calibration` that `Cascade.solve(budget=B)` looks thresholds up in.

Costs are recorded without a cap. At serving time the hard cap still holds for every
request; the calibration certifies that the cap has to intervene on at most a fraction
alpha of problems, so the calibrated accuracy is what users get on the others.

The sweep is memoized as a tree: for one problem, all candidates run in lockstep, and
candidates whose calls so far were identical share one backend session and one model
call. When their next calls differ, the session is forked (KV cache copied), so every
branch's prefill and cost are exactly those of an independent run. Branches that parted
still share a call when it is the same call to a model whose session has seen the same
calls in both (e.g. the small model drafting the next step after one branch had the
large model rewrite a step to the very text the other branch kept): it runs once and
that model's state is copied to the other branch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

import calibration as cal
from cascade.calibration_file import SCHEMA_VERSION, Calibration, CalibrationFileError
from cascade.checks import check_budget, check_number, check_probability, check_problems
from cascade.errors import ConfigError, certification_error
from cascade.gates import AlwaysLarge, Gate
from cascade.records import Result
from cascade.runtime import Cascade, SolveOptions
from cascade.specs import gate_spec_of
from decoding import Backend, StepRequest

__all__ = ["SweepResult", "Calibration", "CalibrationFileError", "sweep", "sweep_file", "calibrate",
           "default_thresholds", "SCHEMA_VERSION"]

Method = Literal["ltt", "conformal", "risk"]
Objective = Literal["agreement", "max_escalation", "min_cost"]


def default_thresholds(k: int = 21) -> tuple[float, ...]:
    """k thresholds evenly spaced in [0, 1] (scores of the built-in gates lie there)."""
    return tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, k), 6))


# ---- the sweep ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepResult:
    """Per-problem outcomes at each candidate.

    candidates: threshold vectors, shape (K, n_gates). costs, escalation: shape (n, K).
    answers: n lists of K answers. reference_answers, reference_costs: the top tier's own
    answer and cost per problem (the label-free reference).
    executed_tokens / independent_tokens: tokens the sweep ran vs. what K independent
    runs of the same candidates would have run (prefill + generated, all tiers). The
    sweep's count includes the top tier's reference run, which the K runs do not need: a
    sweep that shares nothing runs more tokens than they do.
    """

    candidates: tuple[tuple[float, ...], ...]
    problems: tuple[str, ...]
    costs: np.ndarray
    escalation: np.ndarray
    answers: tuple[tuple[str | None, ...], ...]
    reference_answers: tuple[str | None, ...]
    reference_costs: tuple[float, ...] = ()
    executed_tokens: int = 0
    independent_tokens: int = 0
    seconds: float = 0.0
    cap_intervened: np.ndarray | None = None  # (n, K) bool: the hard cap changed what the run did

    @property
    def agreement(self) -> np.ndarray:
        """(n, K) bool: the candidate's answer equals the top tier's answer (both present)."""
        return np.array([[a is not None and a == ref for a in row]
                         for row, ref in zip(self.answers, self.reference_answers, strict=False)], dtype=bool)


class _SharedView(Backend):
    """A backend as the step machines of one sweep see it: machine request ids are mapped
    to the shared session of their branch (calls themselves go through the driver)."""

    def __init__(self, backend, route: dict[str, str]) -> None:
        self.backend = backend
        self.route = route
        self.info = backend.info

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        return self.backend.prefill_bound(self.route[request_id], problem, context)

    def release(self, request_id: str) -> None:  # sessions are released by the sweep
        pass

    def next_steps(self, requests):  # pragma: no cover - the sweep driver calls the backend
        raise AssertionError("sweep machines must not call backends directly")

    score_steps = next_steps


# Calls a sweep of one problem keeps for branches that reach them later; each holds a copy of
# the tier's cache. On the embedded pair's budget curve (10 problems) 16 ran 1.97x one pass,
# 64 ran 1.96x, 8 ran 2.16x.
_MEMO_SIZE = 16


def _call_key(tier: int, request) -> tuple:
    return (tier, type(request).__name__, dataclasses.replace(request, request_id=""))


def _sweep_problem(cascade: Cascade, problem: str, candidate_gates: list[list[Gate]],
                   options: SolveOptions, tag: str, caps: Sequence[float | None] | None = None
                   ) -> Generator[tuple[int, list], list, tuple[list[Result], int]]:
    """Run every candidate on one problem as a shared tree; returns results and tokens run.

    A generator: it yields each batch of model calls as (tier, requests) and is sent their
    outputs, so that `_run_sweeps` can run the batches of several problems as one."""
    models = cascade.models
    shareable = all(m.supports_fork for m in models)
    route: dict[str, str] = {}
    views = [_SharedView(m, route) for m in models]
    runner = Cascade(models=views, gates=candidate_gates[0], cost_model=cascade.cost_model,
                     tier_names=cascade.tier_names, options=options)
    machine_ids = [f"{tag}:m{k}" for k in range(len(candidate_gates))]
    for k, mid in enumerate(machine_ids):
        route[mid] = f"{tag}:s0" if shareable else f"{tag}:s{k}"
    caps = list(caps) if caps is not None else [None] * len(candidate_gates)
    machines = [runner.step_machine(problem, cap, gates, options, request_id=mid)
                for gates, mid, cap in zip(candidate_gates, machine_ids, caps, strict=False)]
    results: list[Result | None] = [None] * len(machines)
    pending: dict[int, tuple] = {}
    executed = 0
    fresh = iter(range(1, 1 << 30))
    # Calls run in earlier rounds, for branches that reach the same call a round or two
    # later (a column that drafts before escalating lags one that does not): key ->
    # (snapshot session of the tier's state right after the call, output, history before,
    # history after). Bounded: each snapshot holds a copy of the tier's cache.
    memo: dict[tuple, tuple[str, object, int, int]] = {}
    evicted: list[tuple[int, str]] = []  # (tier, snapshot) dropped from the memo, released after the round

    def advance(k: int, value=None) -> None:
        try:
            pending[k] = machines[k].send(value)
        except StopIteration as stop:
            results[k] = stop.value
            pending.pop(k, None)

    def run_batch(tier: int, requests: list, sessions: list[str]):
        """Calls of one kind to one tier, each in its own session, as one batch."""
        nonlocal executed
        requests = [dataclasses.replace(r, request_id=s) for r, s in zip(requests, sessions, strict=False)]
        outputs = yield tier, requests
        if isinstance(requests[0], StepRequest):
            executed += sum(o.prefill_tokens + o.decoded_tokens for o in outputs)
        else:
            executed += sum(o.prefill_tokens + o.scored_tokens for o in outputs)
        return list(outputs)

    # A model call's output depends only on the call and on what that model's session
    # holds: `seen[session][tier]` names that history (an interned chain of calls), and a
    # backend with `state_key` names the tokens it will hold once caught up. Machines
    # whose next calls are the same call to a tier holding the same (same history, or
    # the same tokens by another history: branches that parted over a decision and then
    # wrote the same text, e.g. an escalated step the large model wrote as the small one
    # had drafted it) share one execution: it runs in one session and that tier's state
    # is copied to the others (`fork` for the same history, `adopt` for the same tokens,
    # each charged the prefill it would have made itself).
    histories: dict[tuple, int] = {}
    seen: dict[str, list[int]] = {}

    def history(session: str) -> list[int]:
        return seen.setdefault(session, [0] * len(models))

    def extend(session: str, tier: int, request) -> None:
        chain = (history(session)[tier], _call_key(tier, request))
        history(session)[tier] = histories.setdefault(chain, len(histories) + 1)

    for k in range(len(machines)):
        advance(k)
    try:
        while pending:
            buckets: dict[tuple, list[int]] = {}
            for k, calls in pending.items():
                session = route[machine_ids[k]]
                if isinstance(calls, list):  # calls sent together (draft_ahead): shared within a session
                    key = ("together", session, tuple(_call_key(*c) for c in calls))
                else:
                    tier, request = calls
                    # Without fork, a session's state cannot be copied: share within a session
                    # only. With it, by the tokens the tier will hold when the backend says
                    # (state_key), else by the history of calls.
                    where: object = session
                    if shareable:
                        tokens = models[tier].state_key(dataclasses.replace(request, request_id=session))
                        where = ("history", history(session)[tier]) if tokens is None else ("tokens", tokens)
                    key = ("one", tier, where, _call_key(tier, request))
                buckets.setdefault(key, []).append(k)
            # Machines of one session that part this round: each further bucket gets its own copy.
            owner: dict[str, tuple] = {}
            branches: dict[tuple[str, tuple], str] = {}
            for key, members in buckets.items():
                for k in members:
                    session = route[machine_ids[k]]
                    if owner.setdefault(session, key) == key:
                        continue
                    if (session, key) not in branches:
                        branch = branches[(session, key)] = f"{tag}:s{next(fresh)}"
                        for model in models:
                            model.fork(session, branch)
                        seen[branch] = list(history(session))
                    route[machine_ids[k]] = branches[(session, key)]
            # Calls to the highest tier asked for go first; the others wait a round. A branch
            # that escalated a step has one more call (the next tier's) than one that did not,
            # so this keeps both at the same step, where their next calls can be shared.
            def tier_of(key: tuple, buckets: dict[tuple, list[int]] = buckets) -> int:
                calls = pending[buckets[key][0]]
                return max(t for t, _ in calls) if isinstance(calls, list) else calls[0]

            top = max(tier_of(key) for key in buckets)
            buckets = {key: members for key, members in buckets.items() if tier_of(key) == top}
            outputs: dict[tuple, object] = {}
            hits = {key: memo[key] for key in buckets if key in memo}  # kept even if evicted this round
            # Single calls of one kind to one tier run as one batch (each bucket in its own
            # session, so the batch's request ids are distinct).
            batches: dict[tuple, list[tuple]] = {}
            for key, members in buckets.items():
                if key[0] == "one" and key not in hits:
                    tier, request = pending[members[0]]
                    batches.setdefault((tier, type(request)), []).append(key)
            for (tier, _), keys in batches.items():
                firsts = [route[machine_ids[buckets[key][0]]] for key in keys]
                requests = [pending[buckets[key][0]][1] for key in keys]
                for key, output in zip(keys, (yield from run_batch(tier, requests, firsts)), strict=False):
                    outputs[key] = output
            for key, members in buckets.items():
                calls = pending[members[0]]
                sessions = list(dict.fromkeys(route[machine_ids[k]] for k in members))
                if key[0] == "together":  # run in turn
                    output = []
                    for tier, request in calls:  # in turn: each sees the state the last one left
                        output += (yield from run_batch(tier, [request], [sessions[0]]))
                    for tier, request in calls:
                        extend(sessions[0], tier, request)
                    session_output = dict.fromkeys(sessions, output)
                else:
                    tier, request = calls
                    if key in outputs:  # ran this round, in the first session
                        source = sessions[0]
                        output, before = outputs[key], history(source)[tier]
                        extend(source, tier, request)
                        after = history(source)[tier]
                        if shareable:
                            if len(memo) >= _MEMO_SIZE:  # the oldest goes at the end of the round
                                oldest = next(iter(memo))
                                evicted.append((oldest[1], memo.pop(oldest)[0]))
                            snapshot = f"{tag}:memo{next(fresh)}"
                            models[tier].fork(source, snapshot)
                            memo[key] = (snapshot, output, before, after)
                        others = sessions[1:]
                    else:  # ran in an earlier round: its snapshot is the source
                        source, output, before, after = hits[key]
                        others = sessions
                    session_output = dict.fromkeys(sessions, output)
                    for other in others:
                        if history(other)[tier] == before:  # same history before, same state after
                            models[tier].fork(source, other)
                            history(other)[tier] = after
                            continue
                        # The same tokens by another history: the state is taken over, and the
                        # call costs this session what it would have had to prefill itself.
                        own_prefill = models[tier].prefill_bound(other, request.problem, request.context)
                        session_output[other] = dataclasses.replace(output, prefill_tokens=own_prefill)
                        models[tier].adopt(source, dataclasses.replace(request, request_id=other))
                        extend(other, tier, request)
                for k in members:
                    advance(k, session_output[route[machine_ids[k]]])
            while evicted:
                tier, snapshot = evicted.pop()
                models[tier].release(snapshot)
    finally:
        for session in set(route.values()):
            for model in models:
                model.release(session)
        for key, (snapshot, *_) in memo.items():
            models[key[1]].release(snapshot)
        for tier, snapshot in evicted:
            models[tier].release(snapshot)
    return results, executed  # type: ignore[return-value]


def _run_sweeps(models: Sequence[Backend], machines: list) -> list[tuple[list[Result], int]]:
    """Drive several problems' sweeps (`_sweep_problem` generators) together: the calls
    they wait on, of one kind to one tier, run as one batch (their sessions are distinct)."""
    done: list = [None] * len(machines)
    waiting: dict[int, tuple[int, list]] = {}

    def send(index: int, value) -> None:
        try:
            waiting[index] = machines[index].send(value)
        except StopIteration as stop:
            done[index] = stop.value
            waiting.pop(index, None)

    try:
        for index in range(len(machines)):
            send(index, None)
        while waiting:
            groups: dict[tuple[int, type], list[int]] = {}
            for index, (tier, requests) in waiting.items():
                groups.setdefault((tier, type(requests[0])), []).append(index)
            for (tier, kind), members in groups.items():
                merged = [r for index in members for r in waiting[index][1]]
                outputs = list(models[tier].next_steps(merged) if kind is StepRequest
                               else models[tier].score_steps(merged))
                start = 0
                for index in members:
                    size = len(waiting[index][1])
                    send(index, outputs[start: start + size])
                    start += size
    finally:
        for machine in machines:  # a failure: the others release their sessions too
            machine.close()
    return done


def _with_threshold(gate: Gate, threshold: float) -> Gate:
    if not dataclasses.is_dataclass(gate):
        raise ConfigError(f"{type(gate).__name__} is not a dataclass gate; cannot sweep its threshold")
    return dataclasses.replace(gate, threshold=threshold)


def _tokens(result: Result) -> int:
    return sum(u.prefill_tokens + u.generated_tokens for u in result.cost.per_tier)


def sweep(cascade: Cascade, problems: Sequence[str], candidates: Sequence[Sequence[float]],
          *, gates: Sequence[Gate] | None = None, options: SolveOptions | None = None,
          progress: Callable[[int, int], None] | None = None,
          rows: list[dict] | None = None, on_row: Callable[[dict], None] | None = None,
          caps: Sequence[float | None] | None = None, concurrency: int = 8) -> SweepResult:
    """Run the cascade at each candidate threshold vector (and top-tier only) on each problem.

    candidates: K threshold vectors, one threshold per gate. caps: the hard cap each
    candidate's requests run under (K values, None = no cap; default: none; the top tier's
    reference run is never capped). rows: rows of an earlier,
    interrupted sweep of the same candidates (resumed, not recomputed); on_row is called
    with each new row so callers can persist it. concurrency: problems swept together,
    their model calls batched (rows still come in the problems' order).
    """
    if not (isinstance(concurrency, int) and concurrency >= 1):
        raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    problems = check_problems(problems)
    gates = list(gates or cascade.gates)
    options = options or cascade.options
    candidates = [tuple(float(t) for t in c) for c in candidates]
    if not candidates or any(len(c) != len(gates) for c in candidates):
        raise ConfigError(f"candidates must be non-empty threshold vectors of length {len(gates)}")
    candidate_gates = [[_with_threshold(g, t) for g, t in zip(gates, c, strict=False)] for c in candidates]
    candidate_gates.append([AlwaysLarge()] * len(gates))  # the label-free reference
    if caps is not None:
        caps = [None if c is None else float(c) for c in caps]
        if len(caps) != len(candidates) or any(c is not None and not (math.isfinite(c) and c >= 0)
                                               for c in caps):
            raise ConfigError(f"caps must be {len(candidates)} caps (finite numbers >= 0 or None), "
                              f"got {caps}")
        caps = [*caps, None]
    done = list(rows or [])
    # before any work: a mismatch must not cost a sweep
    for row, problem in zip(done, problems, strict=False):
        if row["problem"] != problem or len(row["costs"]) != len(candidates):
            raise ConfigError("resumed sweep rows do not match these problems and candidates")
    started = time.perf_counter()
    for first in range(len(done), len(problems), concurrency):
        chunk = range(first, min(first + concurrency, len(problems)))
        outcomes = _run_sweeps(cascade.models, [
            _sweep_problem(cascade, problems[index], candidate_gates, options, f"sweep{index}", caps)
            for index in chunk])
        for index, (results, executed) in zip(chunk, outcomes, strict=True):
            row = {"problem": problems[index], "costs": [r.cost.total for r in results[:-1]],
                   "capped": [r.cap_intervened for r in results[:-1]],
                   "escalation": [r.escalation_rate for r in results[:-1]],
                   "answers": [r.answer for r in results[:-1]], "reference_answer": results[-1].answer,
                   "reference_cost": results[-1].cost.total, "executed_tokens": executed,
                   "independent_tokens": sum(_tokens(r) for r in results[:-1])}
            done.append(row)
            if on_row is not None:
                on_row(row)
            if progress is not None:
                progress(index + 1, len(problems))
    return SweepResult(
        candidates=tuple(candidates), problems=tuple(problems),
        costs=np.array([r["costs"] for r in done], dtype=float).reshape(len(done), len(candidates)),
        escalation=np.array([r["escalation"] for r in done], dtype=float).reshape(len(done), len(candidates)),
        answers=tuple(tuple(r["answers"]) for r in done),
        reference_answers=tuple(r["reference_answer"] for r in done),
        reference_costs=tuple(r.get("reference_cost", math.nan) for r in done),
        cap_intervened=np.array([r.get("capped", [False] * len(candidates)) for r in done],
                                dtype=bool).reshape(len(done), len(candidates)),
        executed_tokens=sum(r["executed_tokens"] for r in done),
        independent_tokens=sum(r["independent_tokens"] for r in done),
        seconds=time.perf_counter() - started,
    )


def sweep_file(cascade: Cascade, problems: Sequence[str], candidates: Sequence[Sequence[float]],
               path: str | Path, *, gates: Sequence[Gate] | None = None,
               caps: Sequence[float | None] | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_resume: Callable[[int], None] | None = None) -> SweepResult:
    """`sweep`, resumable through a JSONL file: each finished problem's row is appended to
    `path` as it comes, and a file written for the same models, gates, candidates and caps
    is resumed: its rows are reused as far as their problems are these, in order (the file
    is cut there); a file made with other settings is started afresh. gates / caps: as for
    `sweep`. on_resume is called with the number of rows reused."""
    path = Path(path)
    header = {"models": [[m.info.name, m.info.fingerprint] for m in cascade.models],
              "candidates": [list(c) for c in candidates],
              "gates": [repr(g) for g in (cascade.gates if gates is None else gates)]}
    if caps is not None:  # absent for uncapped sweeps, so files written before caps existed resume
        header["caps"] = list(caps)
    rows: list[dict] = []
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and json.loads(lines[0]) == json.loads(json.dumps(header)):
        # Rows are per problem, in order: a longer earlier run's first rows serve a shorter
        # one; from the first row of another problem on, the file is swept again.
        stored = [json.loads(line) for line in lines[1:] if line.strip()]
        for row, problem in zip(stored, problems, strict=False):
            if row["problem"] != problem or len(row["costs"]) != len(candidates):
                break
            rows.append(row)
        if len(rows) < len(stored) and len(rows) < len(problems):
            path.write_text("".join(json.dumps(r) + "\n" for r in [header, *rows]))
        if on_resume is not None:
            on_resume(len(rows))
    else:
        path.write_text(json.dumps(header) + "\n")

    def keep(row: dict) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    return sweep(cascade, problems, candidates, gates=gates, caps=caps, rows=rows, on_row=keep,
                 progress=progress)


# ---- calibrate ------------------------------------------------------------------------------

def _default_paths(candidates: list[tuple[float, ...]]) -> list[np.ndarray]:
    """Paths to test candidates along: for a product grid of threshold vectors (several
    gates), `cal.grid_paths` (the diagonal and one staircase per gate, fixed by design);
    otherwise the candidates in the order given (cheapest first)."""
    if len(candidates[0]) > 1:
        try:
            return list(cal.grid_paths(np.array(candidates)))
        except cal.CalibrationError:
            pass  # not a product grid: one path, as given
    return [np.arange(len(candidates))]


def _select(method: str, costs: np.ndarray, budget: float, alpha: float, delta: float,
            paths: list[np.ndarray], cost_max: float | None, thresholds: np.ndarray):
    if method == "ltt" and len(paths) > 1:
        return cal.select_ltt_paths(costs, budget, alpha, delta, paths, thresholds=thresholds)
    if method in ("conformal", "risk") and len(paths) > 1:
        raise ConfigError(f"method {method!r} needs one ordered path along which cost is monotone, "
                          f"got {len(paths)} paths; give paths=[...] with one path, or method='ltt'")
    order = paths[0]
    if method == "ltt":
        if thresholds.ndim == 2:
            return cal.select_ltt_path(costs, budget, alpha, delta, order, thresholds=thresholds)
        return cal.select_ltt(costs, budget, alpha, delta, order, thresholds=thresholds)
    if thresholds.ndim == 2:
        thresholds = None  # the conformal methods report scalar thresholds only; index them
    if method == "conformal":
        return cal.select_conformal(costs, budget, alpha, order, thresholds=thresholds)
    if method == "risk":
        if cost_max is None:
            raise ConfigError("method='risk' needs cost_max, an upper bound on one problem's cost")
        return cal.select_risk_control(costs, budget, order, cost_max=cost_max, thresholds=thresholds)
    raise ConfigError(f"method must be 'ltt', 'conformal' or 'risk', got {method!r}")


def _objective_values(objective: str, swept: SweepResult) -> np.ndarray:
    if objective == "agreement":
        return swept.agreement.mean(axis=0)
    if objective == "max_escalation":
        return swept.escalation.mean(axis=0)
    if objective == "min_cost":
        return -swept.costs.mean(axis=0)
    raise ConfigError(f"objective must be 'agreement', 'max_escalation' or 'min_cost', got {objective!r}")


def calibrate(cascade: Cascade, problems: Sequence[str], budget: float | None = None, *,
              budgets: Sequence[float] | None = None, alpha: float = 0.1, delta: float = 0.05,
              method: Method = "ltt", objective: Objective = "agreement",
              thresholds: Sequence[float] | None = None,
              candidates: Sequence[Sequence[float]] | None = None,
              paths: Sequence[Sequence[int]] | None = None,
              labels: Sequence[str | None] | None = None, cost_max: float | None = None,
              swept: SweepResult | None = None, progress: Callable[[int, int], None] | None = None,
              ) -> Calibration:
    """Certify a threshold (vector) for each budget from unlabeled `problems`.

    Candidates: `candidates` (threshold vectors, one per gate) or `thresholds` (the same
    threshold at every gate; default 21 points in [0, 1]). They are tested from the
    highest thresholds (least escalation, cheapest) down: an order fixed before seeing
    data, as fixed-sequence Learn-then-Test requires. `paths`: candidate index paths,
    each cheapest first, fixed without data. Default: for a product grid of threshold
    vectors (e.g. `calibration.product_grid`), `calibration.grid_paths` (lower all gates
    together, or one gate first), tested with `calibration.select_ltt_paths`
    (fixed-sequence along each path, Bonferroni over paths: FWER <= delta); otherwise
    one path, the candidates in the order given.

    Guarantees (problems exchangeable with future ones; i.i.d. for LTT):
    - "ltt": with probability >= 1 - delta over the calibration set,
      P(cost > B) <= alpha at the chosen thresholds (no monotonicity needed);
    - "conformal": P(cost > B) <= alpha, if cost is monotone along the order;
    - "risk": E[cost] <= B (needs cost_max, an upper bound on any problem's cost).
    labels (optional) are used only to report accuracy, never to choose.
    """
    # Every argument is checked here, before the sweep: a mistake must not cost minutes of model calls.
    problems = check_problems(problems)
    if not problems:
        raise ConfigError("calibrate needs at least one problem")
    alpha = check_probability(alpha, "alpha")
    delta = check_probability(delta, "delta")
    if method not in ("ltt", "conformal", "risk"):
        raise ConfigError(f"method must be 'ltt', 'conformal' or 'risk', got {method!r}")
    if objective not in ("agreement", "max_escalation", "min_cost"):
        raise ConfigError(f"objective must be 'agreement', 'max_escalation' or 'min_cost', got {objective!r}")
    if method == "risk":
        if cost_max is None:
            raise ConfigError("method='risk' needs cost_max, an upper bound on one problem's cost")
        cost_max = check_number(cost_max, "cost_max")
    # a gate that cannot be recorded fails now
    gate_specs = tuple(gate_spec_of(g).to_json() for g in cascade.gates)
    if budgets is None:
        if budget is None:
            raise ConfigError("give budget= or budgets=")
        budgets = [budget]
    if isinstance(budgets, (str, bytes)):
        raise ConfigError(f"budgets must be a list of numbers, got {budgets!r}")
    if any(b is None for b in budgets):
        raise ConfigError("budgets must be numbers (a calibrated budget cannot be None), "
                          f"got {list(budgets)}")
    budgets = sorted(check_budget(b) for b in budgets)
    n_gates = len(cascade.gates)
    if candidates is None:
        grid = sorted(set(float(t) for t in (thresholds or default_thresholds())), reverse=True)
        candidates = [(t,) * n_gates for t in grid]
    candidates = [tuple(float(t) for t in c) for c in candidates]
    if not candidates or any(len(c) != n_gates for c in candidates):
        raise ConfigError(f"candidates must be non-empty threshold vectors of length {n_gates}")
    if paths is None:
        paths = _default_paths(candidates)
    else:
        paths = [np.asarray(p, dtype=np.intp) for p in paths]
        if not paths or any(p.ndim != 1 or p.size == 0 or p.min() < 0 or p.max() >= len(candidates)
                            for p in paths):
            raise ConfigError(f"paths must be non-empty lists of candidate indices in "
                              f"[0, {len(candidates) - 1}]")
    if swept is None:
        swept = sweep(cascade, problems, candidates, progress=progress)
    threshold_array = np.array(candidates)[:, 0] if n_gates == 1 else np.array(candidates)
    objective_values = _objective_values(objective, swept)
    entries = []
    for b in budgets:
        try:
            selection = _select(method, swept.costs, b, alpha, delta, paths, cost_max, threshold_array)
            certified = list(selection.certified)
            best = cal.choose_by_objective(selection, objective_values, maximize=True)
            entries.append({"budget": b, "index": int(best), "thresholds": list(candidates[best]),
                            "certified": certified, "statement": selection.at(best).statement(),
                            "reason": "",
                            # the expected accuracy proxy: agreement with the top tier's answers
                            "agreement": float(swept.agreement[:, best].mean()),
                            "mean_cost": float(swept.costs[:, best].mean())})
        except cal.CalibrationError as error:
            if len(budgets) == 1:
                raise certification_error(error) from error
            entries.append({"budget": b, "index": None, "thresholds": None, "certified": [],
                            "statement": "", "reason": str(error)})
    q = min(len(problems), math.ceil((len(problems) + 1) * (1 - alpha)))
    curves = {
        "thresholds": [list(c) for c in candidates],
        "paths": [[int(i) for i in p] for p in paths],
        "cost_quantile": [float(np.sort(swept.costs[:, j])[q - 1]) for j in range(len(candidates))],
        "mean_cost": swept.costs.mean(axis=0).tolist(),
        "escalation_rate": swept.escalation.mean(axis=0).tolist(),
        "agreement": swept.agreement.mean(axis=0).tolist(),
    }
    if labels is not None:
        curves["accuracy"] = [float(np.mean([a is not None and a == y
                                             for a, y in zip(col, labels, strict=False)]))
                              for col in zip(*swept.answers, strict=False)]
    return Calibration(
        gate_specs=gate_specs,
        models=tuple({"name": m.info.name, "fingerprint": m.info.fingerprint} for m in cascade.models),
        alpha=alpha, delta=delta, n=len(problems), method=method, objective=objective,
        candidates=tuple(candidates), entries=tuple(entries), curves=curves,
        sweep_stats={"executed_tokens": swept.executed_tokens,
                     "independent_tokens": swept.independent_tokens, "seconds": swept.seconds},
    )
