"""Cascades of more than two models: N = 2 as the two-model case, per-tier cost, the hard
cap with three tiers and independent gates, the K-ary memoized sweep, calibration of
threshold vectors, and a three-model run on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeBackend, counting_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calibration as cal
from cascade import (
    AlwaysLarge,
    AlwaysSmall,
    Cascade,
    ConfidenceGate,
    ConfigError,
    SolveOptions,
    VerifyGate,
    calibrate,
    sweep,
)
from decoding import HFBackend

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)


def trio(steps: int = 5) -> list[FakeBackend]:
    """Small and medium are unsure in a context-dependent way; large is always sure."""
    return [FakeBackend("small", 100, counting_script(steps, confident=False)),
            FakeBackend("medium", 1000, counting_script(steps, confident=False)),
            FakeBackend("large", 10000, counting_script(steps, confident=True))]


def _gate(kind: str, threshold: float):
    if kind == "verify":
        return VerifyGate(threshold)
    if kind == "small":
        return AlwaysSmall()
    if kind == "large":
        return AlwaysLarge()
    return ConfidenceGate(threshold, mode=kind, probe_tokens=2)


GATE_KINDS = ["route", "speculate", "verify", "small", "large"]


@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("budget", [None, 25.0, 400.0])
def test_two_models_through_models_reproduce_the_small_large_traces(kind, budget):
    gate = _gate(kind, 0.4)
    problems = [f"p{i}" for i in range(4)]

    def models():
        return (FakeBackend("small", 100, counting_script(4, confident=False)),
                FakeBackend("large", 1000, counting_script(4, confident=True)))

    small, large = models()
    named = Cascade(small, large, gate, options=OPTIONS).solve_many(problems, budget)
    listed = Cascade(models=list(models()), gates=[gate], options=OPTIONS).solve_many(problems, budget)
    assert [r.to_json() for r in named] == [r.to_json() for r in listed]
    assert all(r.tier_names == ("small", "large") for r in listed)


def test_three_tier_cost_is_the_sum_over_steps_and_tiers():
    models = trio()
    cascade = Cascade(models=models, gates=[ConfidenceGate(0.5), ConfidenceGate(0.6)], options=OPTIONS)
    results = cascade.solve_many([f"q{i}" for i in range(8)])
    authors = {s.tier for r in results for s in r.steps}
    assert authors == {0, 1, 2}  # the thresholds make every tier write some steps
    for result in results:
        assert len(result.cost.per_tier) == 3
        assert result.cost.total == pytest.approx(sum(s.cost for s in result.steps))
        assert result.cost.total == pytest.approx(sum(u.cost for u in result.cost.per_tier))
        for tier in range(3):
            per_step = [s.usage[tier] for s in result.steps]
            usage = result.cost.per_tier[tier]
            assert usage.generated_tokens == sum(u.generated_tokens for u in per_step)
            assert usage.prefill_tokens == sum(u.prefill_tokens for u in per_step)
            prices = cascade.cost_model.prices[tier]
            assert usage.cost == pytest.approx(prices.input * usage.prefill_tokens
                                               + prices.output * usage.generated_tokens)
        # Each step's decisions climb one tier at a time and end at the step's author.
        for step in result.steps:
            assert [d.tier for d in step.decisions] == list(range(len(step.decisions)))
            assert step.tier == sum(d.escalated for d in step.decisions)
        assert sum(result.tier_rates) == pytest.approx(1.0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.floats(0, 2000), t1=st.floats(0, 1), t2=st.floats(0, 1),
       kind1=st.sampled_from(GATE_KINDS), kind2=st.sampled_from(GATE_KINDS), steps=st.integers(1, 6))
def test_hard_cap_is_never_exceeded_with_three_tiers_and_independent_gates(budget, t1, t2, kind1, kind2,
                                                                           steps):
    cascade = Cascade(models=trio(steps), gates=[_gate(kind1, t1), _gate(kind2, t2)], options=OPTIONS)
    for result in cascade.solve_many(["cap-a", "cap-b"], budget=budget):
        assert result.cost.total <= budget + 1e-9
        assert sum(u.cost for u in result.cost.per_tier) <= budget + 1e-9
        if result.stop_reason == "budget":
            assert result.cap_intervened


GRID = cal.product_grid([[0.9, 0.6, 0.3, 0.0], [0.8, 0.4, 0.0]])  # (12, 2) threshold vectors


def test_sweep_over_threshold_vectors_equals_independent_three_tier_runs():
    cascade = Cascade(models=trio(), gates=[ConfidenceGate(0.5), ConfidenceGate(0.5)], options=OPTIONS)
    problems = [f"s{i}" for i in range(8)]
    swept = sweep(cascade, problems, GRID)
    for j, (t1, t2) in enumerate(GRID):
        runs = [cascade.solve(p, gates=[ConfidenceGate(t1), ConfidenceGate(t2)]) for p in problems]
        assert np.array_equal(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]
        assert np.array_equal(swept.escalation[:, j], [r.escalation_rate for r in runs])
    reference = [cascade.solve(p, gates=[AlwaysLarge(), AlwaysLarge()]) for p in problems]
    assert list(swept.reference_costs) == [r.cost.total for r in reference]
    # Shared prefixes are run once: far fewer tokens than 12 independent runs.
    assert swept.executed_tokens < 0.5 * swept.independent_tokens


def test_calibrate_a_threshold_vector_along_grid_paths(tmp_path):
    cascade = Cascade(models=trio(), gates=[ConfidenceGate(0.5), ConfidenceGate(0.5)], options=OPTIONS)
    problems = [f"c{i}" for i in range(60)]
    swept = sweep(cascade, problems, GRID)
    budget = float(np.quantile(swept.costs[:, 5], 0.95))
    result = calibrate(cascade, problems, budget, alpha=0.2, delta=0.2, candidates=GRID, swept=swept)
    paths = cal.grid_paths(GRID)
    assert result.curves["paths"] == [p.tolist() for p in paths] and len(paths) == 3
    selection = cal.select_ltt_paths(swept.costs, budget, 0.2, 0.2, paths, thresholds=GRID)
    entry = result.entries[0]
    assert entry["certified"] == list(selection.certified)
    best = cal.choose_by_objective(selection, swept.agreement.mean(axis=0))
    assert entry["index"] == best and entry["thresholds"] == GRID[best].tolist()
    assert "Bonferroni over paths" in entry["statement"]
    gates = result.gates_for(budget)
    assert [g.threshold for g in gates] == GRID[best].tolist()
    # Served from the file, thresholds looked up per budget; the cap still holds.
    served = Cascade.from_calibration(result.save(tmp_path / "trio.json"), models=trio(), options=OPTIONS)
    outcome = served.solve("c0", budget=budget)
    assert outcome.cost.total <= budget + 1e-9
    # An explicit single path is plain fixed-sequence LTT along it.
    diagonal = [0, 4, 8, 11]
    one = calibrate(cascade, problems, budget, alpha=0.2, delta=0.2, candidates=GRID, swept=swept,
                    paths=[diagonal])
    assert one.entries[0]["certified"] == list(
        cal.select_ltt(swept.costs, budget, 0.2, 0.2, diagonal).certified)


def test_calibrate_vector_errors_are_clear():
    cascade = Cascade(models=trio(), gates=[ConfidenceGate(0.5), ConfidenceGate(0.5)], options=OPTIONS)
    problems = [f"e{i}" for i in range(30)]
    swept = sweep(cascade, problems, GRID)
    with pytest.raises(ConfigError, match="method 'conformal' needs one ordered path"):
        calibrate(cascade, problems, 500.0, method="conformal", candidates=GRID, swept=swept)
    with pytest.raises(ConfigError, match="threshold vectors of length 2"):
        calibrate(cascade, problems, 500.0, candidates=[(0.5,)], swept=swept)
    with pytest.raises(ConfigError, match=r"paths must be non-empty lists of candidate indices in \[0, 11\]"):
        calibrate(cascade, problems, 500.0, candidates=GRID, swept=swept, paths=[[0, 12]])


def test_three_tiny_random_models_end_to_end(tiny_dirs):
    models = [HFBackend.from_pretrained(d, step_delimiter="\n") for d in tiny_dirs]
    options = SolveOptions(max_steps=4, max_step_tokens=6)
    cascade = Cascade(models=models, gates=[ConfidenceGate(0.5), ConfidenceGate(0.7)], options=options)
    problems = ["a=1;?a", "a=7;b=a+2;?b", "a=3;b=a*2;c=b-1;?c"]
    first = cascade.solve_many(problems, budget=150)
    second = [cascade.solve(p, budget=150) for p in problems]
    assert [r.to_json() | {"cost": None, "steps": None} for r in first] == \
        [r.to_json() | {"cost": None, "steps": None} for r in second]
    assert [[s.text for s in r.steps] for r in first] == [[s.text for s in r.steps] for r in second]
    for result in first:
        assert result.tier_names == ("small", "medium", "large")
        assert result.cost.total <= 150 + 1e-9 and len(result.cost.per_tier) == 3
    # The K-ary sweep forks three KV caches and matches independent runs exactly.
    grid = cal.product_grid([[0.9, 0.3], [0.8, 0.2]])
    swept = sweep(cascade, problems[:2], grid)
    for j, (t1, t2) in enumerate(grid):
        runs = [cascade.solve(p, gates=[ConfidenceGate(t1), ConfidenceGate(t2)]) for p in problems[:2]]
        assert np.allclose(swept.costs[:, j], [r.cost.total for r in runs])
        assert [row[j] for row in swept.answers] == [r.answer for r in runs]
    assert all(not m._sessions for m in models)


@pytest.mark.parametrize("argv, message", [
    (["--models", "embedded:small,embedded:large", "--gates", "confidence@0.3,confidence@0.5"],
     "--gates names 2 gate(s) for 2 models; 2 models need 1"),
    (["--models", "a,b,c", "--gates", "confidence@0.3"],
     "--gates names 1 gate(s) for 3 models; 3 models need 2"),
    (["--gates", "confidence@0.3,verify@x", "--models", "a,b,c"], "bad threshold in --gates item 'verify@x'"),
    (["--gates", "nope@0.3", "--models", "a,b"], "unknown gate 'nope'"),
    (["--gates", "confidence@0.3", "--gate", "verify"], "give --gate or --gates, not both"),
    (["--gates", "confidence", "--threshold", "0.2"], "with --gates write NAME@THRESHOLD"),
    (["--models", "embedded:small,/some/dir"], "embedded:<tier> models cannot be mixed"),
])
def test_cli_gates_errors_are_one_clear_line(argv, message, capsys):
    from app.cli import main

    assert main(["solve", "a=1;?a", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_gates_reach_every_position_of_an_embedded_cascade(capsys):
    from app.cli import main

    assert main(["solve", "a=17;b=a+3;?b", "--models", "embedded:small,embedded:large",
                 "--gates", "always-large", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["tier_names"] == ["small", "large"] and result["tier_rates"] == [0.0, 1.0]


def test_bench_policy_with_one_threshold_per_gate():
    from bench.harness import BenchError, _build_policies, parse_policies

    specs = parse_policies("confidence@0.3/0.6,verify@0.5,small", dataset="embedded")
    assert [s.label for s in specs] == ["confidence@0.3/0.6", "verify@0.5", "small"]
    assert specs[0].threshold == (0.3, 0.6)
    cascade = Cascade(models=trio(), gates=[ConfidenceGate(0.5), ConfidenceGate(0.5)], options=OPTIONS)
    built = _build_policies(specs, cascade, calibration=None, budget=None, signal="min_prob",
                            mode="speculate")
    assert [g.threshold for g in built[0].gates] == [0.3, 0.6]
    assert [g.threshold for g in built[1].gates] == [0.5, 0.5]
    two = Cascade(models=trio()[:2], gates=[ConfidenceGate(0.5)], options=OPTIONS)
    with pytest.raises(BenchError, match="gives 2 thresholds for 2 models, which have 1 gate"):
        _build_policies(specs[:1], two, calibration=None, budget=None, signal="min_prob", mode="speculate")
    with pytest.raises(BenchError, match="not a number"):
        parse_policies("confidence@0.3/x", dataset="embedded")


def test_trio_report_pareto_front_matched_accuracy_and_ship_rule():
    from bench.trio_report import _ship_decision, matched_accuracy, pareto_front

    assert pareto_front([(3, 0.9), (1, 0.5), (2, 0.95), (2, 0.6), (4, 0.95)]) == [1, 2]
    summary = {"a1": {"accuracy": 0.92, "mean_cost": 50, "mean_wall_seconds": 0.5},
               "a2": {"accuracy": 0.97, "mean_cost": 70, "mean_wall_seconds": 0.8},
               "b1": {"accuracy": 0.95, "mean_cost": 60, "mean_wall_seconds": 0.4},
               "c1": {"accuracy": 0.96, "mean_cost": 40, "mean_wall_seconds": 0.9}}
    families = {"small->large": ["a1", "a2"], "medium->large": ["b1"], "small->medium->large": ["c1"]}
    by_cost = matched_accuracy(summary, families, [0.9, 0.95, 0.97], "mean_cost")
    by_wall = matched_accuracy(summary, families, [0.9, 0.95, 0.97], "mean_wall_seconds")
    assert by_cost["0.9"]["small->large"]["policy"] == "a1"
    assert by_cost["0.95"]["medium->large"]["policy"] == "b1"
    assert by_cost["0.97"]["small->medium->large"] is None
    decision = _ship_decision(by_cost, by_wall)
    # 0.9 and 0.95: c1 is cheaper; 0.97: only a two-tier cascade reaches it -> no ship.
    assert decision["targets_compared"] == ["0.9", "0.95", "0.97"]
    assert decision["three_tier_wins"] == [True, True, False] and decision["ship"] is False
