"""Learn-then-Test: thresholds certified by multiple testing of
H0_j: P(cost(lambda_j) > B) > alpha.

References: A. N. Angelopoulos, S. Bates, E. J. Candes, M. I. Jordan, L. Lei,
"Learn then Test: Calibrating Predictive Algorithms to Achieve Risk Control"
(2021); S. Bates, A. Angelopoulos, L. Lei, J. Malik, M. I. Jordan,
"Distribution-Free, Risk-Controlling Prediction Sets" (RCPS, 2021) for the
Hoeffding-Bentkus p-value.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from ._common import (
    ceil_tol,
    check_budget,
    check_costs,
    check_order,
    check_probability,
    check_thresholds,
    describe_threshold,
    fmt,
    leading_true,
    scatter,
)
from .errors import CalibrationError, InfeasibleBudgetError, InsufficientDataError
from .selection import LTT_BONFERRONI, LTT_FIXED_SEQUENCE, Selection

__all__ = [
    "PValueMethod",
    "ltt_pvalues",
    "min_n_ltt",
    "select_ltt",
    "select_ltt_path",
    "bonferroni_ltt",
]

PValueMethod = Literal["binomial", "hoeffding_bentkus"]
_METHODS = ("binomial", "hoeffding_bentkus")


def ltt_pvalues(
    violations: ArrayLike, n: int, alpha: float, method: PValueMethod = "binomial"
) -> np.ndarray:
    """Valid p-values for H0: risk = P(cost > B) > alpha, from violation counts.

    Args:
        violations: int array, any shape: number k of the n calibration
            problems with cost > B (one count per candidate).
        n: number of calibration problems (>= 1).
        alpha: risk level in (0, 1).
        method: ``"binomial"``: exact tail P(Binom(n, alpha) <= k)
            (valid for 0/1 losses, the tightest choice);
            ``"hoeffding_bentkus"``: min(exp(-n h1(min(k/n, alpha), alpha)),
            e * P(Binom(n, alpha) <= k)) with
            h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)) (Bates et al. 2021).

    Returns:
        float array, same shape as ``violations``, values in (0, 1].

    Guarantee: if the n losses are i.i.d. Bernoulli(risk) with risk > alpha,
    then P(p <= u) <= u for all u in [0, 1] (super-uniform under H0).
    """
    alpha = check_probability("alpha", alpha)
    if method not in _METHODS:
        raise CalibrationError(f"pvalue must be one of {_METHODS}, got {method!r}")
    if int(n) != n or n < 1:
        raise CalibrationError(f"n must be a positive integer, got {n!r}")
    k = np.asarray(violations)
    if k.size and (not np.issubdtype(k.dtype, np.integer) or k.min() < 0 or k.max() > n):
        raise CalibrationError(f"violations must be integers in [0, {n}], got {k.tolist()}")
    binom = stats.binom.cdf(k, n, alpha)
    if method == "binomial":
        return np.asarray(binom, dtype=float)
    rhat = np.minimum(k / n, alpha)
    h1 = special.rel_entr(rhat, alpha) + special.rel_entr(1.0 - rhat, 1.0 - alpha)
    return np.minimum(np.minimum(np.exp(-n * h1), math.e * binom), 1.0)


def min_n_ltt(alpha: float, delta: float, pvalue: PValueMethod = "binomial") -> int:
    """Smallest n at which zero violations give a p-value <= delta.

    For both p-value families p(k=0) = (1 - alpha)^n, so this is
    ceil(log(delta) / log(1 - alpha)). Below it LTT can certify nothing
    (for i.i.d. problems no data set would reject H0 at level delta). Use
    ``delta / m`` for Bonferroni over m candidates. Returns a number of
    calibration problems.

    Reference: Angelopoulos et al., "Learn then Test" (2021); Bates et al.,
    RCPS (2021).
    """
    alpha = check_probability("alpha", alpha)
    delta = check_probability("delta", delta)
    n = max(1, ceil_tol(math.log(delta) / math.log1p(-alpha)))
    while n > 1 and ltt_pvalues(0, n - 1, alpha, pvalue) <= delta:  # guard float rounding
        n -= 1
    while ltt_pvalues(0, n, alpha, pvalue) > delta:
        n += 1
    return n


def _check_enough(n: int, alpha: float, level: float, pvalue: PValueMethod, what: str) -> None:
    n_min = min_n_ltt(alpha, level, pvalue)
    if n < n_min:
        raise InsufficientDataError(
            f"n={n} calibration problems cannot certify any threshold at alpha={fmt(alpha)}, "
            f"{what}: even zero violations give p-value (1-alpha)^n = {fmt((1 - alpha) ** n)} > "
            f"{fmt(level)}; need n >= {n_min}"
        )


def _violation_counts(costs: np.ndarray, budget: float) -> np.ndarray:
    """Per-candidate count of problems with cost > budget, shape (n_thresholds,)."""
    return (costs > budget).sum(axis=0)


def _infeasible(
    budget: float, alpha: float, level: float, n: int, k: int, p: float, pvalue: str, who: str, what: str
) -> InfeasibleBudgetError:
    return InfeasibleBudgetError(
        f"no threshold keeps P(cost > {fmt(budget)}) <= {fmt(alpha)} ({what}): {who} has "
        f"empirical violation rate {fmt(k / n)} ({k}/{n}) and "
        f"{pvalue} p-value {fmt(p)} > {fmt(level)}"
    )


def _fixed_sequence(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    delta: float,
    order: ArrayLike,
    pvalue: PValueMethod,
    thresholds: ArrayLike | None,
    allow_vectors: bool,
    order_name: str,
) -> Selection:
    """Shared core of :func:`select_ltt` and :func:`select_ltt_path`."""
    arr = check_costs(costs)
    budget = check_budget(budget)
    alpha = check_probability("alpha", alpha)
    delta = check_probability("delta", delta)
    idx = check_order(order, arr.shape[1], name=order_name)
    thr = check_thresholds(thresholds, arr.shape[1], allow_vectors=allow_vectors)
    n, m = arr.shape
    _check_enough(n, alpha, delta, pvalue, f"delta={fmt(delta)}")
    k = _violation_counts(arr[:, idx], budget)
    p = ltt_pvalues(k, n, alpha, pvalue)
    n_rej = leading_true(p <= delta)
    if n_rej == 0:
        who = f"the cheapest candidate ({describe_threshold(int(idx[0]), thr)})"
        raise _infeasible(budget, alpha, delta, n, int(k[0]), float(p[0]), pvalue, who, f"delta={fmt(delta)}")
    n_tested = min(n_rej + 1, idx.size)  # fixed sequence stops at the first non-rejection
    certified = tuple(int(i) for i in idx[:n_rej])
    return Selection(
        index=certified[-1],
        certified=certified,
        order=tuple(int(i) for i in idx),
        method=LTT_FIXED_SEQUENCE,
        budget=budget,
        n=n,
        alpha=alpha,
        delta=delta,
        p_values=scatter(idx, p[:n_tested], m),
        statistics=scatter(idx, k[:n_tested] / n, m),
        statistic_name=f"empirical P(cost > {fmt(budget)})",
        thresholds=thr,
        pvalue=pvalue,
    )


def select_ltt(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    delta: float,
    order: ArrayLike,
    pvalue: PValueMethod = "binomial",
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Learn-then-Test with fixed-sequence testing along ``order``.

    For each candidate j, loss_i = 1[cost_ij > B], k_j = sum_i loss_i, and
    H0_j: P(cost(lambda_j) > B) > alpha is tested with the p-value of
    :func:`ltt_pvalues`. Candidates are tested in ``order`` (cheapest first)
    and rejected while p_j <= delta; testing stops at the first non-rejection.
    The certified set is the rejected prefix; the last (most escalating)
    certified candidate is returned.

    Args:
        costs: float array, shape (n_problems, n_thresholds), cost units.
        budget: per-problem budget B >= 0, same units.
        alpha: risk level for P(cost > B), in (0, 1).
        delta: allowed probability that the calibration certifies a bad
            threshold, in (0, 1).
        order: int array of candidate indices, cheapest first. It must be
            fixed WITHOUT looking at this calibration data (gate semantics, or
            :func:`order_by_mean_cost` on a separate pilot split).
        pvalue: ``"binomial"`` (default) or ``"hoeffding_bentkus"``.
        thresholds: optional values, shape (n_thresholds,), for reporting.

    Returns:
        Selection; ``p_values``/``statistics`` (empirical violation rates) are
        filled for the tested candidates and NaN for the untested ones.

    Guarantee: if calibration problems and the test problem are i.i.d., then
    P( P(cost_test(lambda) > B) > alpha for some certified lambda ) <= delta
    (probability over the calibration set). No monotonicity of cost in the
    threshold is assumed: fixed-sequence testing controls the FWER.

    Raises:
        InfeasibleBudgetError: the cheapest candidate is not rejected (the
            message states its violation rate and p-value).
        InsufficientDataError: even k = 0 would not give p <= delta at this n
            (the message states the minimum n, see :func:`min_n_ltt`).
        CalibrationError: invalid inputs.

    Reference: Angelopoulos et al., "Learn then Test" (2021), Sec. 3-4;
    Bates et al., RCPS (2021), for the Hoeffding-Bentkus p-value.
    """
    return _fixed_sequence(costs, budget, alpha, delta, order, pvalue, thresholds, False, "order")


def select_ltt_path(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    delta: float,
    path: ArrayLike,
    pvalue: PValueMethod = "binomial",
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Learn-then-Test for N-tier cascades: fixed-sequence testing along a path
    of threshold VECTORS.

    Args:
        costs: float array, shape (n_problems, n_candidates): cost of problem
            i under candidate threshold vector c (one threshold per gate).
        budget, alpha, delta, pvalue: as in :func:`select_ltt`.
        path: int array of candidate indices, cheapest first, chosen WITHOUT
            looking at this calibration data (e.g. raise all gates together,
            or a path learned on a separate split). Candidates off the path
            are never tested.
        thresholds: optional, shape (n_candidates, n_gates) or (n_candidates,).

    Returns:
        Selection whose ``threshold`` is the chosen vector (a tuple).

    Guarantee: as :func:`select_ltt` (i.i.d. problems; with probability
    >= 1 - delta every certified vector has P(cost > B) <= alpha); no
    monotonicity assumed. Power depends on the path: one early non-rejection
    stops the search.

    Reference: Angelopoulos et al., "Learn then Test" (2021), fixed-sequence
    testing and its multi-parameter extension.
    """
    return _fixed_sequence(costs, budget, alpha, delta, path, pvalue, thresholds, True, "path")


def bonferroni_ltt(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    delta: float,
    order: ArrayLike | None = None,
    pvalue: PValueMethod = "binomial",
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Learn-then-Test with a Bonferroni correction: certify every candidate
    with p-value <= delta / m, where m is the number of candidates tested.

    Args:
        costs: float array, shape (n_problems, n_candidates).
        budget, alpha, delta, pvalue: as in :func:`select_ltt`.
        order: optional candidate indices to test (default: all), used only to
            rank the certified ones; since the guarantee is simultaneous, this
            ranking may depend on the data. Default ranking: ascending mean
            calibration cost.
        thresholds: optional, shape (n_candidates,) or (n_candidates, n_gates).

    Returns:
        Selection with ``certified`` = all rejected candidates (ranked as
        above) and ``index`` = the last, i.e. most escalating, of them. Every
        tested candidate has a p-value.

    Guarantee: if problems are i.i.d., with probability >= 1 - delta EVERY
    certified candidate has P(cost > B) <= alpha (FWER control by Bonferroni;
    no ordering or monotonicity needed). Less powerful than a good fixed
    sequence, but robust to a badly chosen path; suited to unordered grids of
    threshold vectors.

    Raises:
        InfeasibleBudgetError: nothing rejected (the message states the
            candidate with the smallest p-value).
        InsufficientDataError: even k = 0 would not give p <= delta / m.

    Reference: Angelopoulos et al., "Learn then Test" (2021), Sec. 3.
    """
    arr = check_costs(costs)
    budget = check_budget(budget)
    alpha = check_probability("alpha", alpha)
    delta = check_probability("delta", delta)
    n, m_all = arr.shape
    idx = np.arange(m_all) if order is None else check_order(order, m_all)
    thr = check_thresholds(thresholds, m_all, allow_vectors=True)
    if order is None:
        idx = idx[np.argsort(arr.mean(axis=0), kind="stable")]
    level = delta / idx.size
    what = f"Bonferroni level delta/m = {fmt(delta)}/{idx.size}"
    _check_enough(n, alpha, level, pvalue, what)
    k = _violation_counts(arr[:, idx], budget)
    p = ltt_pvalues(k, n, alpha, pvalue)
    rejected = p <= level
    if not rejected.any():
        best = int(np.argmin(p))
        who = f"the candidate with the smallest p-value ({describe_threshold(int(idx[best]), thr)})"
        raise _infeasible(budget, alpha, level, n, int(k[best]), float(p[best]), pvalue, who, what)
    certified = tuple(int(i) for i in idx[rejected])
    return Selection(
        index=certified[-1],
        certified=certified,
        order=tuple(int(i) for i in idx),
        method=LTT_BONFERRONI,
        budget=budget,
        n=n,
        alpha=alpha,
        delta=delta,
        p_values=scatter(idx, p, m_all),
        statistics=scatter(idx, k / n, m_all),
        statistic_name=f"empirical P(cost > {fmt(budget)})",
        thresholds=thr,
        pvalue=pvalue,
    )
