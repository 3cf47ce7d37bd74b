"""Conformal risk control of E[cost]: hand-computed bound, errors, validity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration import (
    CalibrationError,
    InfeasibleBudgetError,
    InsufficientDataError,
    risk_control_bound,
    select_risk_control,
)

# n = 4 problems; bound_j = (4/5) mean_j + cost_max/5 with cost_max = 100:
# means 25, 50, 70 -> bounds 40, 60, 76.
COSTS = np.array([[10.0, 20.0, 30.0], [20.0, 40.0, 60.0], [30.0, 60.0, 90.0], [40.0, 80.0, 100.0]])


def test_bound_by_hand() -> None:
    np.testing.assert_allclose(risk_control_bound(COSTS, 100.0), [40.0, 60.0, 76.0])


@pytest.mark.parametrize("budget, certified", [(60.0, (0, 1)), (59.9, (0,)), (76.0, (0, 1, 2))])
def test_select_prefix_by_hand(budget: float, certified: tuple[int, ...]) -> None:
    sel = select_risk_control(COSTS, budget, order=[0, 1, 2], cost_max=100.0, thresholds=[0.8, 0.5, 0.2])
    assert sel.certified == certified and sel.index == certified[-1]
    assert "E[cost] <=" in sel.statement() and "cost_max=100" in sel.statement()


def test_stops_at_first_infeasible() -> None:
    costs = COSTS[:, [0, 2, 1]]  # bounds along order: 40, 76, 60
    assert select_risk_control(costs, 65.0, order=[0, 1, 2], cost_max=100.0).certified == (0,)


def test_infeasible_message_states_cheapest_bound() -> None:
    with pytest.raises(InfeasibleBudgetError, match=r"bound .* is 40\b"):
        select_risk_control(COSTS, 39.0, order=[0, 1, 2], cost_max=100.0)


def test_insufficient_data_states_minimum_n() -> None:
    # cost_max/(n+1) = 20 > 15: need n >= ceil(100/15) - 1 = 6 (100/7 = 14.3 <= 15).
    with pytest.raises(InsufficientDataError, match=r"need n >= .* = 6\b"):
        select_risk_control(COSTS, 15.0, order=[0, 1, 2], cost_max=100.0)


@pytest.mark.parametrize("cost_max", [99.0, -1.0, np.nan, np.inf])
def test_cost_max_must_bound_costs(cost_max: float) -> None:
    with pytest.raises(CalibrationError, match="cost_max"):
        select_risk_control(COSTS, 60.0, order=[0, 1, 2], cost_max=cost_max)


def test_negative_costs_rejected() -> None:
    with pytest.raises(CalibrationError, match=r"costs must lie in \[0, cost_max"):
        select_risk_control(COSTS - 20.0, 60.0, order=[0, 1, 2], cost_max=100.0)


def test_expected_cost_validity(monotone_family) -> None:
    """Derivation: splits are independent uniform permutations of a fixed pool,
    so calibration and test problems are exchangeable and the per-split mean
    held-out cost V_s at the chosen threshold are i.i.d. with E[V_s] <= B
    (conformal risk control; costs are monotone and in [0, COST_MAX]). By the
    CLT, mean(V) > B + 4 sd(V)/sqrt(n_splits) has probability < 1e-4.
    Also checks that a level-B selection is not vacuous: it must escalate
    beyond the cheapest threshold in most splits."""
    pool = monotone_family.pool[:5000]
    budget = float(pool[:, 30].mean())
    rng = np.random.default_rng(5)
    n_splits = 300
    v = np.empty(n_splits)
    depth = np.empty(n_splits)
    for s in range(n_splits):
        perm = rng.permutation(pool.shape[0])
        cal, test = pool[perm[:200]], pool[perm[200:]]
        sel = select_risk_control(cal, budget, monotone_family.order, cost_max=monotone_family.cost_max)
        v[s] = test[:, sel.index].mean()
        depth[s] = len(sel.certified)
    assert v.mean() <= budget + 4 * v.std(ddof=1) / math.sqrt(n_splits)
    assert np.median(depth) > 1
