"""Learn-then-Test for threshold vectors (calibration.multi): the grid, its paths, the
procedure by hand, error paths, and empirical FWER validity on synthetic three-tier
(two-threshold) cost surfaces over 300 random calibration draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from calibration import (
    CalibrationError,
    InfeasibleBudgetError,
    InsufficientDataError,
    grid_paths,
    min_n_ltt,
    product_grid,
    select_ltt_path,
    select_ltt_paths,
)

# ---------------------------------------------------------------- grid and paths


def test_product_grid_orders_each_gate_from_highest_threshold() -> None:
    grid = product_grid([[0.1, 0.9, 0.5], [0.2, 0.8]])
    assert grid.tolist() == [[0.9, 0.8], [0.9, 0.2], [0.5, 0.8], [0.5, 0.2], [0.1, 0.8], [0.1, 0.2]]
    with pytest.raises(CalibrationError, match="values_per_gate"):
        product_grid([])
    with pytest.raises(CalibrationError, match=r"values_per_gate\[1\] must be finite"):
        product_grid([[0.5], [float("nan")]])


def test_grid_paths_by_hand() -> None:
    grid = product_grid([[0.9, 0.5, 0.1], [0.8, 0.2]])
    paths = [grid[p].tolist() for p in grid_paths(grid)]
    assert paths == [
        [[0.9, 0.8], [0.5, 0.2], [0.1, 0.2]],  # diagonal
        [[0.9, 0.8], [0.5, 0.8], [0.1, 0.8], [0.1, 0.2]],  # gate 1 first
        [[0.9, 0.8], [0.9, 0.2], [0.5, 0.2], [0.1, 0.2]],  # gate 2 first
    ]
    # Row order of the grid does not matter; indices follow the rows given.
    shuffled = grid[::-1]
    assert [shuffled[p].tolist() for p in grid_paths(shuffled)] == paths
    # One gate: a single path, cheapest first.
    one = product_grid([[0.2, 0.6, 0.4]])
    assert [p.tolist() for p in grid_paths(one)] == [[0, 1, 2]]


def test_grid_paths_three_gates_start_and_end_at_the_corners() -> None:
    grid = product_grid([[0.9, 0.5, 0.1], [0.8, 0.2], [0.7, 0.3]])
    paths = grid_paths(grid)
    assert len(paths) == 4
    for path in paths:
        assert grid[path[0]].tolist() == [0.9, 0.8, 0.7] and grid[path[-1]].tolist() == [0.1, 0.2, 0.3]
        steps = np.diff(grid[path], axis=0)
        assert (steps <= 0).all() and (steps < 0).any(axis=1).all()  # every move lowers a gate


def test_grid_paths_refuses_a_grid_that_is_not_a_product() -> None:
    with pytest.raises(CalibrationError, match="not a product grid"):
        grid_paths([[0.9, 0.9], [0.5, 0.5]])
    with pytest.raises(CalibrationError, match="not a product grid"):
        grid_paths([[0.9, 0.9], [0.9, 0.9]])


# ---------------------------------------------------------------- the procedure by hand


def _violation_matrix(n: int, counts: list[int], scale: list[float] | None = None) -> np.ndarray:
    """Costs (n, len(counts)): column j has exactly counts[j] problems with cost 2 > budget 1;
    the others cost scale[j] * 0.5 (so mean costs can be set)."""
    scale = scale or [1.0] * len(counts)
    costs = np.array([[0.5 * s for s in scale]] * n)
    for j, c in enumerate(counts):
        costs[:c, j] = 2.0
    return costs


def test_paths_split_delta_and_certify_the_union() -> None:
    n, alpha, delta = 200, 0.1, 0.1
    counts = [2, 30, 9, 12, 3]
    costs = _violation_matrix(n, counts, scale=[1.0, 1.2, 1.4, 1.6, 1.8])
    p = stats.binom.cdf(counts, n, alpha)
    # By hand: p ~ (2e-7, 0.99, 0.0035, 0.032, 1.3e-6); level delta/2 = 0.05 per path.
    assert p[3] <= delta / 2 < p[1] and p[3] > delta / 4
    sel = select_ltt_paths(costs, 1.0, alpha, delta, paths=[[0, 1, 2], [0, 2, 3, 4]])
    # Path 1 stops at candidate 1; path 2 rejects 0, 2, 3, 4. Union ranked by mean cost.
    assert sel.certified == (0, 2, 3, 4) and sel.index == 4 and sel.method == "ltt_paths"
    np.testing.assert_allclose([sel.p_values[j] for j in range(5)], p, rtol=1e-12)
    # With weights (0.75, 0.25) path 2 runs at 0.025 and stops at candidate 3.
    sel = select_ltt_paths(costs, 1.0, alpha, delta, paths=[[0, 1, 2], [0, 2, 3, 4]], weights=[0.75, 0.25])
    assert sel.certified == (0, 2) and np.isnan(sel.p_values[4])
    assert "Bonferroni over paths" in sel.statement() and "0.9" in sel.statement()


def test_one_path_certifies_what_select_ltt_path_certifies() -> None:
    rng = np.random.default_rng(0)
    vectors = product_grid([[0.9, 0.6, 0.3], [0.8, 0.4]])
    for _ in range(20):
        counts = rng.integers(0, 40, size=6).tolist()
        costs = _violation_matrix(150, counts)
        path = rng.permutation(6)
        try:
            one = select_ltt_path(costs, 1.0, 0.1, 0.1, path=path, thresholds=vectors)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[path], thresholds=vectors)
            continue
        many = select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[path], thresholds=vectors)
        assert set(many.certified) == set(one.certified)
        assert isinstance(many.threshold, tuple) and len(many.threshold) == 2


def test_paths_errors_state_the_problem() -> None:
    costs = _violation_matrix(100, [50, 30, 0])
    with pytest.raises(InfeasibleBudgetError, match=r"violation rate 0.5 \(50/100\)"):
        select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[[0, 2], [0, 1]])
    # delta / 2 = 0.05 per path -> n_min = ceil(log 0.05 / log 0.9) = 29.
    assert min_n_ltt(0.1, 0.05) == 29
    with pytest.raises(InsufficientDataError, match=r"need n >= 29\b"):
        select_ltt_paths(np.zeros((28, 3)), 1.0, 0.1, 0.1, paths=[[0, 1], [0, 2]])
    assert select_ltt_paths(np.zeros((29, 3)), 1.0, 0.1, 0.1, paths=[[0, 1], [0, 2]]).certified
    with pytest.raises(CalibrationError, match="weights must be 2 nonnegative numbers summing to 1"):
        select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[[0], [1]], weights=[0.7, 0.7])
    with pytest.raises(CalibrationError, match=r"paths\[1\] indices must lie in \[0, 2\]"):
        select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[[0], [5]])
    with pytest.raises(CalibrationError, match="at least one path"):
        select_ltt_paths(costs, 1.0, 0.1, 0.1, paths=[])
    with pytest.raises(CalibrationError, match="costs must be finite"):
        select_ltt_paths(np.full((50, 2), np.inf), 1.0, 0.1, 0.1, paths=[[0, 1]])


# ---------------------------------------------------------------- validity

MAX_STEPS, TOK_MIN, TOK_MAX = 20, 20.0, 200.0
C_SMALL, C_MEDIUM, C_LARGE = 1.0, 3.0, 8.0  # cost units per token of each tier
GRID = product_grid([np.linspace(0.2, 0.9, 8), np.linspace(0.2, 0.9, 8)])  # (64, 2)


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    n_steps = rng.integers(3, MAX_STEPS + 1, size=n)
    live = np.arange(MAX_STEPS)[None, :] < n_steps[:, None]
    return rng.uniform(TOK_MIN, TOK_MAX, size=(n, MAX_STEPS)) * live


def three_tier_costs(rng: np.random.Generator, n: int, sampled: bool) -> np.ndarray:
    """Costs, shape (n, 64), of a small -> medium -> large cascade at each GRID vector.

    Every step is drafted by the small model; gate 1 sends it to the medium model when
    its difficulty exceeds t1, gate 2 sends a medium step to the large model when the
    medium model's difficulty (correlated with the small one's) exceeds t2.
    sampled=False: difficulties are fixed per step, so cost is monotone in (t1, t2).
    sampled=True: each candidate resamples the step noise (a temperature-sampled gate),
    so a problem's costs are NOT monotone across candidates."""
    tokens = _tokens(rng, n)
    hardness = rng.beta(2.0, 5.0, size=n)[:, None, None]
    shape = (n, MAX_STEPS, GRID.shape[0] if sampled else 1)
    d1 = np.clip(hardness + 0.15 * rng.standard_normal(shape), 0, 1)
    d2 = np.clip(d1 - 0.1 + 0.15 * rng.standard_normal(shape), 0, 1)
    medium = d1 > GRID[:, 0]
    large = medium & (d2 > GRID[:, 1])
    return np.einsum("ik,ikj->ij", tokens, C_SMALL + C_MEDIUM * medium + C_LARGE * large)


@pytest.fixture(scope="module", params=[False, True], ids=["monotone", "sampled"])
def pool(request) -> np.ndarray:
    return three_tier_costs(np.random.default_rng(20241201 + request.param), 10000, request.param)


def _naive(cal: np.ndarray, budget: float, alpha: float) -> int:
    """The most escalating (highest mean cost) vector whose EMPIRICAL violation rate <= alpha."""
    ok = np.nonzero(np.mean(cal > budget, axis=0) <= alpha)[0]
    return int(ok[np.argmax(cal[:, ok].mean(axis=0))])


# Tolerance derivation: the draws are independent given the pool, so the number of
# draws that certify a bad vector is Binomial(N_SPLITS, f) with f <= DELTA for a valid
# procedure; the observed fraction exceeds DELTA + 3 sqrt(DELTA (1 - DELTA) / N_SPLITS)
# with probability ~1e-3 (normal approximation). The naive rule must exceed the same
# bound, which shows this harness can detect an invalid procedure.
N_SPLITS, N_CAL, ALPHA, DELTA = 300, 300, 0.1, 0.1
FWER_TOL = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)


def test_two_threshold_ltt_paths_control_the_fwer(pool: np.ndarray) -> None:
    """Calibration sets are drawn with replacement from the pool (i.i.d. from its
    empirical distribution), whose risk at each vector is exactly the pool frequency."""
    # The budget where the mid-grid vector has true risk alpha: the boundary crosses the grid.
    budget = float(np.quantile(pool[:, 27], 1 - ALPHA))
    risk = np.mean(pool > budget, axis=0)
    assert (risk < ALPHA).sum() >= 10 and (risk > ALPHA).sum() >= 10  # the intended setting
    paths = grid_paths(GRID)
    rng = np.random.default_rng(7)
    bad_ltt = bad_naive = certified_any = 0
    for _ in range(N_SPLITS):
        cal = pool[rng.integers(0, pool.shape[0], N_CAL)]
        try:
            sel = select_ltt_paths(cal, budget, ALPHA, DELTA, paths, thresholds=GRID)
            bad_ltt += bool(np.any(risk[list(sel.certified)] > ALPHA))
            certified_any += 1
        except InfeasibleBudgetError:
            pass  # abstaining is never a violation
        bad_naive += risk[_naive(cal, budget, ALPHA)] > ALPHA
    assert bad_ltt / N_SPLITS <= FWER_TOL
    assert bad_naive / N_SPLITS > FWER_TOL
    assert certified_any / N_SPLITS > 0.9  # and it has power: it certifies something
