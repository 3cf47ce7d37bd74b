"""Conformal risk control of the EXPECTED per-problem cost.

Reference: A. N. Angelopoulos, S. Bates, A. Fisch, L. Lei, T. Schuster,
"Conformal Risk Control" (2022).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._common import (
    ceil_tol,
    check_budget,
    check_costs,
    check_nonnegative,
    check_order,
    check_thresholds,
    describe_threshold,
    fmt,
    leading_true,
    scatter,
)
from .errors import CalibrationError, InfeasibleBudgetError, InsufficientDataError
from .selection import RISK_CONTROL, Selection

__all__ = ["risk_control_bound", "select_risk_control"]


def risk_control_bound(costs: ArrayLike, cost_max: float) -> np.ndarray:
    """Conformal risk control bound per candidate: (n/(n+1)) * mean + cost_max/(n+1).

    Args:
        costs: float array, shape (n_problems, n_thresholds), each in [0, cost_max].
        cost_max: upper bound on any problem's cost (cost units).

    Returns:
        float array, shape (n_thresholds,), cost units.

    Guarantee: for exchangeable problems and costs monotone along the
    candidate order, selecting the most escalating candidate with bound <= B
    gives E[cost_test] <= B (see :func:`select_risk_control`).

    Reference: Angelopoulos et al., "Conformal Risk Control" (2022), Thm. 1.
    """
    arr = check_costs(costs)
    n = arr.shape[0]
    return n / (n + 1) * arr.mean(axis=0) + float(cost_max) / (n + 1)


def _check_bounded(arr: np.ndarray, cost_max: float) -> None:
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > cost_max:
        raise CalibrationError(
            f"costs must lie in [0, cost_max={fmt(cost_max)}], got range [{fmt(lo)}, {fmt(hi)}]"
        )


def _check_enough(n: int, budget: float, cost_max: float) -> None:
    """The bound is >= cost_max/(n+1) for nonnegative costs."""
    if cost_max / (n + 1) <= budget:
        return
    if budget == 0.0:
        raise InfeasibleBudgetError(
            f"budget 0 cannot be certified for E[cost] with cost_max={fmt(cost_max)} > 0 at any n"
        )
    raise InsufficientDataError(
        f"n={n} calibration problems cannot certify E[cost] <= {fmt(budget)} with "
        f"cost_max={fmt(cost_max)}: the bound is at least cost_max/(n+1) = {fmt(cost_max / (n + 1))}; "
        f"need n >= ceil(cost_max/budget) - 1 = {max(1, ceil_tol(cost_max / budget) - 1)}"
    )


def select_risk_control(
    costs: ArrayLike,
    budget: float,
    order: ArrayLike,
    cost_max: float,
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Most escalating threshold whose conformal risk bound on E[cost] fits the budget.

    Walks ``order`` (cheapest first) while
    (n/(n+1)) * mean_i cost_ij + cost_max/(n+1) <= budget and stops at the
    first candidate where it fails; returns the last candidate of that prefix.
    The budget B plays the role of the risk level (there is no alpha).

    Args:
        costs: float array, shape (n_problems, n_thresholds), cost units,
            each entry in [0, cost_max].
        budget: bound B >= 0 on the expected per-problem cost, same units.
        order: int array of candidate indices, cheapest first.
        cost_max: upper bound on any problem's cost at any candidate (e.g. the
            cost of a problem that hits the step limit with every step
            escalated). Must hold for test problems too.
        thresholds: optional values, shape (n_thresholds,), for reporting.

    Returns:
        Selection with ``certified`` = feasible prefix, ``statistics`` = the
        bound per candidate in ``order``.

    Guarantee: if calibration and test problems are exchangeable, costs lie
    in [0, cost_max], and every problem's cost is nondecreasing along
    ``order``, then E[cost_test(lambda_hat)] <= B (expectation over
    calibration and test problems). This bounds the mean, not the tail: use
    :func:`select_conformal` or :func:`select_ltt` for P(cost > B).

    Raises:
        InfeasibleBudgetError: the cheapest candidate's bound exceeds B.
        InsufficientDataError: cost_max/(n+1) > B, so no data could succeed
            (the message states the minimum n).
        CalibrationError: invalid inputs or costs outside [0, cost_max].

    Reference: Angelopoulos et al., "Conformal Risk Control" (2022), Thm. 1.
    """
    arr = check_costs(costs)
    budget = check_budget(budget)
    cost_max = check_nonnegative("cost_max", cost_max)
    idx = check_order(order, arr.shape[1])
    thr = check_thresholds(thresholds, arr.shape[1])
    _check_bounded(arr, cost_max)
    n, m = arr.shape
    _check_enough(n, budget, cost_max)
    bounds = risk_control_bound(arr[:, idx], cost_max)
    n_ok = leading_true(bounds <= budget)
    if n_ok == 0:
        raise InfeasibleBudgetError(
            f"no threshold keeps E[cost] <= {fmt(budget)}: the cheapest threshold's conformal risk "
            f"bound (n/(n+1))*mean + cost_max/(n+1) is {fmt(bounds[0])} "
            f"({describe_threshold(int(idx[0]), thr)}, n={n}, cost_max={fmt(cost_max)})"
        )
    certified = tuple(int(i) for i in idx[:n_ok])
    return Selection(
        index=certified[-1],
        certified=certified,
        order=tuple(int(i) for i in idx),
        method=RISK_CONTROL,
        budget=budget,
        n=n,
        alpha=None,
        delta=None,
        p_values=(float("nan"),) * m,
        statistics=scatter(idx, bounds, m),
        statistic_name="conformal risk control bound on E[cost]",
        thresholds=thr,
        cost_max=cost_max,
    )
