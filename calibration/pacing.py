"""Online budget pacing: hold the running mean cost of a stream of requests at B.

Conformal risk control certifies E[cost] <= B for problems exchangeable with the calibration
set. Served traffic drifts: on the embedded pair's test split the certified re-solve spends
33 of B = 40 (its problems are easier than the calibration problems), on an independent
generator's problems 46 (harder). A pacer moves along the same ordered settings (cheapest
first, e.g. a gate family's thresholds) as requests finish, in the spirit of adaptive
conformal inference (Gibbs & Candes, 2021):

    position <- clip(position + step * (B - cost) / B, 0, K - 1)

and serves the next request at setting `floor(position)`. Overspending moves it toward
cheaper settings, underspending toward dearer ones.

Guarantee (deterministic, for ANY sequence of requests, no exchangeability): after n
requests with costs c_1..c_n,

    sum_i (c_i - B) = (B / step) * (position_0 - position_n) + sum_i clip_i,

where clip_i is what the clip at 0 added (it only adds, at the cheapest end, when a request
overspent by more than the position could absorb) or the clip at K - 1 removed. Hence

    mean cost <= B + (B * position_0 / step + unabsorbed) / n,

with `unabsorbed` the sum of the lower clips' additions (in cost units), which the pacer
records. It is 0 unless requests at the cheapest settings overspend B; `bound()` returns the
right-hand side, so a caller can always report what was promised and whether it held. With m
requests in flight (their costs not yet observed) the sum gains at most m times the largest
single cost (the hard cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._common import fmt
from .errors import CalibrationError

__all__ = ["BudgetPacer"]


@dataclass
class BudgetPacer:
    """Pace a stream of requests to a mean cost `budget` over `n_settings` ordered settings.

    n_settings: K settings, index 0 the cheapest (e.g. a gate family's thresholds from the
        highest down). budget: B (cost units). step: settings moved per B of over- or
        underspend (larger adapts faster and wanders more). start: the first request's
        setting (a certified index is a good one; 0 gives the tightest bound).
    """

    n_settings: int
    budget: float
    step: float = 2.0
    start: float = 0.0
    position: float = field(init=False)
    n: int = field(default=0, init=False)
    total_cost: float = field(default=0.0, init=False)
    unabsorbed: float = field(default=0.0, init=False)  # cost units the lower clip let through

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
        return min(self.n_settings - 1, int(math.floor(self.position)))

    def observe(self, cost: float) -> None:
        """Record a finished request's cost (cost units, >= 0)."""
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
            raise CalibrationError(f"cost must be finite and >= 0, got {cost!r}")
        moved = self.position + self.step * (self.budget - cost) / self.budget
        if moved < 0:
            # The clip at 0 adds -moved positions: cost the pacer could not answer for.
            self.unabsorbed += -moved * self.budget / self.step
        self.position = min(float(self.n_settings - 1), max(0.0, moved))
        self.n += 1
        self.total_cost += float(cost)

    @property
    def mean_cost(self) -> float:
        return self.total_cost / self.n if self.n else 0.0

    def bound(self) -> float:
        """The guaranteed ceiling on the mean cost of the requests observed so far."""
        if not self.n:
            return math.inf
        return self.budget + (self.budget * self.start / self.step + self.unabsorbed) / self.n

    def statement(self) -> str:
        return (f"mean cost over the {self.n} requests so far <= {fmt(self.bound())} "
                f"(B = {fmt(self.budget)}; paced, any order of requests)")
