"""calibration.pacing: the pacer's deterministic ceiling on the running mean cost."""

from __future__ import annotations

import numpy as np
import pytest

from calibration import BudgetPacer, CalibrationError


def stream(pacer: BudgetPacer, settings_cost: np.ndarray, noise: np.ndarray, history: list[float]) -> None:
    """Serve len(noise) requests: request i at the pacer's setting k costs settings_cost[k] * noise[i];
    every cost the pacer has seen is appended to `history`."""
    for factor in noise:
        history.append(float(settings_cost[pacer.index] * factor))
        pacer.observe(history[-1])
        # The ceiling is a theorem for every prefix of every sequence: it can never be passed.
        assert np.mean(history) <= pacer.bound() + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_the_ceiling_holds_on_every_prefix_of_any_sequence(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    budget = float(rng.uniform(1, 100))
    settings_cost = np.sort(rng.uniform(0, 4 * budget, size=k))  # cheapest first
    # Traffic that shifts: easy and hard stretches, heavy tails, adversarial runs of zeros.
    noise = np.concatenate([rng.lognormal(0, 1, 300), rng.uniform(0, 0.2, 200), rng.pareto(1.5, 300) + 1,
                            np.zeros(50), np.full(100, 5.0)])
    pacer = BudgetPacer(k, budget, step=float(rng.uniform(0.1, 5)), start=float(rng.integers(0, k)))
    history: list[float] = []
    stream(pacer, settings_cost, noise, history)
    assert pacer.n == len(history) and pacer.mean_cost == pytest.approx(np.mean(history))


def test_it_spends_the_budget_when_the_settings_straddle_it():
    # The cheapest setting never overspends, the dearest never underspends, and no request
    # overspends by more than its position absorbs (c - B <= position * B / step), so neither
    # clip acts and sum(c_i - B) = (B / step) * (start - position_n): |mean - B| <= B (K - 1) / (step n).
    rng = np.random.default_rng(0)
    k, budget, step, n = 20, 40.0, 2.0, 2000
    settings_cost = np.linspace(0.1 * budget, 3 * budget, k)
    pacer = BudgetPacer(k, budget, step=step, start=7)
    costs = np.empty(n)
    for i in range(n):
        cost = settings_cost[pacer.index] * rng.uniform(0.8, 1.25)
        if pacer.index == 0:
            cost = min(cost, 0.99 * budget)
        elif pacer.index == k - 1:
            cost = max(cost, 1.02 * budget)
        costs[i] = cost
        pacer.observe(cost)
    assert pacer.unabsorbed == 0.0
    assert abs(costs.mean() - budget) <= budget * (k - 1) / (step * n) + 1e-9


def test_cheap_traffic_moves_it_to_dearer_settings_and_dear_traffic_back():
    budget = 10.0
    settings_cost = np.linspace(1.0, 30.0, 15)
    pacer = BudgetPacer(15, budget, step=1.0, start=5)
    history: list[float] = []
    stream(pacer, settings_cost, np.full(400, 0.5), history)  # every setting half as dear as planned
    dear_index = pacer.index
    stream(pacer, settings_cost, np.full(400, 2.0), history)
    assert dear_index > 5 > pacer.index


def test_what_the_cheapest_setting_overspends_is_recorded_not_hidden():
    pacer = BudgetPacer(3, 1.0, step=1.0, start=0)
    for _ in range(10):
        pacer.observe(4.0)  # even the cheapest setting costs 4 x B
    assert pacer.index == 0 and pacer.unabsorbed > 0
    assert pacer.mean_cost == pytest.approx(4.0)
    assert pacer.mean_cost <= pacer.bound() + 1e-12
    assert "10 requests" in pacer.statement()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_settings": 0, "budget": 1.0}, "n_settings"),
    ({"n_settings": 3, "budget": -1.0}, "budget"),
    ({"n_settings": 3, "budget": float("nan")}, "budget"),
    ({"n_settings": 3, "budget": 1.0, "step": 0.0}, "step"),
    ({"n_settings": 3, "budget": 1.0, "start": 3}, "start"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        BudgetPacer(**kwargs)


def test_bad_costs_are_refused():
    pacer = BudgetPacer(3, 1.0)
    for bad in (-1.0, float("inf"), "3"):
        with pytest.raises(CalibrationError, match="cost"):
            pacer.observe(bad)
    assert pacer.n == 0
