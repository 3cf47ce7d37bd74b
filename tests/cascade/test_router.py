"""The advantage router: features, data collection (resumable), training, the saved file,
and AdvantageGate in the runtime (hidden states requested, hard cap held)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
from fakes import FakeBackend, counting_script, replayed_drafts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import main as cli_main
from cascade import AdvantageGate, Cascade, ConfigError, SolveOptions, make_gate
from cascade.gates import AdvantageModel, Confidence, GateState
from cascade.router import (
    FeatureSpec,
    Router,
    RouterDataset,
    RouterFileError,
    collect_router_data,
    load_router,
    load_router_data,
    step_features,
    train_router,
)
from decoding import HFBackend, ModelInfo, ScoreRequest, StepOutput, StepRequest

OPTIONS = SolveOptions(max_steps=10, max_step_tokens=12)
SCALARS_ONLY = FeatureSpec(hidden_size=0, projection_dim=0)


def _output(logprobs, hidden=None) -> StepOutput:
    text = "x" * len(logprobs)
    return StepOutput(text, tuple(range(len(text))), tuple(logprobs), tuple(0.2 for _ in text),
                      "delimiter", 3, 0.0, hidden)


def test_features_are_deterministic_and_named_in_order():
    spec = FeatureSpec(hidden_size=8, projection_dim=3, projection_seed=5)
    hidden = tuple(float(x) for x in np.linspace(-1, 1, 8))
    output = _output([-0.1, -2.0, -0.3], hidden)
    confidence = Confidence.of(output, 4)
    first = step_features(spec, spec.projection(), confidence, 2, output)
    again = step_features(spec, FeatureSpec(8, 3, 5).projection(), Confidence.of(output, 4), 2, output)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (spec.size,) == (9,)
    assert first[:6] == pytest.approx([np.mean([-0.1, -2.0, -0.3]), -2.0, 0.2, np.mean([-0.1, -2.0, -0.3]),
                                       2.0, 3.0])
    np.testing.assert_allclose(first[6:], np.asarray(hidden) @ spec.projection())
    other = step_features(FeatureSpec(8, 3, 6), FeatureSpec(8, 3, 6).projection(), confidence, 2, output)
    assert not np.allclose(other[6:], first[6:])  # the seed picks the projection
    with pytest.raises(ConfigError, match="hidden state"):
        step_features(spec, spec.projection(), confidence, 2, _output([-0.1]))
    with pytest.raises(ConfigError, match="size 8"):
        step_features(spec, spec.projection(), confidence, 2, _output([-0.1], hidden=(0.0,) * 5))


def test_hidden_state_features_are_deterministic_on_a_real_model(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    spec = FeatureSpec(hidden_size=small.model.config.hidden_size, projection_dim=4)
    rows = []
    for request_id in ("r1", "r2"):
        out = small.next_steps([StepRequest(request_id, "a=3;?a", "", 6, return_hidden=True)])[0]
        rows.append(step_features(spec, spec.projection(), Confidence.of(out, 4), 0, out))
    np.testing.assert_array_equal(rows[0], rows[1])


def _synthetic(n_problems=200, steps=5, separable=True, seed=0) -> RouterDataset:
    rng = np.random.default_rng(seed)
    n = n_problems * steps
    x = rng.standard_normal((n, SCALARS_ONLY.size))
    signal = x[:, 0] + 0.5 * x[:, 3]
    better = signal + (0.05 if separable else 3.0) * rng.standard_normal(n) > 0.8
    small_score = np.where(better, 0.0, rng.uniform(0.5, 1.0, n))
    large_score = np.where(better, 1.0, small_score - rng.uniform(0, 0.5, n))
    return RouterDataset(features=x, small_score=small_score, large_score=large_score,
                         group=np.repeat(np.arange(n_problems), steps),
                         step_index=np.tile(np.arange(steps), n_problems),
                         spec=SCALARS_ONLY,
                         models=({"name": "s", "fingerprint": "s"}, {"name": "l", "fingerprint": "l"}),
                         scorer="synthetic")


def test_training_learns_a_separable_signal():
    router = train_router(_synthetic(), tau=0.0, seed=1)
    m = router.metrics
    assert m.auroc > 0.9
    assert m.captured_advantage > 0.8
    assert m.n_train + m.n_heldout == 1000 and 0.1 < m.positive_rate_heldout < 0.4
    noisy = train_router(_synthetic(separable=False), tau=0.0, seed=1)
    assert noisy.metrics.auroc < router.metrics.auroc  # the metric measures something


def test_one_class_data_fails_loudly():
    data = _synthetic()
    with pytest.raises(ConfigError, match="both classes"):
        train_router(data, tau=5.0)  # nothing is better by more than 5
    with pytest.raises(ConfigError, match="both classes"):
        train_router(data, tau=-5.0)  # everything is
    with pytest.raises(ConfigError, match="holdout"):
        train_router(data, holdout=1.0)


def test_save_load_round_trip_and_refusal_for_other_models(tmp_path):
    data = _synthetic()
    router = train_router(data, tau=0.0)
    path = router.save(tmp_path / "router.pt")
    loaded = load_router(path)
    np.testing.assert_allclose(loaded.probability(data.features), router.probability(data.features))
    assert loaded.metrics == router.metrics and loaded.spec == router.spec and loaded.tau == 0.0
    assert repr(loaded) == repr(router)
    ok = [ModelInfo("s", "s", 1, "\n"), ModelInfo("l", "l", 2, "\n")]
    load_router(path, models=ok)
    with pytest.raises(RouterFileError, match="trained for"):
        load_router(path, models=[ModelInfo("s", "other", 1, "\n"), ok[1]])
    with pytest.raises(RouterFileError, match="trained for"):
        load_router(path, models=ok[::-1])
    (tmp_path / "junk.pt").write_text("not a router")
    with pytest.raises(RouterFileError, match="not a router"):
        load_router(tmp_path / "junk.pt")
    with pytest.raises(RouterFileError, match="no router"):
        load_router(tmp_path / "missing.pt")
    npz = data.save(tmp_path / "data.npz")
    again = load_router_data(npz)
    np.testing.assert_array_equal(again.features, data.features)
    np.testing.assert_array_equal(again.group, data.group)


class _DigitScorer:
    """Scores a step by whether it ends in an even digit: deterministic, both classes."""

    name = "digits"

    def __init__(self):
        self.calls = 0

    def score(self, problem, context, candidates):
        self.calls += 1
        return [1.0 if c and c[-1] in "02468" else 0.0 for c in candidates]


def _fake_pair(steps=3):
    def wobbly(problem, context):
        text, logprobs = counting_script(steps, confident=False)(problem, context)
        k = context.count("\n")
        if (len(problem) + k) % 2 and "=" in text:
            return text.replace("=", "=1", 1), logprobs[:1] + logprobs
        return text, logprobs
    return FakeBackend("small", 100, wobbly), FakeBackend("large", 1000, counting_script(steps))


def test_collection_is_resumable_and_refuses_other_settings(tmp_path):
    small, large = _fake_pair()
    problems = [f"p{k}" for k in range(5)]
    path = tmp_path / "rows.jsonl"
    first = collect_router_data(small, large, problems[:3], _DigitScorer(), path, max_steps=6,
                                max_step_tokens=12)
    assert sorted(set(first.group.tolist())) == [0, 1, 2] and first.spec == FeatureSpec(0, 0)
    calls = small.calls
    with path.open("ab") as handle:
        handle.write(b'{"index": 3, "probl')  # a killed run's half-written line
    scorer = _DigitScorer()
    whole = collect_router_data(small, large, problems, scorer, path, max_steps=6, max_step_tokens=12)
    assert sorted(set(whole.group.tolist())) == [0, 1, 2, 3, 4]
    assert small.calls - calls == sum(whole.group >= 3)  # only the two new problems ran
    np.testing.assert_array_equal(whole.features[: len(first)], first.features)
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    reread = load_router_data(path)
    np.testing.assert_array_equal(reread.features, whole.features)
    np.testing.assert_array_equal(reread.advantage, whole.advantage)
    with pytest.raises(RouterFileError, match="other settings"):
        collect_router_data(small, large, problems, _DigitScorer(), path, max_steps=3, max_step_tokens=12)
    with pytest.raises(RouterFileError, match="not the one"):
        collect_router_data(small, large, ["other"] + problems[1:], _DigitScorer(), path, max_steps=6,
                            max_step_tokens=12)


def test_skip_perfect_skips_large_calls_only_where_the_draft_scores_one(tmp_path):
    small, large = _fake_pair()
    problems = [f"p{k}" for k in range(6)]
    full = collect_router_data(small, large, problems, _DigitScorer(), tmp_path / "a.jsonl", max_steps=6)
    large_calls = large.calls
    skipped = collect_router_data(small, large, problems, _DigitScorer(), tmp_path / "b.jsonl", max_steps=6,
                                  skip_perfect=True)
    perfect = full.small_score == 1.0
    assert perfect.any() and (~perfect).any()
    assert large.calls - large_calls == int((~perfect).sum())
    assert np.isnan(skipped.large_score[perfect]).all()
    np.testing.assert_array_equal(skipped.large_score[~perfect], full.large_score[~perfect])
    np.testing.assert_array_equal(skipped.labels(0.0), full.labels(0.0))
    with pytest.raises(ConfigError, match="tau"):
        train_router(skipped, tau=-0.5)


class _Threshold(AdvantageModel):
    """A stand-in router: P(large better) = 1 - min_prob of the draft."""

    def advantage_probability(self, state: GateState) -> float:
        return 1.0 - state.confidence.min_prob


def test_advantage_gate_settings():
    assert AdvantageGate(_Threshold()).requires_hidden
    with pytest.raises(ConfigError, match="router"):
        AdvantageGate(router="router.pt")
    with pytest.raises(ConfigError, match="speculate"):
        AdvantageGate(_Threshold(), mode="route")
    with pytest.raises(ConfigError, match="threshold"):
        AdvantageGate(_Threshold(), threshold=math.nan)
    assert isinstance(make_gate("advantage", router=_Threshold(), threshold=0.2), AdvantageGate)
    with pytest.raises(ConfigError, match="advantage"):
        make_gate("advantage")  # no router


@functools.cache
def _trained_router(names: tuple[str, str] = ("s", "l")) -> Router:
    """A router trained on synthetic features, recorded for the (fake) models `names`."""
    data = _synthetic()
    models = tuple({"name": n, "fingerprint": n} for n in names)
    return train_router(dataclasses.replace(data, models=models), tau=0.0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.floats(0, 300), threshold=st.floats(0, 1), tiers=st.sampled_from([2, 3]),
       steps=st.integers(1, 6), use_router=st.booleans())
def test_advantage_gate_honours_the_hard_cap(budget, threshold, tiers, steps, use_router):
    models = [FakeBackend(f"m{k}", 10 ** (k + 2), counting_script(steps, confident=k == tiers - 1))
              for k in range(tiers)]
    gates = [AdvantageGate(_trained_router((f"m{k}", f"m{k + 1}")) if use_router else _Threshold(),
                           threshold=threshold) for k in range(tiers - 1)]
    result = Cascade(models=models, gates=gates, options=OPTIONS).solve("cap", budget=budget)
    assert result.cost.total <= budget + 1e-9
    if result.stop_reason == "budget":
        assert result.cap_intervened


def test_runtime_asks_for_hidden_states_and_scores_match_the_router(tiny_dirs, tmp_path):
    """End to end on tiny models: collect, train (tau at the median advantage so both classes
    exist), save, load for these models only, and run the gate; its scores are the router's
    probabilities of features computed by hand from a fresh call with return_hidden."""
    from cascade import LikelihoodScorer

    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    problems = [f"a={k};b=a+{k + 1};?b" for k in range(12)]
    data = collect_router_data(small, large, problems, LikelihoodScorer(large), tmp_path / "rows.jsonl",
                               projection_dim=4, max_steps=3, max_step_tokens=6)
    assert data.spec.hidden_size == small.model.config.hidden_size
    tau = float(np.median(data.advantage))
    router = train_router(data, tau=tau, holdout=0.25)
    path = router.save(tmp_path / "router.pt")
    with pytest.raises(RouterFileError):
        load_router(path, models=[large, small])
    router = load_router(path, models=[small, large])
    gate = AdvantageGate(router, threshold=0.5)
    options = SolveOptions(max_steps=3, max_step_tokens=6)  # return_hidden left False
    result = Cascade(small, large, gate, options=options).solve(problems[0])
    for step, out, _ in replayed_drafts(small, problems[0], result.steps, 6):
        features = step_features(router.spec, router.projection, Confidence.of(out, 4), step.index, out)
        expected = float(router.probability(features[None, :])[0])
        assert step.decisions[0].score == pytest.approx(expected, abs=1e-5)
        assert step.decisions[0].escalated == (expected >= 0.5)
    assert result.steps


def test_cli_train_router_errors(tmp_path, capsys):
    problems = tmp_path / "train.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"a={k};b=a+1;?b"}) + "\n" for k in range(3)))
    code = cli_main(["train-router", "--problems", str(problems), "--scorer", "vibes", "-o",
                     str(tmp_path / "r.pt")])
    assert code == 2 and "unknown scorer 'vibes'" in capsys.readouterr().err
    # tau < 0: every step of the embedded pair is "better" -> one class, a clear error, no file.
    code = cli_main(["train-router", "--problems", str(problems), "--scorer", "exact", "--tau", "-2",
                     "--limit", "2", "-o", str(tmp_path / "r.pt")])
    assert code == 2 and "both classes" in capsys.readouterr().err
    assert not (tmp_path / "r.pt").exists()
    assert (tmp_path / "r.pt.data.jsonl").exists()  # the collected rows are kept (resumable)


def _fake_router_file(tmp_path, names=("small", "large")) -> str:
    """A router trained on synthetic scalar features, recorded for the fake models' names."""
    return str(_trained_router(tuple(names)).save(tmp_path / "router.pt"))


def test_harness_runs_the_advantage_policy_and_the_report_matches_accuracy(tmp_path):
    from bench.gate_report import escalation_at_accuracy, gate_report, matched_point
    from bench.harness import BenchError, parse_policies, run_benchmark

    with pytest.raises(BenchError, match="router"):
        parse_policies("advantage@0.3", dataset="embedded")
    specs = parse_policies("advantage,advantage@0.2", dataset="embedded", router="r.pt")
    assert [(s.label, s.threshold) for s in specs] == [("advantage", 0.5), ("advantage@0.2", 0.2)]
    small, large = _fake_pair(steps=2)
    cascade = Cascade(small, large, options=OPTIONS)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{k}", "problem": f"q{k}", "answer": "2"}) + "\n"
                            for k in range(4)))
    policies = "small,large,confidence@0.5,advantage@0.3,advantage@0.9,verify@0.5"
    with pytest.raises(RouterFileError, match="trained for"):  # a router for other models
        run_benchmark(cascade, "jsonl", path=data, out_dir=tmp_path / "x", policies=policies,
                      router=_fake_router_file(tmp_path, ("a", "b")), progress=False, plots=False)
    out = tmp_path / "run"
    summary = run_benchmark(cascade, "jsonl", path=data, out_dir=out, policies=policies,
                            router=_fake_router_file(tmp_path), progress=False, plots=False,
                            use_math_verify=False)
    assert summary["n_rows"] == 24 and summary["policies"]["large"]["accuracy"] == 1.0
    assert json.loads((out / "run.json").read_text())["settings"]["router"]["sha256"]
    report = gate_report(out, tmp_path / "report")
    assert report["n_problems"] == 4 and (tmp_path / "report" / "pareto_cost.png").exists()
    for _family, entry in report["matched"].items():
        if entry.get("policy"):
            assert report["policies"][entry["policy"]]["accuracy"] >= report["target_accuracy"]
    # The pure helpers, on hand-made curves.
    stats = {"a": {"accuracy": 0.9, "mean_cost": 1.0}, "b": {"accuracy": 0.99, "mean_cost": 5.0},
             "c": {"accuracy": 1.0, "mean_cost": 3.0}}
    assert matched_point(stats, ["a", "b", "c"], 0.985) == "c"
    assert matched_point(stats, ["a"], 0.985) is None
    assert escalation_at_accuracy([(0.2, 0.9), (0.4, 1.0)], 0.95) == pytest.approx(0.3)
    assert escalation_at_accuracy([(0.2, 0.96), (0.4, 1.0)], 0.95) == 0.2
    assert escalation_at_accuracy([(0.2, 0.5)], 0.95) is None


def test_calibration_sweeps_the_advantage_gate_unchanged():
    """One scalar threshold: the sweep replays AdvantageGate like any gate; each swept
    threshold's cost is that of an independent run at it."""
    from cascade import sweep

    small, large = _fake_pair(steps=3)
    gate = AdvantageGate(_Threshold(), threshold=0.5)
    runner = Cascade(small, large, gate, options=OPTIONS)
    problems = [f"q{k}" for k in range(6)]
    thresholds = [1.0, 0.6, 0.3, 0.0]
    swept = sweep(runner, problems, [(t,) for t in thresholds])
    assert len({round(float(c), 6) for c in swept.costs.sum(axis=0)}) > 2  # thresholds matter here
    for k, t in enumerate(thresholds):
        alone = runner.solve_many(problems, gates=[AdvantageGate(_Threshold(), threshold=t)])
        np.testing.assert_allclose(swept.costs[:, k], [r.cost.total for r in alone], rtol=1e-9)


def test_reader_features_come_last_and_are_named_in_the_spec():
    spec = FeatureSpec(hidden_size=0, projection_dim=0, reader={"name": "r", "fingerprint": "f"})
    output = _output([-0.1, -2.0, -0.3])
    x = step_features(spec, spec.projection(), Confidence.of(output, 4), 1, output, (-0.2, -4.0, -0.6))
    assert x.shape == (spec.size,) == (8,)
    np.testing.assert_allclose(x[-2:], [np.mean([-0.2, -4.0, -0.6]), -4.0])
    np.testing.assert_array_equal(x[:6], step_features(SCALARS_ONLY, SCALARS_ONLY.projection(),
                                                       Confidence.of(output, 4), 1, output))
    with pytest.raises(ConfigError, match="log-probabilities"):
        step_features(spec, spec.projection(), Confidence.of(output, 4), 1, output)
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert "reader" not in SCALARS_ONLY.to_json()
    assert FeatureSpec.from_json(SCALARS_ONLY.to_json()).reader is None


def test_collection_with_a_reader_records_its_scores_and_its_name(tmp_path):
    small, large = _fake_pair()
    reader = FakeBackend("reader", 500, counting_script(3))  # scores every token -0.5
    data = collect_router_data(small, large, ["p1", "p22"], _DigitScorer(), tmp_path / "rows.jsonl",
                               max_steps=4, reader=reader)
    assert data.spec.reader == {"name": "reader", "fingerprint": "reader"}
    np.testing.assert_allclose(data.features[:, -2:], -0.5)
    with pytest.raises(RouterFileError, match="other settings"):
        collect_router_data(small, large, ["p1", "p22"], _DigitScorer(), tmp_path / "rows.jsonl", max_steps=4)


def test_a_router_with_a_reader_scores_drafts_with_it_end_to_end(tiny_dirs, tmp_path):
    """Collect with a reader, train, save; load_router attaches the reader (given, or loaded
    by its recorded name), refuses one with other weights; the gate's scores are the
    router's probabilities of features computed by hand with a fresh scoring pass."""
    from cascade import LikelihoodScorer

    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    reader = HFBackend.from_pretrained(tiny_dirs[1], step_delimiter="\n")
    problems = [f"a={k};b=a+{k + 1};?b" for k in range(12)]
    data = collect_router_data(small, large, problems, LikelihoodScorer(large), tmp_path / "rows.jsonl",
                               projection_dim=4, max_steps=3, max_step_tokens=6, reader=reader)
    router = train_router(data, tau=float(np.median(data.advantage)), holdout=0.25)
    with pytest.raises(ConfigError, match="no reader attached"):
        AdvantageGate(router).score(GateState("p", 0, 0, "", _output([-0.1], hidden=(0.0,) * 64),
                                              Confidence.of(_output([-0.1]), 4)))
    path = router.save(tmp_path / "router.pt")
    assert load_router(path).reader.backend.info.fingerprint == reader.info.fingerprint  # loaded by name
    with pytest.raises(RouterFileError, match="other weights"):
        load_router(path, reader=large)
    router = load_router(path, models=[small, large], reader=reader)
    options = SolveOptions(max_steps=3, max_step_tokens=6)
    result = Cascade(small, large, AdvantageGate(router, threshold=0.5), options=options).solve(problems[0])
    for step, out, context in replayed_drafts(small, problems[0], result.steps, 6):
        read = reader.score_steps([ScoreRequest(f"read{step.index}", problems[0], context,
                                                out.text)])[0].logprobs
        reader.release(f"read{step.index}")
        features = step_features(router.spec, router.projection, Confidence.of(out, 4), step.index, out, read)
        expected = float(router.probability(features[None, :])[0])
        assert step.decisions[0].score == pytest.approx(expected, abs=1e-5)
    assert result.steps and router.reader.tokens > 0  # what the reader fed is counted
