"""The accuracy-budget curve's promises, checked on real traces of the embedded pair.

`bench/results/budget_curve/sweeps.npz` holds, per problem of the calibration and test
splits, the cost of every column of the curve (recorded by `bench.budget_curve`): the
confidence gate at each threshold without a cap, and per budget B the budget-aware gate
at each floor under the hard cap cap_factor * B. The pooled problems are the population:
each split draws a calibration set from them i.i.d. (with replacement), so the true mean
cost and true P(cost > B) of a chosen column are the pool's, known exactly.

In every split the most escalating certified column is taken (the costliest choice a
guarantee must cover). Tolerances: a mean over S splits is compared with its bound plus
3 standard errors (sd / sqrt(S)); a count of bad splits, Binomial(S, p <= delta), with
delta + 3 sqrt(delta (1 - delta) / S). A valid procedure exceeds either with probability
about 0.1 % (one-sided 3 sigma).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import calibration as cal
from cascade.budget import select_on_curve

SWEEPS = Path(__file__).resolve().parents[2] / "bench" / "results" / "budget_curve" / "sweeps.npz"
N_SPLITS = 300
ALPHA, DELTA = 0.1, 0.05


@pytest.fixture(scope="module")
def curve():
    data = np.load(SWEEPS)
    costs = np.concatenate([data["calibration_costs"], data["test_costs"]])
    candidates = [(str(f), float(t), None if math.isnan(c) else float(c))
                  for f, t, c in zip(data["families"], data["thresholds"], data["caps"])]
    assert costs.shape == (len(data["calibration_costs"]) + len(data["test_costs"]), len(candidates))
    return {"pool": costs, "candidates": candidates, "budgets": [float(b) for b in data["budgets"]],
            "cap_factor": float(data["cap_factor"]), "n_cal": len(data["calibration_costs"])}


def _splits(curve, method: str, budget: float, seed: int, cost_max: float = math.inf):
    """(true mean cost, true P(cost > B)) of the chosen column per split; None where nothing was certified."""
    pool = curve["pool"]
    rng = np.random.default_rng(seed)
    escalating = np.arange(pool.shape[1], dtype=float)  # within a family, later columns escalate more
    mean, tail = pool.mean(axis=0), (pool > budget).mean(axis=0)
    out = []
    for _ in range(N_SPLITS):
        sample = pool[rng.integers(0, len(pool), curve["n_cal"])]
        try:
            j, _ = select_on_curve(sample, curve["candidates"], escalating, method, budget, ALPHA, DELTA,
                                   curve["cap_factor"], cost_max)
        except cal.CalibrationError:
            out.append(None)
            continue
        out.append((float(mean[j]), float(tail[j])))
    return out


def test_the_hard_cap_holds_on_every_recorded_request(curve):
    for j, (family, _, cap) in enumerate(curve["candidates"]):
        if family == "budget":
            assert curve["pool"][:, j].max() <= cap + 1e-9, (j, cap)


def test_budget_aware_policy_keeps_expected_cost_within_budget(curve):
    """Conformal risk control with the cap as the loss bound: E[cost] <= B.

    Where nothing is certified the request runs the cheapest tier alone (cost ~ the
    small-only column's), counted as such."""
    small_only = curve["pool"][:, 0].mean()  # threshold 1.0, no cap
    tested = 0
    for budget in curve["budgets"][1:]:
        outcomes = _splits(curve, "budget", budget, seed=int(budget * 10))
        means = np.array([small_only if o is None else o[0] for o in outcomes])
        if sum(o is not None for o in outcomes) > N_SPLITS // 2:
            tested += 1
        tolerance = 3 * means.std(ddof=1) / math.sqrt(N_SPLITS)
        assert means.mean() <= budget + tolerance, (budget, means.mean())
    assert tested >= len(curve["budgets"]) - 2  # it certifies at almost every budget, not by abstaining


def test_single_threshold_risk_control_keeps_expected_cost_within_budget(curve):
    # The uncapped threshold family needs a bound on any request's cost: the recorded
    # maximum is a stand-in here (the bench uses the analytic worst case, larger).
    cost_max = float(curve["pool"].max())
    small_only = curve["pool"][:, 0].mean()
    for budget in curve["budgets"][2:]:
        outcomes = _splits(curve, "risk", budget, seed=7 + int(budget), cost_max=cost_max)
        means = np.array([small_only if o is None else o[0] for o in outcomes])
        assert means.mean() <= budget + 3 * means.std(ddof=1) / math.sqrt(N_SPLITS), (budget, means.mean())


def test_c3po_conformal_tail_bound_holds(curve):
    """C3PO's setting: one threshold, split conformal, P(cost > B) <= alpha (marginal)."""
    for budget in curve["budgets"][1:]:
        outcomes = _splits(curve, "conformal", budget, seed=11 + int(budget))
        tails = np.array([0.0 if o is None else o[1] for o in outcomes])  # abstaining: nothing over B
        assert tails.mean() <= ALPHA + 3 * tails.std(ddof=1) / math.sqrt(N_SPLITS), (budget, tails.mean())


def test_ltt_tail_bound_holds(curve):
    """Learn-then-Test: P(true P(cost > B) > alpha) <= delta."""
    tolerance = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)
    for budget in curve["budgets"][1:]:
        outcomes = _splits(curve, "ltt", budget, seed=13 + int(budget))
        bad = sum(o is not None and o[1] > ALPHA for o in outcomes)
        assert bad / N_SPLITS <= tolerance, (budget, bad)


def test_a_cap_alone_does_not_make_the_promise(curve):
    """The check can fail: choosing the most escalating column whose calibration MEAN
    cost is <= B (no finite-sample correction) overshoots E[cost] <= B at some budget
    more than the tolerance allows, or at least lands on it on average: risk control's
    correction is what keeps the policy below the line."""
    pool, rng = curve["pool"], np.random.default_rng(3)
    overshoot = []
    for budget in curve["budgets"][1:]:
        cols = np.array([j for j, (f, _, c) in enumerate(curve["candidates"])
                         if f == "budget" and c == curve["cap_factor"] * budget])
        means = []
        for _ in range(N_SPLITS):
            sample = pool[rng.integers(0, len(pool), 20)][:, cols]
            ok = np.flatnonzero(sample.mean(axis=0) <= budget)
            means.append(pool[:, cols[ok.max()]].mean() if ok.size else pool[:, 0].mean())
        overshoot.append(np.mean(means) - budget)
    assert max(overshoot) > 0, overshoot
