"""calibration.pacing: the pacer's deterministic ceiling on the running mean cost."""

from __future__ import annotations

import numpy as np
import pytest

from calibration import BudgetPacer, CalibrationError, replay_pacer


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


def test_the_ceiling_is_the_identity_and_the_a_priori_bound_holds():
    # No request at the cheapest setting costs more than B and none more than the cap C, so the
    # debt never passes step (C - B) / B: mean <= B + (B start / step + C - B) / n, whatever the
    # order; the dearest setting never underspends, so nothing is dropped and
    # sum(c_i - B) = (B / step) (start - position_n) exactly.
    rng = np.random.default_rng(0)
    k, budget, step, cap = 20, 40.0, 2.0, 160.0
    settings_cost = np.linspace(0.1 * budget, 3 * budget, k)
    pacer = BudgetPacer(k, budget, step=step, start=7)
    costs = []
    for _ in range(2000):
        cost = min(cap, settings_cost[pacer.index] * rng.uniform(0.2, 2.0))
        if pacer.index == 0:
            cost = min(cost, budget)
        elif pacer.index == k - 1:
            cost = max(cost, 1.02 * budget)
        costs.append(cost)
        pacer.observe(cost)
        n = len(costs)
        assert pacer.position >= -step * (cap - budget) / budget - 1e-9
        assert np.mean(costs) <= budget + (budget * 7 / step + cap - budget) / n + 1e-9
    assert np.sum(np.array(costs) - budget) == pytest.approx(budget / step * (7 - pacer.position))


def test_cheap_traffic_moves_it_to_dearer_settings_and_dear_traffic_back():
    budget = 10.0
    settings_cost = np.linspace(1.0, 30.0, 15)
    pacer = BudgetPacer(15, budget, step=1.0, start=5)
    history: list[float] = []
    stream(pacer, settings_cost, np.full(400, 0.5), history)  # every setting half as dear as planned
    dear_index = pacer.index
    stream(pacer, settings_cost, np.full(400, 2.0), history)
    assert dear_index > 5 > pacer.index


def test_a_debt_is_kept_in_the_ceiling_and_paid_back():
    pacer = BudgetPacer(3, 1.0, step=1.0, start=0)
    for _ in range(10):
        pacer.observe(4.0)  # even the cheapest setting costs 4 x B
    assert pacer.index == 0 and pacer.position == pytest.approx(-30.0)
    assert pacer.bound() == pytest.approx(4.0) == pytest.approx(pacer.mean_cost)  # exact, not hidden
    assert "10 requests" in pacer.statement()
    for _ in range(30):
        assert pacer.index == 0  # stays cheapest until the debt is paid
        pacer.observe(0.0)
    assert pacer.position == pytest.approx(0.0) and pacer.mean_cost == pytest.approx(1.0)
    pacer.observe(0.0)
    assert pacer.index == 1  # then moves up


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


def test_replay_is_the_pacer_serving_the_recorded_requests():
    rng = np.random.default_rng(3)
    costs = np.sort(rng.uniform(0, 30, size=(50, 6)), axis=1)  # cheapest setting first
    order = rng.permutation(50)
    chosen, pacer = replay_pacer(costs, 10.0, step=1.5, start=2, order=order)
    manual = BudgetPacer(6, 10.0, step=1.5, start=2)
    for i in order:
        assert chosen[i] == manual.index
        manual.observe(float(costs[i, manual.index]))
    assert pacer == manual and pacer.mean_cost == pytest.approx(costs[np.arange(50), chosen].mean())
    with pytest.raises(CalibrationError, match="permutation"):
        replay_pacer(costs, 10.0, order=np.zeros(50, dtype=int))
    with pytest.raises(CalibrationError, match="shape"):
        replay_pacer(np.zeros(5), 10.0)
