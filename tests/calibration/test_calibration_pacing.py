"""calibration.pacing: the pacer's deterministic ceiling on the running mean cost."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("seed", range(10))
def test_the_ceiling_holds_with_requests_in_flight_whatever_they_report(seed):
    # Requests begin, report spends (honest or not) and finish in any order: the setting they
    # run at depends on the estimates, the ceiling on the finished costs does not.
    rng = np.random.default_rng(100 + seed)
    k, budget = int(rng.integers(2, 30)), float(rng.uniform(1, 50))
    settings_cost = np.sort(rng.uniform(0, 4 * budget, size=k))
    pacer = BudgetPacer(k, budget, step=float(rng.uniform(0.2, 6)), start=float(rng.integers(0, k)))
    running: list[tuple[int, int]] = []
    finished: list[float] = []
    for _ in range(1500):
        if running and (len(running) >= 40 or rng.random() < 0.5):
            ticket, setting = running.pop(int(rng.integers(len(running))))
            finished.append(float(settings_cost[setting] * rng.lognormal(0, 1)))
            pacer.observe(finished[-1], ticket)
            assert np.mean(finished) <= pacer.bound() + 1e-9
        else:
            running.append(pacer.begin())
        for ticket, _ in running:
            if rng.random() < 0.3:
                pacer.spend(ticket, float(rng.uniform(0, 5 * budget)))
    assert pacer.n == len(finished) and pacer.mean_cost == pytest.approx(np.mean(finished))


def test_running_dear_requests_move_the_next_one_cheaper_before_they_finish():
    pacer = BudgetPacer(10, 10.0, step=1.0, start=5)
    for cost in (1.0, 50.0) * 4:  # requests at setting 5 have cost 1 or 50
        pacer.position = 5.0
        ticket, setting = pacer.begin()
        assert setting == 5
        pacer.observe(cost, ticket)
    pacer.position = 5.0
    ticket, setting = pacer.begin()
    assert setting == 5 and pacer.in_flight_shift() == pytest.approx((10 - 25.5) / 10)  # fresh: 25.5
    assert pacer.index == 3
    pacer.spend(ticket, 12.0)  # past every cheap one: one of the 50s
    assert pacer.in_flight_shift() == pytest.approx((10 - 50) / 10) and pacer.index == 1
    pacer.spend(ticket, 60.0)  # dearer than any seen: at least what it has spent
    assert pacer.in_flight_shift() == pytest.approx((10 - 60) / 10) and pacer.index == 0
    pacer.observe(70.0, ticket)
    assert pacer.running == {} and pacer.in_flight_shift() == 0.0
    assert pacer.position == pytest.approx(5.0 - 6.0) and pacer.index == 0


def test_credit_that_offsets_running_requests_is_kept_not_dropped():
    pacer = BudgetPacer(3, 10.0, step=1.0, start=2)
    ticket, _ = pacer.begin()
    pacer.observe(40.0, ticket)  # setting 2 costs 40: the next one there is expected to
    pacer.position = 2.0
    dear, setting = pacer.begin()
    assert setting == 2
    pacer.spend(dear, 20.0)  # expected 40: holds the position down by 3 settings
    for _ in range(3):
        pacer.observe(0.0)  # three free requests: +3 settings of credit, past the dearest
    assert pacer.position == pytest.approx(5.0)  # kept: the running one will spend it
    pacer.observe(40.0, dear)
    assert pacer.position == pytest.approx(2.0) and pacer.index == 2
    pacer.observe(0.0)  # nothing running: credit past the dearest setting is dropped again
    assert pacer.position == pytest.approx(2.0)


def test_tickets_must_be_running():
    pacer = BudgetPacer(3, 1.0)
    ticket, _ = pacer.begin()
    pacer.observe(1.0, ticket)
    for call in (lambda: pacer.spend(ticket, 1.0), lambda: pacer.observe(1.0, ticket)):
        with pytest.raises(CalibrationError, match="no running request"):
            call()
    assert pacer.n == 1


def resolves(n: int, k: int, budget: float, seed: int) -> np.ndarray:
    """Re-solve-like costs: at setting j the large model solves a request again (cost ~2.5 B)
    when its difficulty is below j / k, else the small model's answer stands (cost B / 30)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=(n, 1))
    again = difficulty < np.arange(k)[None, :] / k
    return np.where(again, 2.5 * budget * rng.uniform(0.8, 1.2, size=(n, 1)), budget / 30)


def test_replay_one_at_a_time_is_the_sequential_pacer_whatever_the_accounting():
    costs = resolves(80, 12, 10.0, 0)
    sequential, paced = replay_pacer(costs, 10.0, step=2.0, start=4)
    for account in (True, False):
        chosen, pacer = replay_pacer(costs, 10.0, step=2.0, start=4, concurrency=1, account_in_flight=account)
        assert np.array_equal(chosen, sequential) and pacer == paced


def test_accounting_for_running_requests_holds_the_mean_at_b_under_load():
    # 64 requests at once, each running for as long as it costs: cheap ones report first. A
    # pacer that waits for finished costs serves too dear; one that counts the running
    # requests' expected spend stays near B. Each replay keeps its ceiling.
    budget, costs = 10.0, resolves(600, 72, 10.0, 0)
    means = {}
    for account in (False, True):
        chosen, pacer = replay_pacer(costs, budget, step=2.0, start=28, concurrency=64, durations=costs + 0.3,
                                     account_in_flight=account)
        assert pacer.mean_cost == pytest.approx(costs[np.arange(600), chosen].mean())
        assert pacer.mean_cost <= pacer.bound() + 1e-9
        means[account] = pacer.mean_cost
    assert means[False] > 1.05 * budget
    assert abs(means[True] - budget) < 0.5 * abs(means[False] - budget)


@pytest.mark.parametrize("kwargs, match", [
    ({"concurrency": 0}, "concurrency"), ({"concurrency": True}, "concurrency"),
    ({"durations": np.zeros((4, 2))}, "durations"), ({"durations": -np.ones((5, 3))}, "durations"),
])
def test_bad_replay_settings_are_refused(kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        replay_pacer(np.ones((5, 3)), 1.0, **kwargs)


def test_a_pacer_resumed_from_its_json_goes_on_as_if_it_never_stopped():
    rng = np.random.default_rng(7)
    settings_cost = np.linspace(1.0, 30.0, 8)
    whole, first = BudgetPacer(8, 10.0, step=1.5, start=3), BudgetPacer(8, 10.0, step=1.5, start=3)
    noise = rng.lognormal(0, 1, 200)
    for factor in noise[:120]:
        whole.observe(float(settings_cost[whole.index] * factor))
        first.observe(float(settings_cost[first.index] * factor))
    resumed = BudgetPacer.from_json(json.loads(json.dumps(first.to_json())))
    assert resumed == first
    for factor in noise[120:]:
        whole.observe(float(settings_cost[whole.index] * factor))
        resumed.observe(float(settings_cost[resumed.index] * factor))
    assert resumed == whole and resumed.bound() == whole.bound()


def test_a_pacer_resumed_after_a_crash_charges_what_its_running_requests_had_spent():
    pacer = BudgetPacer(6, 10.0, step=2.0, start=2)
    for cost in (4.0, 25.0, 9.0):
        pacer.observe(cost)
    tickets = [pacer.begin()[0] for _ in range(3)]
    pacer.spend(tickets[0], 7.5)
    pacer.spend(tickets[1], 31.0)  # the third has spent nothing: nothing to charge
    kept = json.loads(json.dumps(pacer.to_json()))
    assert sorted(spent for _, spent in kept["running"]) == [0.0, 7.5, 31.0]
    resumed = BudgetPacer.from_json(kept)  # the process died with three requests running
    settled = BudgetPacer(6, 10.0, step=2.0, start=2)  # as if the two that spent had finished so
    for cost in (4.0, 25.0, 9.0, 7.5, 31.0):
        settled.observe(cost)
    assert resumed == settled and not resumed.running
    assert resumed.n == 5 and resumed.total_cost == 76.5 and resumed.bound() == settled.bound()
    assert resumed.mean_cost <= resumed.bound()
    # Without the running record (a state kept before it existed) they would be lost.
    older = {k: v for k, v in kept.items() if k != "running"}
    assert BudgetPacer.from_json(older).n == 3


@pytest.mark.parametrize("running", [
    [[6, 1.0]], [[-1, 1.0]], [[0, -2.0]], [[0, float("inf")]], [[True, 1.0]], [[0.5, 1.0]], [[0]], {"0": 1.0},
])
def test_a_bad_running_record_is_refused(running):
    with pytest.raises(CalibrationError, match="running must be"):
        BudgetPacer.from_json(BudgetPacer(6, 2.0).to_json() | {"running": running})


@pytest.mark.parametrize("change, match", [
    ({"n": -1}, "n must"), ({"n": 2.5}, "n must"), ({"position": float("nan")}, "position"),
    ({"total_cost": -3.0}, "total_cost"), ({"step": 0}, "step"), ({"extra": 1}, "keys"),
])
def test_a_bad_pacer_state_is_refused(change, match):
    payload = BudgetPacer(4, 2.0).to_json() | change
    with pytest.raises(CalibrationError, match=match):
        BudgetPacer.from_json(payload)
    with pytest.raises(CalibrationError, match="keys"):
        BudgetPacer.from_json([1, 2])
