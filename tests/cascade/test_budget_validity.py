"""The accuracy-budget curve's promises, checked empirically over many random splits.

The traces are real runs of the runtime (step machine, hard cap, BudgetGate) on scripted
backends whose problems differ in length (2-7 steps) and in how unsure the small model
is, swept once over the curve's columns: the confidence gate at each threshold without a
cap, and per budget B the budget-aware gate at each floor under the hard cap
cap_factor * B. (`bench.budget_curve` writes the same arrays for the embedded pair,
bench/results/budget_curve/sweeps.npz, when it is run.) The pooled problems are the
population: each split draws a calibration set from them i.i.d. (with replacement), so
the true mean cost and true P(cost > B) of a chosen column are the pool's, known exactly.

In every split the most escalating certified column is taken (the costliest choice a
guarantee must cover). Tolerances: a mean over S splits is compared with its bound plus
3 standard errors (sd / sqrt(S)); a count of bad splits, Binomial(S, p <= delta), with
delta + 3 sqrt(delta (1 - delta) / S). A valid procedure exceeds either with probability
about 0.1 % (one-sided 3 sigma).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from fakes import FakeBackend

import calibration as cal
from cascade import Cascade, ConfidenceGate, SolveOptions
from cascade.budget import BudgetGate, curve_candidates, select_on_curve, sweep_curve, uncapped_cost_max

N_SPLITS = 300
N_POOL = 400
N_CAL = 100
ALPHA, DELTA = 0.1, 0.05
BUDGETS = (10.0, 20.0, 30.0, 40.0)
CAP_FACTOR = 3.0


def _script(confident: bool):
    """Problem-dependent length (2-7 steps) and confidence."""
    def script(problem: str, context: str):
        steps = 2 + zlib.crc32(problem.encode()) % 6
        k = context.count("\n")
        text = (f"#### {steps}" if k >= steps else f"v{k}={k * 7 % 10}") + "\n"
        wobble = (zlib.crc32((problem + context).encode()) % 100) / 100.0
        return text, [-0.01 if confident else -0.01 - 2.5 * wobble ** 2] * len(text)
    return script


@pytest.fixture(scope="module")
def curve():
    small = FakeBackend("small", 100, _script(False))
    large = FakeBackend("large", 1000, _script(True))
    runner = Cascade(small, large, ConfidenceGate(0.5),
                     options=SolveOptions(max_steps=10, max_step_tokens=12))
    gate = BudgetGate(ConfidenceGate(0.5), steps_intercept=5.5, step_cost=0.2)
    candidates = curve_candidates(BUDGETS, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0], [1.0, 0.6, 0.3, 0.0], CAP_FACTOR,
                                  resolve_thresholds=[1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0])
    problems = [f"q{i}-" + "x" * (i % 13) for i in range(N_POOL)]
    swept = sweep_curve(runner, problems, candidates, gate)
    assert np.ptp(swept.costs[:, -1]) > 0  # problems differ in cost
    return {"pool": swept.costs, "candidates": candidates, "budgets": list(BUDGETS), "cap_factor": CAP_FACTOR,
            "n_cal": N_CAL, "cost_max": uncapped_cost_max(runner, problems)}


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


def test_the_hard_cap_holds_on_every_request(curve):
    for j, (family, _, cap) in enumerate(curve["candidates"]):
        if family in ("budget", "resolve"):
            assert curve["pool"][:, j].max() <= cap + 1e-9, (j, cap)
    assert curve["pool"].max() <= curve["cost_max"]  # the uncapped bound risk control uses is one


def test_budget_aware_policy_keeps_expected_cost_within_budget(curve):
    """Conformal risk control with the cap as the loss bound: E[cost] <= B.
    Where nothing is certified the request runs the cheapest tier alone."""
    small_only = curve["pool"][:, 0].mean()  # threshold 1.0, no cap
    for budget in curve["budgets"]:
        outcomes = _splits(curve, "budget", budget, seed=int(budget * 10))
        assert sum(o is not None for o in outcomes) > N_SPLITS // 2, budget  # certifies, not abstains
        means = np.array([small_only if o is None else o[0] for o in outcomes])
        assert means.mean() <= budget + 3 * means.std(ddof=1) / math.sqrt(N_SPLITS), (budget, means.mean())


def test_resolve_policy_keeps_expected_cost_within_budget(curve):
    """The problem-level re-solve under the same cap and risk control: E[cost] <= B."""
    small_only = curve["pool"][:, 0].mean()
    certified = 0
    for budget in curve["budgets"]:
        outcomes = _splits(curve, "resolve", budget, seed=3 + int(budget * 10))
        certified += sum(o is not None for o in outcomes)
        means = np.array([small_only if o is None else o[0] for o in outcomes])
        assert means.mean() <= budget + 3 * means.std(ddof=1) / math.sqrt(N_SPLITS), (budget, means.mean())
    assert certified > N_SPLITS  # it certifies re-solving somewhere, not only abstains


def test_single_threshold_risk_control_keeps_expected_cost_within_budget(curve):
    small_only = curve["pool"][:, 0].mean()
    for budget in curve["budgets"]:
        outcomes = _splits(curve, "risk", budget, seed=7 + int(budget), cost_max=curve["cost_max"])
        means = np.array([small_only if o is None else o[0] for o in outcomes])
        assert means.mean() <= budget + 3 * means.std(ddof=1) / math.sqrt(N_SPLITS), (budget, means.mean())


def test_c3po_conformal_tail_bound_holds(curve):
    """C3PO's setting: one threshold, split conformal, P(cost > B) <= alpha (marginal)."""
    for budget in curve["budgets"]:
        outcomes = _splits(curve, "conformal", budget, seed=11 + int(budget))
        tails = np.array([0.0 if o is None else o[1] for o in outcomes])  # abstaining: nothing over B
        assert tails.mean() <= ALPHA + 3 * tails.std(ddof=1) / math.sqrt(N_SPLITS), (budget, tails.mean())


def test_ltt_tail_bound_holds(curve):
    """Learn-then-Test: P(true P(cost > B) > alpha) <= delta."""
    tolerance = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)
    for budget in curve["budgets"]:
        outcomes = _splits(curve, "ltt", budget, seed=13 + int(budget))
        bad = sum(o is not None and o[1] > ALPHA for o in outcomes)
        assert bad / N_SPLITS <= tolerance, (budget, bad)
