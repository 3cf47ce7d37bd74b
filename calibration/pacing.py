"""Online budget pacing: hold the running mean cost of a stream of requests at B.

Conformal risk control certifies E[cost] <= B for problems exchangeable with the calibration
set. Served traffic drifts: on the embedded pair's test split the certified re-solve spends
33 of B = 40 (its problems are easier than the calibration problems), on an independent
generator's problems 46 (harder). A pacer moves along the same ordered settings (cheapest
first, e.g. a gate family's thresholds) as requests finish, in the spirit of adaptive
conformal inference (Gibbs & Candes, 2021):

    position <- min(position + step * (B - cost) / B, K - 1)

and serves the next request at setting `floor(position)` clamped to [0, K - 1].
Overspending moves it toward cheaper settings, underspending toward dearer ones. Below 0
the position is a debt: the pacer stays at the cheapest setting until cheaper requests have
paid back what dearer ones overspent (forgiving it would let the mean cost settle above B
whenever one request can cost several B). Above K - 1 nothing is kept: a credit the
dearest setting cannot spend is dropped, which only lowers the mean cost (with requests
running, the limit is raised by what they hold the position down; see the last paragraph).

Guarantee (deterministic, for ANY sequence of requests, no exchangeability): after n
requests with costs c_1..c_n,

    sum_i (c_i - B) = (B / step) * (start - position_n - dropped) <= (B / step) * (start - position_n),

so the mean cost is at most B + B * (start - position_n) / (step * n): at most B whenever the
position is at or above where it started, and otherwise over B by at most the debt the pacer
holds, divided by n. `bound()` returns it, so a caller can always report what was promised and that it
held. A priori: if no request at the cheapest setting costs more than B, and none at all
more than a cap C, the debt never passes step * (C - B) / B, so the mean cost of any n
requests is at most B + (B * start / step + C - B) / n. Requests in flight (their costs not
yet observed) are outside the sum until they finish; a state kept with `to_json` records what
each has spent so far, and `from_json` charges it if the process stopped before they finished.

Concurrent requests (`begin` / `spend` / `observe(cost, ticket)`): under load the pacer hears
of a request only when it finishes, and cheap requests finish first, so a pacer that waits
for finished costs sees underspending that the dear requests still running will undo, and
serves the next ones too dear (the embedded pair's re-solve at B = 40.3, 64 clients: mean
cost 44.5 over streams of 600 requests in a replay, `runs/pacing_probe.py`). The setting of
the next request is therefore chosen from the settled position plus each running request's
expected contribution step * (B - f) / B, where f is
its expected final cost given what it has spent so far: the mean of the recent finished
costs at its setting that exceed that spend (a request still running after spending s is
one of the dear ones), or, with none of those, the larger of the spend and B (no
information: neutral). Under steady load the running requests are the long, dear ones, so
they hold the position down for good; the credit that offsets them is kept above the
dearest setting rather than dropped (else the pacer would underspend for good). Only the
choice of setting and how much credit is dropped depend on estimates: the identity holds
with `dropped` >= 0 whatever they are, so the ceiling is that of finished requests, unchanged.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from ._common import fmt
from .errors import CalibrationError

__all__ = ["BudgetPacer", "replay_pacer"]

RECENT_COSTS = 256  # finished costs kept per setting for in-flight estimates: recent enough to follow drift


@dataclass
class BudgetPacer:
    """Pace a stream of requests to a mean cost `budget` over `n_settings` ordered settings.

    n_settings: K settings, index 0 the cheapest (e.g. a gate family's thresholds from the
        highest down). budget: B (cost units). step: settings moved per B of over- or
        underspend (larger adapts faster and wanders more). start: the first request's
        setting (a certified index is a good one).
    """

    n_settings: int
    budget: float
    step: float = 2.0
    start: float = 0.0
    position: float = field(init=False)
    n: int = field(default=0, init=False)
    total_cost: float = field(default=0.0, init=False)
    # ticket -> [setting, spent so far]: requests begun and not yet observed
    running: dict[int, list] = field(default_factory=dict, init=False, repr=False, compare=False)
    _recent: list[deque] = field(default_factory=list, init=False, repr=False, compare=False)
    _tickets: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.n_settings, int) and self.n_settings >= 1):
            raise CalibrationError(f"n_settings must be an int >= 1, got {self.n_settings!r}")
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and self.budget > 0):
            raise CalibrationError(f"budget must be finite and > 0, got {self.budget!r}")
        if not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and self.step > 0):
            raise CalibrationError(f"step must be finite and > 0, got {self.step!r}")
        if not (isinstance(self.start, (int, float)) and 0 <= self.start <= self.n_settings - 1):
            raise CalibrationError(f"start must lie in [0, {self.n_settings - 1}], got {self.start!r}")
        self.position = float(self.start)
        self._recent = [deque(maxlen=RECENT_COSTS) for _ in range(self.n_settings)]

    @property
    def index(self) -> int:
        """The setting for the next request: the settled position moved by what the requests
        still running are expected to spend (module docstring)."""
        planned = min(float(self.n_settings - 1), self.position + self.in_flight_shift())
        return min(self.n_settings - 1, max(0, int(math.floor(planned))))

    def expected_cost(self, setting: int, spent: float) -> float:
        """A running request's expected final cost at `setting` after spending `spent`."""
        dearer = [c for c in self._recent[setting] if c > spent]
        return math.fsum(dearer) / len(dearer) if dearer else max(spent, self.budget)

    def in_flight_shift(self) -> float:
        """The running requests' expected move of the position (0 when none is running)."""
        return math.fsum(self.step * (self.budget - self.expected_cost(setting, spent)) / self.budget
                         for setting, spent in self.running.values())

    def begin(self) -> tuple[int, int]:
        """Start a request at the current setting: (ticket, setting). Pass the ticket to
        `spend` as it runs and to `observe` when it ends (however it ends)."""
        setting = self.index
        self._tickets += 1
        self.running[self._tickets] = [setting, 0.0]
        return self._tickets, setting

    def spend(self, ticket: int, spent: float) -> None:
        """A running request has spent `spent` so far (cost units, its total, not an increment)."""
        if ticket not in self.running:
            raise CalibrationError(f"no running request with ticket {ticket!r}")
        self.running[ticket][1] = max(self.running[ticket][1], float(spent))

    def observe(self, cost: float, ticket: int | None = None) -> None:
        """Record a finished request's cost (cost units, >= 0); `ticket`: the one `begin` gave it."""
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
            raise CalibrationError(f"cost must be finite and >= 0, got {cost!r}")
        if ticket is not None:
            if ticket not in self.running:
                raise CalibrationError(f"no running request with ticket {ticket!r}")
            self._recent[self.running.pop(ticket)[0]].append(float(cost))
        moved = self.position + self.step * (self.budget - cost) / self.budget
        # Credit the dearest setting cannot spend is dropped (below 0: a debt, kept); what
        # offsets the running requests' expected spend is not (module docstring).
        ceiling = self.n_settings - 1 + max(0.0, -self.in_flight_shift())
        self.position = min(ceiling, moved)
        self.n += 1
        self.total_cost += float(cost)

    @property
    def mean_cost(self) -> float:
        """Mean cost of the requests observed so far (0 before the first)."""
        return self.total_cost / self.n if self.n else 0.0

    def bound(self) -> float:
        """The guaranteed ceiling on the mean cost of the requests observed so far."""
        if not self.n:
            return math.inf
        return self.budget + self.budget * (self.start - self.position) / (self.step * self.n)

    def statement(self) -> str:
        """The ceiling in words, for logs and reports."""
        return (f"mean cost over the {self.n} requests so far <= {fmt(self.bound())} "
                f"(B = {fmt(self.budget)}; paced, any order of requests)")

    def to_json(self) -> dict:
        """What the ceiling rests on, as plain JSON: the settings, the position, the requests
        observed and what each request still running has spent (the recent costs, estimates
        only, are not kept)."""
        return {"n_settings": self.n_settings, "budget": self.budget, "step": self.step, "start": self.start,
                "position": self.position, "n": self.n, "total_cost": self.total_cost,
                "running": [[setting, spent] for setting, spent in self.running.values()]}

    @classmethod
    def from_json(cls, payload: object) -> BudgetPacer:
        """A pacer resumed from `to_json`: it goes on as if it had never stopped, except that
        the requests running when the state was kept ended with the process that ran them:
        each is charged what it had spent (one that had spent nothing is not counted), so that
        a crash cannot take spent cost out of the ceiling's count. A state kept before
        running requests were recorded (no "running" key) resumes with none."""
        keys = ("n_settings", "budget", "step", "start", "position", "n", "total_cost")
        if not isinstance(payload, dict) or set(payload) - {"running"} != set(keys):
            raise CalibrationError(f"a pacer's state is a JSON object with the keys {list(keys)} "
                                   "and optionally 'running'")
        pacer = cls(payload["n_settings"], payload["budget"], step=payload["step"], start=payload["start"])
        position, n, total = payload["position"], payload["n"], payload["total_cost"]
        if isinstance(position, bool) or not (isinstance(position, (int, float)) and math.isfinite(position)):
            raise CalibrationError(f"position must be a finite number, got {position!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CalibrationError(f"n must be an integer >= 0, got {n!r}")
        if not (isinstance(total, (int, float)) and math.isfinite(total) and total >= 0):
            raise CalibrationError(f"total_cost must be finite and >= 0, got {total!r}")
        running = payload.get("running", [])
        if not isinstance(running, list) or not all(_is_running_entry(e, pacer.n_settings) for e in running):
            raise CalibrationError(f"running must be a list of [setting in 0..{pacer.n_settings - 1}, "
                                   f"spent >= 0] pairs, got {running!r}"[:300])
        pacer.position, pacer.n, pacer.total_cost = float(position), n, float(total)
        for _, spent in running:
            if spent > 0:
                pacer.observe(float(spent))
        return pacer


def _is_running_entry(entry: object, n_settings: int) -> bool:
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
            and not isinstance(entry[0], bool) and 0 <= entry[0] < n_settings
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
            and math.isfinite(entry[1]) and entry[1] >= 0)


def replay_pacer(costs: ArrayLike, budget: float, *, step: float = 2.0, start: float = 0.0,
                 order: ArrayLike | None = None, concurrency: int = 1, durations: ArrayLike | None = None,
                 account_in_flight: bool = True) -> tuple[np.ndarray, BudgetPacer]:
    """Serve recorded requests through a fresh pacer: what it would have done.

    costs: (n requests, K settings), each request's cost at each setting, cheapest setting
    first (e.g. a sweep's columns of one family). order: the order requests arrive in
    (default: row order). concurrency: requests running at once (closed loop: the next one
    starts when one finishes); each runs for durations[i, k] (default: its cost, i.e. time
    proportional to cost) and spends at an even rate meanwhile, which the pacer is told
    before each start (`spend`) unless account_in_flight is False (then it only hears of
    finished requests). Returns the setting each request (by row) ran at, and the pacer after
    the last one (its `mean_cost`, `bound()`).
    """
    arr = np.asarray(costs, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CalibrationError(f"costs must be a non-empty (n, K) array, got shape {arr.shape}")
    rows = np.arange(arr.shape[0]) if order is None else np.asarray(order, dtype=np.intp)
    if rows.shape != (arr.shape[0],) or not np.array_equal(np.sort(rows), np.arange(arr.shape[0])):
        raise CalibrationError(f"order must be a permutation of the {arr.shape[0]} rows")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise CalibrationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    times = arr if durations is None else np.asarray(durations, dtype=float)
    if times.shape != arr.shape or not np.all(np.isfinite(times)) or np.any(times < 0):
        raise CalibrationError(f"durations must be finite, >= 0 and shaped like costs {arr.shape}")
    pacer = BudgetPacer(arr.shape[1], budget, step=step, start=start)
    chosen = np.full(arr.shape[0], -1, dtype=np.intp)
    running: list[tuple[float, int, int, float, int | None]] = []  # (end, arrival, row, began, ticket)
    now = 0.0

    def finish_next() -> float:
        end, _, row, _, ticket = heapq.heappop(running)
        pacer.observe(float(arr[row, chosen[row]]), ticket)
        return end

    for arrival, i in enumerate(rows):
        if len(running) == concurrency:
            now = finish_next()  # closed loop: the next request starts when one finishes
        if account_in_flight:
            for _, _, j, began, ticket in running:  # what each running request has spent by now
                length = times[j, chosen[j]]
                done = 1.0 if length == 0 else min(1.0, (now - began) / length)
                pacer.spend(ticket, float(arr[j, chosen[j]]) * done)
            ticket, chosen[i] = pacer.begin()
        else:
            ticket, chosen[i] = None, pacer.index
        heapq.heappush(running, (now + float(times[i, chosen[i]]), arrival, int(i), now, ticket))
    while running:
        finish_next()
    return chosen, pacer
