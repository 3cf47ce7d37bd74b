"""cascade.budget: the budget-aware gate under the hard cap, and the accuracy-budget curve."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from fakes import FakeBackend, counting_script

import calibration as cal
from cascade import (
    Cascade,
    ConfidenceGate,
    ConfigError,
    Gate,
    GateState,
    SolveOptions,
    VerifyGate,
    decide,
    sweep,
)
from cascade.budget import (
    BudgetCurve,
    BudgetGate,
    budget_grid,
    calibrate_budget_curve,
    curve_candidates,
    fit_budget_gate,
    select_on_curve,
)
from cascade.calibrate import default_thresholds
from decoding import StepOutput

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)
EMPTY = StepOutput("", (), (), (), "delimiter", 0, 0.0)


def fake_cascade(steps=5, gate=None):
    small = FakeBackend("small", 100, counting_script(steps, confident=False))
    large = FakeBackend("large", 1000, counting_script(steps, confident=True))
    return Cascade(small, large, gate or ConfidenceGate(0.5), options=OPTIONS)


def state(budget, spent, cost, step_index=1, problem="p"):
    return GateState(problem, step_index, 0, "", EMPTY, None, budget=budget, spent=spent,
                     escalation_cost=cost)


def test_threshold_follows_what_is_left_per_remaining_step():
    gate = BudgetGate(ConfidenceGate(0.5), threshold=0.0, steps_intercept=5.0, step_cost=1.0)
    # m = 5 - 1 = 4 steps left; (100 - 20 - 3 * 1) / 20 = 3.85 escalations affordable:
    # f = 3.85 / 4, and with uniform score quantiles the threshold is 1 - f.
    assert gate.affordable_fraction(state(100, 20, 20)) == pytest.approx(3.85 / 4)
    assert gate.threshold_at(state(100, 20, 20)) == pytest.approx(1 - 3.85 / 4)
    # Poorer: fewer affordable escalations, a higher threshold; can't afford one: never.
    assert gate.threshold_at(state(100, 60, 20)) == pytest.approx(1 - (40 - 3) / 20 / 4)
    assert gate.threshold_at(state(100, 90, 20)) == math.inf
    # Rich: every step above the floor; no cap: the floor.
    assert gate.threshold_at(state(1000, 0, 20)) == 0.0
    assert dataclasses.replace(gate, threshold=0.3).threshold_at(state(None, 0, None)) == 0.3
    assert dataclasses.replace(gate, threshold=0.3).threshold_at(state(100, 20, 20)) == pytest.approx(0.3)


def test_fitted_score_quantiles_set_the_threshold():
    # Scores quantiles 0, 0.01, ..., with most drafts confident: escalating the top 20 % means
    # a threshold at the 80th percentile of the scores, not at 0.8.
    q = tuple(float(x) for x in np.linspace(0, 1, 11) ** 3)
    gate = BudgetGate(ConfidenceGate(0.5), score_quantiles=q, steps_intercept=2.0)
    # m = 1, (10 - 0) / 10 = 1 escalation: f = 1 -> the floor; 2 steps left, 1 affordable -> top half.
    assert gate.threshold_at(state(10, 0, 10, step_index=1)) == 0.0
    assert gate.threshold_at(state(10, 0, 10, step_index=0)) == pytest.approx(0.5 ** 3, abs=0.02)


def test_decide_meets_the_budget_aware_threshold():
    gate = BudgetGate(ConfidenceGate(0.5), steps_intercept=5.0)
    # 4 steps left, (100 - 40) / 20 = 3 affordable: the top 3/4 of scores, threshold 0.25.
    confident = dataclasses.replace(state(100, 40, 20), confidence=_confidence(0.99))
    unsure = dataclasses.replace(state(100, 40, 20), confidence=_confidence(0.5))
    assert gate.threshold_at(unsure) == pytest.approx(0.25)
    assert decide(gate, unsure) == (pytest.approx(0.5), True)
    assert decide(gate, confident)[1] is False
    assert decide(gate, dataclasses.replace(unsure, spent=90))[1] is False  # can't afford: never


def _confidence(min_prob):
    from cascade.gates import Confidence

    return Confidence(math.log(min_prob), min_prob, 0.0, 0.0, 1)


def test_bad_budget_gates_are_refused():
    with pytest.raises(ConfigError, match="wraps a gate"):
        BudgetGate("confidence")
    with pytest.raises(ConfigError, match="score_quantiles"):
        BudgetGate(ConfidenceGate(), score_quantiles=(0.5, 0.1))
    with pytest.raises(ConfigError, match="step_cost"):
        BudgetGate(ConfidenceGate(), step_cost=-1.0)
    with pytest.raises(ConfigError, match="wraps a gate"):
        BudgetGate(BudgetGate(ConfidenceGate()))
    with pytest.raises(ConfigError, match="resolve-mode gate hands over the whole problem"):
        BudgetGate(ConfidenceGate(mode="resolve"))


@pytest.mark.parametrize("cap", [5.0, 20.0, 40.0, 80.0, 200.0])
def test_runtime_gives_the_gate_its_budget_and_the_cap_holds(cap):
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Recording(Gate):
        threshold: float = 0.5
        mode: str = "speculate"
        probe_tokens: int = 0
        requires_verification: bool = False

        def score(self, s):
            seen.append(s)
            return 1.0 - s.confidence.min_prob

    runner = fake_cascade()
    gate = BudgetGate(Recording(), steps_intercept=6.0, step_cost=0.5)
    for problem in ("p1", "p2", "p3"):
        seen.clear()
        result = runner.solve(problem, cap, gates=[gate])
        assert result.cost.total <= cap + 1e-9
        assert seen and all(s.budget == cap and s.escalation_cost is not None and s.escalation_cost > 0
                            for s in seen)
        assert [s.step_index for s in seen] == sorted(s.step_index for s in seen)
        assert all(b.spent >= a.spent for a, b in zip(seen, seen[1:], strict=False))
        decisions = [d for step in result.steps for d in step.decisions]
        # The gate only asks for what fits: the cap never has to refuse an escalation.
        assert not any(d.capped for d in decisions)
        # The recorded threshold is the one the score met.
        assert all(d.escalated == (d.score >= d.threshold) for d in decisions)


def test_without_a_cap_it_is_the_inner_gate_at_its_floor():
    runner = fake_cascade()
    for floor in (0.2, 0.5, 0.8):
        plain = runner.solve_many(["p1", "p2", "p3"], gates=[ConfidenceGate(floor)])
        wrapped = runner.solve_many(["p1", "p2", "p3"],
                                    gates=[BudgetGate(ConfidenceGate(0.9), threshold=floor)])
        assert [r.cost.total for r in plain] == [r.cost.total for r in wrapped]
        assert [r.answer for r in plain] == [r.answer for r in wrapped]


def test_fit_reads_scores_steps_and_step_cost_without_labels():
    runner = fake_cascade(steps=4)
    gate = fit_budget_gate(runner, [f"p{i}" for i in range(8)])
    assert len(gate.score_quantiles) == 101 and list(gate.score_quantiles) == sorted(gate.score_quantiles)
    assert gate.expected_steps("p1") == pytest.approx(5.0)  # 4 steps and the answer line
    assert gate.step_cost > 0
    assert isinstance(gate.inner, ConfidenceGate)


def test_budget_grid_spans_small_to_large_and_holds_half():
    grid = budget_grid(1.4, 86.0, k=7)
    assert grid[0] == 1.4 and grid[-1] == 86.0 and 43.0 in grid and list(grid) == sorted(grid)
    with pytest.raises(ConfigError):
        budget_grid(90.0, 86.0)


def test_select_on_curve_certifies_expected_cost_with_the_cap_as_bound():
    budgets = [10.0]
    candidates = curve_candidates(budgets, [1.0, 0.0], [1.0, 0.5, 0.0], cap_factor=3.0)
    # columns: threshold 1.0, 0.0 (no cap); budget family floors 1.0, 0.5, 0.0 under cap 30
    n = 99
    costs = np.zeros((n, 5))
    costs[:, 0], costs[:, 1] = 1.0, 60.0
    costs[:, 2], costs[:, 3], costs[:, 4] = 1.0, 9.0, 12.0
    objective = np.arange(5, dtype=float)
    j, statement = select_on_curve(costs, candidates, objective, "budget", 10.0, 0.1, 0.05, 3.0, 100.0)
    # floor 0.5: 0.99 * 9 + 30 / 100 = 9.21 <= 10; floor 0.0: 0.99 * 12 + 0.3 > 10
    assert j == 3 and "E[cost] <= 10" in statement and "30" in statement
    assert select_on_curve(costs, candidates, objective, "risk", 10.0, 0.1, 0.05, 3.0, 100.0)[0] == 0
    with pytest.raises(cal.CalibrationError):
        select_on_curve(costs, candidates, objective, "budget", 0.5, 0.1, 0.05, 3.0, 100.0)
    with pytest.raises(ConfigError, match="method"):
        select_on_curve(costs, candidates, objective, "nope", 10.0, 0.1, 0.05, 3.0, 100.0)


def test_curve_on_fakes_certifies_and_serves():
    runner = fake_cascade()
    problems = [f"p{i}" for i in range(30)]
    curve = calibrate_budget_curve(runner, problems, budgets=[5.0, 20.0, 60.0], cap_factor=2.0,
                                   thresholds=default_thresholds(5), budget_thresholds=(1.0, 0.5, 0.0))
    assert {p.method for p in curve.points} == {"budget", "resolve", "risk", "conformal", "ltt"}
    for method in ("budget", "resolve"):
        certified = [p for p in curve.points if p.method == method and p.index is not None]
        assert certified and all(p.cap == 2.0 * p.budget for p in certified)
        for p in certified:
            bound = 30 / 31 * p.mean_cost + p.cap / 31
            assert bound <= p.budget + 1e-9 and 0 <= p.agreement <= 1
            gates, cap = curve.policy(method, p.budget)
            assert cap == p.cap and gates[0].threshold == p.threshold
            assert isinstance(gates[0], BudgetGate) if method == "budget" else gates[0].mode == "resolve"
            runs = runner.solve_many(problems, cap, gates=gates)
            assert np.allclose([r.cost.total for r in runs], curve.swept.costs[:, p.index])
            assert [r.answer for r in runs] == [row[p.index] for row in curve.swept.answers]
    resolve_columns = [j for j, (family, _, _) in enumerate(curve.candidates) if family == "resolve"]
    assert (curve.swept.costs[:, resolve_columns] > curve.swept.costs[:, [0]]).any()  # some columns re-solve
    assert "budget" in curve.summary()
    # Its JSON reads back into the same policies (what `cascade bench --curve` serves).
    loaded = BudgetCurve.from_json(curve.to_json())
    assert loaded.to_json() == curve.to_json() and loaded.n_problems == 30
    for p in (q for q in curve.points if q.index is not None):
        assert repr(loaded.policy(p.method, p.budget)) == repr(curve.policy(p.method, p.budget))
    bad = curve.to_json()
    bad["points"][next(i for i, q in enumerate(curve.points) if q.index is not None)]["threshold"] = 0.123
    with pytest.raises(ConfigError, match="does not match it"):
        BudgetCurve.from_json(bad)
    with pytest.raises(ConfigError, match="not an accuracy-budget curve"):
        BudgetCurve.from_json({"format": "something else"})
    with pytest.raises(ConfigError, match="malformed"):
        BudgetCurve.from_json(curve.to_json() | {"candidates": [[1.0]]})
    with pytest.raises(ConfigError, match="cap_factor"):
        calibrate_budget_curve(runner, problems, budgets=[5.0], cap_factor=0.5)
    with pytest.raises(ConfigError, match="methods"):
        calibrate_budget_curve(runner, problems, budgets=[5.0], methods=("magic",))
    verify = Cascade(*runner.models, VerifyGate(0.5), options=runner.options)
    with pytest.raises(ConfigError, match="method 'resolve' needs a gate"):
        calibrate_budget_curve(verify, problems, budgets=[5.0], methods=("resolve",))


def test_sweep_shares_calls_across_branches_whose_model_state_matches():
    # The fake large model writes every step exactly as the small one drafts it, so
    # branches that parted over an escalation have the same contexts again, and the
    # small model's session in each has seen the same calls: its drafts are one call
    # each, however many thresholds are swept.
    runner = fake_cascade(steps=5)
    grid = [(t,) for t in sorted(default_thresholds(11), reverse=True)]
    single = fake_cascade(steps=5)
    single.solve("p1", gates=[ConfidenceGate(1.0)])
    swept_runner = fake_cascade(steps=5)
    swept = sweep(swept_runner, ["p1"], grid)
    assert swept_runner.models[0].calls == single.models[0].calls
    for j, (t,) in enumerate(grid):
        assert swept.costs[0, j] == runner.solve("p1", gates=[ConfidenceGate(t)]).cost.total


def resolve_curve() -> tuple[Cascade, BudgetCurve]:
    """A fake cascade served in resolve mode and its resolve curve (20 problems, budgets 20 and
    60, cap 2 x B, four thresholds)."""
    runner = fake_cascade(gate=ConfidenceGate(0.5, signal="mean_prob", mode="resolve"))
    curve = calibrate_budget_curve(runner, [f"p{i}" for i in range(20)], budgets=[20.0, 60.0],
                                   methods=("resolve",), cap_factor=2.0,
                                   resolve_thresholds=(1.0, 0.6, 0.3, 0.0))
    return runner, curve


def test_a_cascade_served_in_resolve_mode_calibrates_its_resolve_curve():
    _, curve = resolve_curve()
    assert curve.gate.inner.mode == "speculate"  # the fitted BudgetGate holds the step-level form
    assert [c[0] for c in curve.candidates] == ["resolve"] * 8  # only the family its method reads
    gates, _ = curve.policy("resolve", 60.0)
    assert gates[0].mode == "resolve"


def test_a_paced_policy_starts_where_it_was_certified_and_keeps_its_ceiling():
    runner, curve = resolve_curve()
    certified = curve.point("resolve", 60.0)
    paced = curve.paced("resolve", 70.0, step=1.0)  # the largest grid budget <= 70
    assert paced.budget == 60.0 and paced.column == certified.index
    for i in range(40):
        gates, cap = paced.policy()
        assert cap == 120.0 and gates[0].mode == "resolve"
        result = runner.solve(f"q{i}", cap, gates=gates)
        assert result.cost.total <= cap
        paced.observe(result)
    assert paced.pacer.n == 40 and paced.mean_cost <= paced.bound()
    assert "40 requests" in paced.statement()
    with pytest.raises(ConfigError, match="capped family"):
        curve.paced("ltt", 60.0)
    with pytest.raises(ConfigError, match="below every budget"):
        curve.paced("resolve", 5.0)
    with pytest.raises(ConfigError, match="no 'budget' columns"):
        curve.paced("budget", 60.0)


def test_a_paced_policy_with_a_state_file_resumes_across_restarts(tmp_path):
    runner, curve = resolve_curve()
    state = tmp_path / "pacing.json"
    whole = curve.paced("resolve", 60.0, step=1.0)
    first = curve.paced("resolve", 60.0, step=1.0, state_file=state)
    assert state.exists()  # written at once: an unwritable place fails before any request
    results = [runner.solve(f"q{i}", 120.0, gates=whole.policy()[0]) for i in range(30)]
    for result in results[:12]:
        whole.observe(result)
        first.observe(result)
    second = curve.paced("resolve", 60.0, step=1.0, state_file=state)  # a restart
    assert second.pacer == first.pacer and second.column == whole.column
    for result in results[12:]:
        whole.observe(result)
        second.observe(result)
    assert second.pacer == whole.pacer and second.bound() == whole.bound() and second.pacer.n == 30
    assert not list(tmp_path.glob("*.partial"))


def test_a_paced_policy_restarted_after_a_crash_charges_the_requests_it_was_running(tmp_path):
    runner, curve = resolve_curve()
    state = tmp_path / "pacing.json"
    first = curve.paced("resolve", 60.0, step=1.0, state_file=state)
    first.spend_keep_interval = 0.0  # every spend kept (the default keeps one per 50 ms)
    first.observe(runner.solve("q0", 120.0, gates=first.policy()[0]))
    ticket, gates, cap = first.begin()
    first.spend(ticket, 45.0)
    first.spend(ticket, 95.0)  # then the process dies: no observe, no clean shutdown
    second = curve.paced("resolve", 60.0, step=1.0, state_file=state)
    assert second.pacer.n == 2 and second.pacer.total_cost == first.pacer.total_cost + 95.0
    assert second.mean_cost <= second.bound()
    assert json.loads(state.read_text())["pacer"]["running"] == []  # charged once, not again


def test_a_paced_policy_keeps_running_spend_at_most_once_per_interval(tmp_path):
    _, curve = resolve_curve()
    state = tmp_path / "pacing.json"
    paced = curve.paced("resolve", 60.0, step=1.0, state_file=state)
    paced.spend_keep_interval = 3600.0
    ticket, _, _ = paced.begin()
    paced.spend(ticket, 30.0)
    assert json.loads(state.read_text())["pacer"]["running"] == []  # within the interval: not yet
    other, _, _ = paced.begin()
    paced.observe(10.0, other)  # a finished request is kept at once, with what runs
    assert json.loads(state.read_text())["pacer"]["running"] == [[paced.pacer.running[ticket][0], 30.0]]


@pytest.mark.parametrize("kwargs, content, match", [
    ({}, "{not json", "not readable as JSON"),
    ({}, '{"format": "other"}', "not a pacing state file"),
    ({"step": 3.0}, None, "step 1 "),
    ({"budget": 20.0}, None, "another family"),
])
def test_a_pacing_state_that_does_not_fit_is_refused_with_its_file_named(tmp_path, kwargs, content, match):
    _, curve = resolve_curve()
    state = tmp_path / "pacing.json"
    curve.paced("resolve", 60.0, step=1.0, state_file=state).observe(50.0)
    if content is not None:
        state.write_text(content)
    settings = {"budget": 60.0, "step": 1.0} | kwargs
    with pytest.raises(ConfigError, match=match) as error:
        curve.paced("resolve", settings["budget"], step=settings["step"], state_file=state)
    assert str(state) in str(error.value)
    with pytest.raises(ConfigError, match="cannot write"):
        curve.paced("resolve", 60.0, state_file=tmp_path / "missing" / "pacing.json")
