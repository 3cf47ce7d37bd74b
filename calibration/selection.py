"""The :class:`Selection` result, the label-free objective chooser and the
cheapest-first ordering helper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._common import Threshold, check_costs, describe_threshold, fmt
from .errors import CalibrationError

__all__ = ["Selection", "choose_by_objective", "order_by_mean_cost"]

SPLIT_CONFORMAL = "split_conformal"
LTT_FIXED_SEQUENCE = "ltt_fixed_sequence"
LTT_BONFERRONI = "ltt_bonferroni"
LTT_PATHS = "ltt_paths"  # fixed sequence along several paths, Bonferroni over paths
RISK_CONTROL = "conformal_risk_control"

_PVALUE_NAMES = {"binomial": "binomial", "hoeffding_bentkus": "Hoeffding-Bentkus"}


@dataclass(frozen=True)
class Selection:
    """Outcome of a threshold calibration.

    Fields:
        index: chosen candidate index (a column of ``costs``).
        certified: certified/feasible candidate indices, in the order they were
            ranked (cheapest first for ordered methods). The guarantee of
            ``method`` holds at every one of them, so any certified index may be
            used instead of ``index`` (see :func:`choose_by_objective`).
        order: the candidate indices that were considered, cheapest first.
        method: ``"split_conformal"``, ``"ltt_fixed_sequence"``,
            ``"ltt_bonferroni"``, ``"ltt_paths"`` or ``"conformal_risk_control"``.
        budget: the cost budget B (same units as ``costs``).
        n: number of calibration problems.
        alpha: violation level for P(cost > B) (None for risk control).
        delta: LTT error level (None for conformal methods).
        p_values: per candidate (length n_thresholds), NaN where untested.
        statistics: per candidate (length n_thresholds), the statistic the
            method compared with its bound (``statistic_name``), NaN where not
            computed.
        statistic_name: what ``statistics`` holds.
        thresholds: threshold values per candidate (floats, or tuples for
            N-tier threshold vectors), or None if the caller gave none.
        pvalue: LTT p-value family (``"binomial"``/``"hoeffding_bentkus"``).
        cost_max: cost upper bound used by conformal risk control.
    """

    index: int
    certified: tuple[int, ...]
    order: tuple[int, ...]
    method: str
    budget: float
    n: int
    alpha: float | None
    delta: float | None
    p_values: tuple[float, ...]
    statistics: tuple[float, ...]
    statistic_name: str
    thresholds: tuple[Threshold, ...] | None = None
    pvalue: str | None = None
    cost_max: float | None = None

    def __post_init__(self) -> None:
        if self.index not in self.certified:
            raise CalibrationError(f"index {self.index} is not certified (certified: {self.certified})")

    @property
    def n_thresholds(self) -> int:
        """Number of candidates (columns of the calibrated ``costs``)."""
        return len(self.p_values)

    @property
    def threshold(self) -> Threshold | None:
        """Threshold value (or vector) at ``index``; None if no thresholds were given."""
        return None if self.thresholds is None else self.thresholds[self.index]

    @property
    def certified_mask(self) -> np.ndarray:
        """Boolean array, shape (n_thresholds,): True at certified candidates."""
        mask = np.zeros(self.n_thresholds, dtype=bool)
        mask[list(self.certified)] = True
        return mask

    def at(self, index: int) -> Selection:
        """The same selection with another certified candidate chosen.

        Raises CalibrationError if ``index`` is not certified."""
        return dataclasses.replace(self, index=int(index))

    def statement(self) -> str:
        """Human-readable guarantee at the chosen candidate."""
        thr = describe_threshold(self.index, self.thresholds)
        b = fmt(self.budget)
        if self.method == SPLIT_CONFORMAL:
            return (
                f"Marginally over {self.n} exchangeable calibration problems and a new problem, "
                f"P(cost > {b}) <= {fmt(self.alpha)} at {thr} "
                "(split conformal; assumes cost is nondecreasing along the candidate order)"
            )
        if self.method == RISK_CONTROL:
            return (
                f"Marginally over {self.n} exchangeable calibration problems and a new problem, "
                f"E[cost] <= {b} at {thr} (conformal risk control with cost_max={fmt(self.cost_max)}; "
                "assumes cost is nondecreasing along the candidate order)"
            )
        head = (
            f"With probability >= {fmt(1.0 - self.delta)} over the {self.n} calibration problems, "
            f"P(cost > {b}) <= {fmt(self.alpha)}"
        )
        pv = _PVALUE_NAMES.get(self.pvalue, self.pvalue)
        if self.method == LTT_PATHS:
            return (
                f"{head} simultaneously at all {len(self.certified)} certified candidates, including {thr} "
                f"(Learn-then-Test, fixed-sequence along paths through the threshold grid, "
                f"Bonferroni over paths, {pv} p-values)"
            )
        if self.method == LTT_BONFERRONI:
            return (
                f"{head} simultaneously at all {len(self.certified)} certified candidates, including {thr} "
                f"(Learn-then-Test, Bonferroni over {len(self.order)} candidates, {pv} p-values)"
            )
        return f"{head} at {thr} (Learn-then-Test, fixed-sequence, {pv} p-values)"


def choose_by_objective(selection: Selection, objective: ArrayLike, maximize: bool = True) -> int:
    """Certified candidate index that maximizes (or minimizes) a label-free objective.

    Args:
        selection: result of any ``select_*`` function.
        objective: float array, shape (n_thresholds,): one value per candidate,
            e.g. agreement with the large model's answer or escalation rate,
            computed without labels. Must be finite at certified candidates.
        maximize: maximize (default) or minimize the objective.

    Returns:
        The best index among ``selection.certified``; ties go to the cheaper
        candidate (earlier in ``selection.certified``). Use
        ``selection.at(index)`` for the matching Selection/statement.

    Guarantee: the guarantee of ``selection.method`` holds simultaneously at
    every certified candidate (LTT controls the family-wise error over the
    certified set; for the conformal methods, under the stated monotonicity,
    every candidate earlier in the order costs no more than the chosen one), so
    choosing among them with data-dependent, label-free criteria keeps it.

    Reference: Angelopoulos et al., "Learn then Test" (2021) (FWER over the
    certified set); Angelopoulos et al., "Conformal Risk Control" (2022).
    """
    obj = np.asarray(objective, dtype=float)
    if obj.shape != (selection.n_thresholds,):
        raise CalibrationError(
            f"objective must have shape ({selection.n_thresholds},), got shape {obj.shape}"
        )
    values = obj[list(selection.certified)]
    if not np.isfinite(values).all():
        raise CalibrationError(f"objective must be finite at certified candidates, got {values.tolist()}")
    best = int(np.argmax(values) if maximize else np.argmin(values))  # first optimum = cheapest
    return selection.certified[best]


def order_by_mean_cost(costs: ArrayLike) -> np.ndarray:
    """Candidate indices sorted by ascending mean cost (stable: ties keep index order).

    Args:
        costs: float array, shape (n_problems, n_thresholds), cost units.

    Returns:
        int array, shape (n_thresholds,), cheapest first.

    Caution: the LTT fixed-sequence guarantee requires the order to be fixed
    before seeing the calibration data. Compute this order on separate
    problems (a pilot split), not on the calibration set passed to
    ``select_ltt``. The conformal methods only need the order to make cost
    monotone, which a data-driven order does not guarantee either.
    """
    arr = check_costs(costs)
    return np.argsort(arr.mean(axis=0), kind="stable")
