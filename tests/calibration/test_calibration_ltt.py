"""Learn-then-Test: p-values, fixed-sequence logic, Bonferroni, N-tier paths,
error paths, and empirical FWER validity (monotone and non-monotone costs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from calibration import (
    InfeasibleBudgetError,
    InsufficientDataError,
    bonferroni_ltt,
    ltt_pvalues,
    min_n_ltt,
    select_ltt,
    select_ltt_path,
)

# ---------------------------------------------------------------- p-values


def test_binomial_pvalue_matches_scipy() -> None:
    k = np.array([0, 3, 10, 25, 30])
    expected = [stats.binom.cdf(int(ki), 30, 0.2) for ki in k]
    np.testing.assert_allclose(ltt_pvalues(k, 30, 0.2, "binomial"), expected, rtol=1e-12)


def test_hoeffding_bentkus_pvalue_by_hand() -> None:
    n, k, a = 10, 1, 0.3
    r = k / n
    hoeffding = math.exp(-n * (r * math.log(r / a) + (1 - r) * math.log((1 - r) / (1 - a))))
    binom_cdf = (1 - a) ** 10 + 10 * a * (1 - a) ** 9  # P(Binom(10, 0.3) <= 1)
    expected = min(hoeffding, math.e * binom_cdf, 1.0)
    assert ltt_pvalues(np.array([k]), n, a, "hoeffding_bentkus")[0] == pytest.approx(expected, rel=1e-12)
    # k = 0: h1(0, a) = -log(1 - a), so p = (1 - a)^n.
    assert ltt_pvalues(0, n, a, "hoeffding_bentkus") == pytest.approx((1 - a) ** n, rel=1e-12)
    # Empirical risk >= alpha: the Hoeffding term is exp(0) = 1 and e * cdf > 1 is capped.
    assert ltt_pvalues(np.array([3, 5]), n, a, "hoeffding_bentkus").tolist() == [1.0, 1.0]


@pytest.mark.parametrize("n, alpha", [(30, 0.05), (300, 0.1), (1000, 0.2)])
def test_hoeffding_bentkus_is_more_conservative_than_binomial(n: int, alpha: float) -> None:
    # Chernoff: exp(-n h1(k/n, a)) >= P(Binom(n, a) <= k) for k/n <= a, and e*cdf >= cdf.
    k = np.arange(n + 1)
    assert np.all(ltt_pvalues(k, n, alpha, "hoeffding_bentkus") >= ltt_pvalues(k, n, alpha) - 1e-15)


@pytest.mark.parametrize("method", ["binomial", "hoeffding_bentkus"])
@pytest.mark.parametrize("n, alpha", [(25, 0.1), (300, 0.1), (200, 0.3)])
def test_pvalues_are_super_uniform_under_null(method: str, n: int, alpha: float) -> None:
    """Exact check, no simulation: under H0 at the boundary (risk = alpha,
    the least favourable null), K ~ Binom(n, alpha) and P(p(K) <= u) must be
    <= u for every u. Computed as sum of pmf(k) over {k : p(k) <= u}."""
    k = np.arange(n + 1)
    p = ltt_pvalues(k, n, alpha, method)
    pmf = stats.binom.pmf(k, n, alpha)
    for u in np.r_[np.geomspace(1e-6, 1, 60), p]:
        assert pmf[p <= u].sum() <= u + 1e-12


def test_min_n_ltt_by_hand() -> None:
    # alpha = delta = 0.1: 0.9^21 = 0.109 > 0.1 >= 0.9^22 = 0.0985 -> n_min = 22.
    assert 0.9**21 > 0.1 >= 0.9**22
    assert min_n_ltt(0.1, 0.1) == 22
    assert min_n_ltt(0.1, 0.1, "hoeffding_bentkus") == 22
    # alpha = 0.05, delta = 0.05: log(0.05)/log(0.95) = 58.4 -> 59.
    assert min_n_ltt(0.05, 0.05) == 59


# ---------------------------------------------------------------- fixed sequence


def _violation_matrix(n: int, counts: list[int]) -> np.ndarray:
    """Costs (n, len(counts)): column j has exactly counts[j] problems with cost 2 > budget 1."""
    costs = np.full((n, len(counts)), 0.5)
    for j, c in enumerate(counts):
        costs[:c, j] = 2.0
    return costs


def test_fixed_sequence_stops_at_first_non_rejection() -> None:
    n, alpha, delta = 100, 0.1, 0.1
    costs = _violation_matrix(n, [0, 40, 0, 2])  # candidate 1 is clearly bad
    sel = select_ltt(costs, 1.0, alpha, delta, order=[0, 1, 2, 3], thresholds=[0.9, 0.7, 0.5, 0.3])
    # 0 rejected, 1 not rejected -> stop; 2 and 3 would reject but are never tested.
    assert sel.certified == (0,) and sel.index == 0 and sel.threshold == 0.9
    assert sel.p_values[0] == pytest.approx(stats.binom.cdf(0, n, alpha))
    assert sel.p_values[1] == pytest.approx(stats.binom.cdf(40, n, alpha)) and sel.p_values[1] > delta
    assert np.isnan(sel.p_values[2]) and np.isnan(sel.p_values[3])
    assert sel.statistics[:2] == (0.0, 0.4)
    # Same data, bad candidate moved last: the three good ones are certified.
    sel2 = select_ltt(costs, 1.0, alpha, delta, order=[0, 2, 3, 1])
    assert sel2.certified == (0, 2, 3) and sel2.index == 3


def test_ltt_violation_is_strictly_above_budget() -> None:
    costs = np.full((50, 1), 600.0)  # cost == B is not a violation
    assert select_ltt(costs, 600.0, 0.1, 0.1, order=[0]).certified == (0,)
    with pytest.raises(InfeasibleBudgetError):
        select_ltt(costs, 599.0, 0.1, 0.1, order=[0])


def test_ltt_infeasible_message_states_rate_and_pvalue() -> None:
    n = 100
    costs = _violation_matrix(n, [15, 0])
    p = stats.binom.cdf(15, n, 0.1)
    with pytest.raises(InfeasibleBudgetError) as err:
        select_ltt(costs, 1.0, 0.1, 0.1, order=[0, 1])
    msg = str(err.value)
    assert "violation rate 0.15 (15/100)" in msg and f"p-value {p:.6g}" in msg


def test_ltt_insufficient_data_states_minimum_n() -> None:
    with pytest.raises(InsufficientDataError, match=r"need n >= 22\b"):
        select_ltt(np.zeros((21, 3)), 1.0, 0.1, 0.1, order=[0, 1, 2])
    assert select_ltt(np.zeros((22, 3)), 1.0, 0.1, 0.1, order=[0, 1, 2]).certified == (0, 1, 2)


def test_ltt_hoeffding_bentkus_option() -> None:
    costs = _violation_matrix(300, [5, 20, 60])
    sel = select_ltt(costs, 1.0, 0.1, 0.1, order=[0, 1, 2], pvalue="hoeffding_bentkus")
    expected = ltt_pvalues(np.array([5, 20, 60]), 300, 0.1, "hoeffding_bentkus")
    assert sel.certified == tuple(j for j in range(2) if expected[j] <= 0.1)
    assert "Hoeffding-Bentkus p-values" in sel.statement()


def test_ltt_path_with_threshold_vectors() -> None:
    # 3-tier cascade: candidates are (gate1, gate2) vectors; path fixed in advance.
    vectors = [(0.9, 0.9), (0.7, 0.9), (0.7, 0.5), (0.3, 0.5)]
    costs = _violation_matrix(200, [0, 5, 60, 0])
    sel = select_ltt_path(costs, 1.0, 0.1, 0.05, path=[0, 1, 2, 3], thresholds=vectors)
    assert sel.certified == (0, 1) and sel.threshold == (0.7, 0.9)
    assert "threshold (0.7, 0.9)" in sel.statement()
    assert np.isnan(sel.p_values[3])


# ---------------------------------------------------------------- Bonferroni


def test_bonferroni_certifies_exactly_pvalues_below_delta_over_m() -> None:
    n, alpha, delta = 200, 0.1, 0.1
    counts = [2, 9, 12, 30, 8]
    costs = _violation_matrix(n, counts)
    p = stats.binom.cdf(counts, n, alpha)
    sel = bonferroni_ltt(costs, 1.0, alpha, delta, order=[0, 1, 2, 3, 4])
    expected = tuple(j for j in range(5) if p[j] <= delta / 5)
    assert sel.certified == expected and sel.index == expected[-1]
    np.testing.assert_allclose(sel.p_values, p, rtol=1e-12)
    # By hand: p ~ (2e-7, 0.0035, 0.032, 0.99, 0.0014); candidate 2 passes at
    # delta = 0.1 unadjusted but not at delta/m = 0.02.
    assert sel.certified == (0, 1, 4)


def test_bonferroni_default_ranking_is_by_mean_cost() -> None:
    costs = _violation_matrix(200, [0, 0, 0]) * np.array([3.0, 1.0, 2.0])  # all <= 1.5 < budget
    sel = bonferroni_ltt(costs, 10.0, 0.1, 0.1)
    assert sel.certified == (1, 2, 0) and sel.index == 0


def test_bonferroni_errors() -> None:
    # delta/m = 0.1/10 = 0.01 -> n_min = ceil(log(0.01)/log(0.9)) = 44.
    assert 0.9**43 > 0.01 >= 0.9**44
    with pytest.raises(InsufficientDataError, match=r"need n >= 44\b"):
        bonferroni_ltt(np.zeros((43, 10)), 1.0, 0.1, 0.1)
    with pytest.raises(InfeasibleBudgetError, match="smallest p-value"):
        bonferroni_ltt(_violation_matrix(100, [50, 30]), 1.0, 0.1, 0.1)


# ---------------------------------------------------------------- validity


def _naive(cal: np.ndarray, budget: float, alpha: float, order: np.ndarray) -> int:
    """Most escalating candidate in order whose EMPIRICAL violation rate <= alpha."""
    ok = np.nonzero(np.mean(cal[:, order] > budget, axis=0) <= alpha)[0]
    return int(order[ok[-1]])


def _fwer(
    family, budget: float, alpha: float, delta: float, n_splits: int, seed: int, pvalue: str = "binomial"
) -> np.ndarray:
    """Fractions of calibration draws whose choice has TRUE risk > alpha.

    Calibration sets of 300 problems are drawn with replacement from the pool,
    i.e. i.i.d. from the pool's empirical distribution, whose risk at candidate
    j is exactly the pool frequency: no test noise. Returns fractions for
    (LTT fixed sequence, naive, Bonferroni: any certified candidate bad).
    """
    pool = family.pool
    risk = np.mean(pool > budget, axis=0)
    rng = np.random.default_rng(seed)
    bad = np.zeros(3)
    for _ in range(n_splits):
        cal = pool[rng.integers(0, pool.shape[0], 300)]
        try:
            bad[0] += risk[select_ltt(cal, budget, alpha, delta, family.order, pvalue).index] > alpha
        except InfeasibleBudgetError:
            pass  # abstaining is never a violation
        bad[1] += risk[_naive(cal, budget, alpha, family.order)] > alpha
        try:
            sel = bonferroni_ltt(cal, budget, alpha, delta, pvalue=pvalue)
            bad[2] += np.any(risk[list(sel.certified)] > alpha)
        except InfeasibleBudgetError:
            pass
    return bad / n_splits


# Tolerance derivation: the n_splits draws are independent given the pool, so
# the number of bad draws is Binomial(n_splits, f) with f <= delta for a valid
# procedure; the fraction exceeds delta + 3 sqrt(delta(1-delta)/n_splits)
# with probability ~1e-3 (normal approximation). The naive rule must exceed
# the same bound, which shows the harness can detect an invalid method.
N_SPLITS, ALPHA, DELTA = 300, 0.1, 0.1
FWER_TOL = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)


@pytest.mark.parametrize("pvalue", ["binomial", "hoeffding_bentkus"])
def test_ltt_fwer_monotone_family(monotone_family, pvalue: str) -> None:
    # Budget at the pool's 0.9-quantile of a mid-grid threshold, so the true
    # risk crosses alpha mid-grid in steps of ~0.013 (fine grid: naive overshoots).
    budget = float(np.quantile(monotone_family.pool[:, 30], 0.9))
    ltt, naive, bonf = _fwer(monotone_family, budget, ALPHA, DELTA, N_SPLITS, seed=3, pvalue=pvalue)
    assert ltt <= FWER_TOL and bonf <= FWER_TOL
    assert naive > FWER_TOL


def test_ltt_fwer_nonmonotone_family(nonmonotone_family) -> None:
    # Candidates 1..50 all have true risk slightly above alpha (~0.12), candidate
    # 0 has risk ~0.002. With 50 near-independent chances, the naive rule finds
    # one whose empirical rate is <= alpha almost every time.
    pool = nonmonotone_family.pool
    budget = float(np.quantile(pool[:, 1:], 0.88))
    risk = np.mean(pool > budget, axis=0)
    assert risk[0] < ALPHA < risk[1:].min() and risk[1:].max() < ALPHA + 0.03  # the intended setting
    ltt, naive, bonf = _fwer(nonmonotone_family, budget, ALPHA, DELTA, N_SPLITS, seed=4)
    assert ltt <= FWER_TOL and bonf <= FWER_TOL
    assert naive > 0.5 > FWER_TOL
