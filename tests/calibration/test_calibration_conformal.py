"""Split conformal: hand-computed cases, error paths, empirical validity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration import (
    CalibrationError,
    InfeasibleBudgetError,
    InsufficientDataError,
    conformal_quantile,
    min_n_conformal,
    select_conformal,
)


def test_quantile_nine_elements_alpha_01_is_ninth_smallest() -> None:
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    # ceil((9 + 1) * 0.9) = 9 -> the 9th smallest = the maximum.
    assert conformal_quantile(scores, 0.1) == 9.0
    # ceil(10 * 0.8) = 8 -> 8th smallest.
    assert conformal_quantile(scores, 0.2) == 8.0
    # ceil(10 * 0.5) = 5 -> the 5th smallest (the median here).
    assert conformal_quantile(scores, 0.5) == 5.0


def test_quantile_rank_uses_n_plus_one() -> None:
    # n = 200, alpha = 0.1: ceil(201 * 0.9) = ceil(180.9) = 181 -> value 181
    # (the naive ceil(n(1-alpha)) = 180 would give 180).
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 201.0))
    assert conformal_quantile(scores, 0.1) == 181.0


def test_quantile_too_few_points_states_minimum_n() -> None:
    # n = 8, alpha = 0.1: ceil(9 * 0.9) = 9 > 8; minimum n = ceil(1/0.1) - 1 = 9.
    with pytest.raises(InsufficientDataError, match=r"need n >= ceil\(1/alpha\) - 1 = 9\b"):
        conformal_quantile(np.arange(8.0), 0.1)
    assert min_n_conformal(0.1) == 9
    assert min_n_conformal(0.05) == 19
    assert min_n_conformal(0.3) == math.ceil(1 / 0.3) - 1 == 3
    assert conformal_quantile(np.arange(9.0), 0.1) == 8.0  # n = 9 is enough


@pytest.mark.parametrize("bad", [[1.0, np.nan], [1.0, np.inf], [], [[1.0, 2.0]]])
def test_quantile_rejects_bad_scores(bad: list) -> None:
    with pytest.raises(CalibrationError, match="scores"):
        conformal_quantile(bad, 0.1)


def _monotone_costs() -> np.ndarray:
    """9 problems x 3 thresholds; column j+1 >= column j (cheapest first)."""
    base = np.arange(1.0, 10.0)
    return np.stack([base * 10, base * 20, base * 30], axis=1)


def test_select_conformal_feasible_prefix_by_hand() -> None:
    costs = _monotone_costs()
    # alpha = 0.1, n = 9 -> quantile = column max: 90, 180, 270.
    sel = select_conformal(costs, budget=200.0, alpha=0.1, order=[0, 1, 2], thresholds=[0.9, 0.5, 0.1])
    assert sel.index == 1 and sel.certified == (0, 1) and sel.threshold == 0.5
    assert sel.statistics == (90.0, 180.0, 270.0)
    assert sel.certified_mask.tolist() == [True, True, False]


def test_select_conformal_stops_at_first_infeasible() -> None:
    base = np.arange(1.0, 10.0)
    # Quantiles (column max) along the order: 90 (ok), 270 (> 100), 18 (ok):
    # the walk must stop at the second candidate and never certify the third.
    costs = np.stack([base * 10, base * 30, base * 2], axis=1)
    sel = select_conformal(costs, budget=100.0, alpha=0.1, order=[0, 1, 2])
    assert sel.certified == (0,) and sel.index == 0
    sel2 = select_conformal(costs, budget=100.0, alpha=0.1, order=[0, 2, 1])
    assert sel2.certified == (0, 2) and sel2.index == 2


def test_select_conformal_infeasible_message_states_cheapest_quantile() -> None:
    costs = _monotone_costs() + 0.125
    cheapest_q = np.sort(costs[:, 0])[8]  # 9th smallest = 90.125, computed by hand
    with pytest.raises(InfeasibleBudgetError) as err:
        select_conformal(costs, budget=50.0, alpha=0.1, order=[0, 1, 2])
    msg = str(err.value)
    assert "P(cost > 50) <= 0.1" in msg
    assert f"0.9-conformal cost quantile is {cheapest_q:g}" in msg


def test_select_conformal_insufficient_data() -> None:
    with pytest.raises(InsufficientDataError, match=r"= 19\b"):
        select_conformal(_monotone_costs(), budget=1e9, alpha=0.05, order=[0, 1, 2])


def test_quantile_coverage_two_sided_on_uniform_scores() -> None:
    """For i.i.d. U(0,1) scores the coverage of q is q itself, so no test noise.

    Derivation: q = U_(r) with r = ceil((n+1)(1-alpha)); conformal theory gives
    1 - alpha <= E[q] = r/(n+1) <= 1 - alpha + 1/(n+1). Var(U_(r)) =
    r(n+1-r)/((n+1)^2 (n+2)) <= 1/(4(n+2)); the mean of S independent draws
    is within 4 standard errors of E[q] with probability > 1 - 1e-4.
    With n = 200, alpha = 0.1 the naive rank ceil(n(1-alpha)) = 180 gives
    E[q] = 0.8955, which is 4.5e-3 below 0.9 while 4 SE = 1.4e-3: detectable.
    """
    rng = np.random.default_rng(11)
    n, alpha, n_rep = 200, 0.1, 2000
    q = np.array([conformal_quantile(rng.random(n), alpha) for _ in range(n_rep)])
    tol = 4 * math.sqrt(1 / (4 * (n + 2)) / n_rep)
    assert 1 - alpha - tol <= q.mean() <= 1 - alpha + 1 / (n + 1) + tol


def _split_violations(family, budget: float, alpha: float, n_splits: int, seed: int) -> np.ndarray:
    """Held-out P(cost > budget) of select_conformal over random splits of a
    5000-problem pool into 200 calibration and 4800 test problems."""
    pool = family.pool[:5000]
    rng = np.random.default_rng(seed)
    out = np.empty(n_splits)
    for s in range(n_splits):
        perm = rng.permutation(pool.shape[0])
        cal, test = pool[perm[:200]], pool[perm[200:]]
        sel = select_conformal(cal, budget, alpha, family.order, family.thresholds)
        out[s] = np.mean(test[:, sel.index] > budget)
    return out


def test_select_conformal_empirical_validity(monotone_family) -> None:
    """Derivation of the tolerance: conditional on the pool, each split is an
    independent uniform permutation, so calibration and test problems are
    exchangeable and the per-split held-out violation rates V_s are i.i.d.
    with E[V_s] <= alpha (conformal guarantee; the cost family is monotone).
    Var(V_s) = Var(risk given calibration) + test noise, analytically about
    alpha(1-alpha)(1/(n_cal+2) + 1/n_test) ~ 0.0215^2; we use the sample sd.
    By the CLT mean(V) <= alpha + 4 sd / sqrt(n_splits) fails with
    probability < 1e-4 if the method is valid.
    Power check: the same harness must flag selection made at level 2*alpha.
    """
    alpha, n_splits = 0.1, 300
    budget = float(np.quantile(monotone_family.pool[:5000, 30], 0.9))  # mid-grid boundary
    v = _split_violations(monotone_family, budget, alpha, n_splits, seed=1)
    tol = 4 * v.std(ddof=1) / math.sqrt(n_splits)
    assert v.mean() <= alpha + tol
    v_bad = _split_violations(monotone_family, budget, 2 * alpha, n_splits, seed=2)
    assert v_bad.mean() > alpha + 4 * v_bad.std(ddof=1) / math.sqrt(n_splits)
