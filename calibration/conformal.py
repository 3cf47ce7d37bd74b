"""Split-conformal quantiles and budget-feasible threshold selection.

Reference: V. Vovk, A. Gammerman, G. Shafer, "Algorithmic Learning in a Random
World" (2005); A. N. Angelopoulos and S. Bates, "A Gentle Introduction to
Conformal Prediction and Distribution-Free Uncertainty Quantification" (2021).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._common import (
    Threshold,
    ceil_tol,
    check_budget,
    check_costs,
    check_finite_array,
    check_order,
    check_probability,
    check_thresholds,
    describe_threshold,
    fmt,
    leading_true,
    scatter,
)
from .errors import InfeasibleBudgetError, InsufficientDataError
from .selection import SPLIT_CONFORMAL, Selection

__all__ = ["min_n_conformal", "conformal_quantile", "select_conformal"]


def _rank(n: int, alpha: float) -> int:
    """1-based rank ceil((n + 1)(1 - alpha)) of the split-conformal quantile."""
    return ceil_tol((n + 1) * (1.0 - alpha))


def min_n_conformal(alpha: float) -> int:
    """Smallest n with ceil((n + 1)(1 - alpha)) <= n, i.e. ceil(1/alpha) - 1.

    Below it the split-conformal (1 - alpha) quantile is +inf, so no finite
    bound with coverage >= 1 - alpha exists for exchangeable scores. ``alpha``
    in (0, 1); returns a number of calibration problems.

    Reference: Angelopoulos & Bates, "A Gentle Introduction to Conformal
    Prediction" (2021), Sec. 1.
    """
    alpha = check_probability("alpha", alpha)
    return max(1, ceil_tol((1.0 - alpha) / alpha))


def _upper_quantiles(values: np.ndarray, alpha: float) -> np.ndarray:
    """Column-wise split-conformal quantiles of ``values`` (n, m) -> (m,)."""
    n = values.shape[0]
    k = _rank(n, alpha)
    if k > n:
        raise InsufficientDataError(
            f"n={n} calibration problems are too few for alpha={fmt(alpha)}: the conformal "
            f"quantile would be +inf; need n >= ceil(1/alpha) - 1 = {min_n_conformal(alpha)}"
        )
    return np.partition(values, k - 1, axis=0)[k - 1]


def conformal_quantile(scores: ArrayLike, alpha: float) -> float:
    """Split-conformal upper quantile: the ceil((n+1)(1-alpha))-th smallest score.

    Args:
        scores: float array, shape (n,), any units (e.g. per-problem cost).
        alpha: miscoverage level in (0, 1).

    Returns:
        q (same units as ``scores``), always finite.

    Guarantee: if the n calibration scores and a test score S_test are
    exchangeable, P(S_test <= q) >= 1 - alpha (marginally over calibration and
    test); with continuous (tie-free) scores also <= 1 - alpha + 1/(n + 1).

    Raises:
        InsufficientDataError: if ceil((n+1)(1-alpha)) > n (q would be +inf);
            the message states the minimum n = ceil(1/alpha) - 1.
        CalibrationError: empty/non-finite scores or alpha outside (0, 1).

    Reference: Vovk et al. (2005); Angelopoulos & Bates, "A Gentle
    Introduction to Conformal Prediction" (2021), Sec. 1.
    """
    alpha = check_probability("alpha", alpha)
    arr = check_finite_array("scores", scores, ndim=1)
    return float(_upper_quantiles(arr[:, None], alpha)[0])


def select_conformal(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    order: ArrayLike,
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Most escalating threshold whose conformal cost quantile fits the budget.

    Walks ``order`` (cheapest first) while the split-conformal (1 - alpha)
    quantile of the calibration costs is <= ``budget`` and stops at the first
    threshold where it is not. Under monotonicity the feasible set is exactly
    this prefix; the last threshold of the prefix is returned.

    Args:
        costs: float array, shape (n_problems, n_thresholds): cost of problem
            i with the gate at thresholds[j] (cost units, e.g. tokens or $).
        budget: per-problem budget B >= 0, same units as ``costs``.
        alpha: allowed probability of exceeding the budget, in (0, 1).
        order: int array of candidate indices, cheapest (least escalating)
            first; fixed by the caller, e.g. from the gate's semantics.
        thresholds: optional values, shape (n_thresholds,), for reporting.

    Returns:
        Selection with ``certified`` = the feasible prefix of ``order``,
        ``statistics`` = the conformal quantile per candidate in ``order``.

    Guarantee: if calibration problems and the test problem are exchangeable
    and every problem's cost is nondecreasing along ``order``, then
    P(cost_test(lambda_hat) > B) <= alpha (marginally over calibration and
    test), and the same holds for every threshold in ``certified``.
    Without monotonicity there is no guarantee; use :func:`select_ltt`.

    Raises:
        InfeasibleBudgetError: the cheapest threshold's quantile exceeds B
            (the message states that quantile).
        InsufficientDataError: n < ceil(1/alpha) - 1.
        CalibrationError: invalid inputs.

    Reference: Angelopoulos & Bates, "A Gentle Introduction to Conformal
    Prediction" (2021); Vovk et al. (2005).
    """
    arr = check_costs(costs)
    budget = check_budget(budget)
    alpha = check_probability("alpha", alpha)
    idx = check_order(order, arr.shape[1])
    thr = check_thresholds(thresholds, arr.shape[1])
    quantiles = _upper_quantiles(arr[:, idx], alpha)
    n_ok = leading_true(quantiles <= budget)
    if n_ok == 0:
        raise InfeasibleBudgetError(
            f"no threshold keeps P(cost > {fmt(budget)}) <= {fmt(alpha)}: the cheapest threshold's "
            f"{fmt(1 - alpha)}-conformal cost quantile is {fmt(quantiles[0])} "
            f"({describe_threshold(int(idx[0]), thr)}, n={arr.shape[0]})"
        )
    return _make_selection(arr, idx, n_ok, budget, alpha, quantiles, thr)


def _make_selection(
    arr: np.ndarray,
    idx: np.ndarray,
    n_ok: int,
    budget: float,
    alpha: float,
    quantiles: np.ndarray,
    thr: tuple[Threshold, ...] | None,
) -> Selection:
    m = arr.shape[1]
    certified = tuple(int(i) for i in idx[:n_ok])
    return Selection(
        index=certified[-1],
        certified=certified,
        order=tuple(int(i) for i in idx),
        method=SPLIT_CONFORMAL,
        budget=budget,
        n=arr.shape[0],
        alpha=alpha,
        delta=None,
        p_values=(float("nan"),) * m,
        statistics=scatter(idx, quantiles, m),
        statistic_name=f"{fmt(1 - alpha)}-conformal cost quantile",
        thresholds=thr,
    )
