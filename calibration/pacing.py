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
dearest setting cannot spend is dropped, which only lowers the mean cost.

Guarantee (deterministic, for ANY sequence of requests, no exchangeability): after n
requests with costs c_1..c_n,

    sum_i (c_i - B) = (B / step) * (start - position_n - dropped) <= (B / step) * (start - position_n),

so the mean cost is at most B + B * (start - position_n) / (step * n): at most B whenever the
position is at or above where it started, and otherwise over B by at most the debt the pacer
holds, divided by n. `bound()` returns it, so a caller can always report what was promised and that it
held. A priori: if no request at the cheapest setting costs more than B, and none at all
more than a cap C, the debt never passes step * (C - B) / B, so the mean cost of any n
requests is at most B + (B * start / step + C - B) / n. Requests in flight (their costs not
yet observed) are outside the sum until they finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from ._common import fmt
from .errors import CalibrationError

__all__ = ["BudgetPacer", "replay_pacer"]


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

    @property
    def index(self) -> int:
        """The setting for the next request."""
        return min(self.n_settings - 1, max(0, int(math.floor(self.position))))

    def observe(self, cost: float) -> None:
        """Record a finished request's cost (cost units, >= 0)."""
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
            raise CalibrationError(f"cost must be finite and >= 0, got {cost!r}")
        moved = self.position + self.step * (self.budget - cost) / self.budget
        self.position = min(float(self.n_settings - 1), moved)  # below 0: a debt, kept
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


def replay_pacer(costs: ArrayLike, budget: float, *, step: float = 2.0, start: float = 0.0,
                 order: ArrayLike | None = None) -> tuple[np.ndarray, BudgetPacer]:
    """Serve recorded requests through a fresh pacer: what it would have done.

    costs: (n requests, K settings), each request's cost at each setting, cheapest setting
    first (e.g. a sweep's columns of one family). order: the order requests arrive in
    (default: row order). Returns the setting each request (by row) ran at, and the pacer
    after the last one (its `mean_cost`, `bound()`).
    """
    arr = np.asarray(costs, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CalibrationError(f"costs must be a non-empty (n, K) array, got shape {arr.shape}")
    rows = np.arange(arr.shape[0]) if order is None else np.asarray(order, dtype=np.intp)
    if rows.shape != (arr.shape[0],) or not np.array_equal(np.sort(rows), np.arange(arr.shape[0])):
        raise CalibrationError(f"order must be a permutation of the {arr.shape[0]} rows")
    pacer = BudgetPacer(arr.shape[1], budget, step=step, start=start)
    chosen = np.full(arr.shape[0], -1, dtype=np.intp)
    for i in rows:
        chosen[i] = pacer.index
        pacer.observe(float(arr[i, chosen[i]]))
    return chosen, pacer
