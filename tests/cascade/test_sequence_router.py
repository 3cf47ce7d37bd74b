"""The sequence router: it learns a signal that lives only in the draft's tokens, trains
deterministically, fails loudly on one-class or token-less data, round-trips through its
file (refusing other models and damaged files), and runs as AdvantageGate's router with
scores equal to its probabilities of the draft computed by hand."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from fakes import FakeBackend, counting_script, replayed_drafts

from app.cli import main as cli_main
from cascade import AdvantageGate, Cascade, ConfigError, SolveOptions
from cascade.gates import Confidence
from cascade.router import (
    FeatureSpec,
    RouterDataset,
    RouterFileError,
    collect_router_data,
    load_router,
    load_router_data,
    step_features,
    train_router,
)
from cascade.sequence_router import SequenceRouter, SequenceSpec, train_sequence_router
from decoding import HFBackend, ModelInfo

SCALARS_ONLY = FeatureSpec(hidden_size=0, projection_dim=0)
SMALL_NET = SequenceSpec(id_buckets=32, embedding_dim=8, width=16)
MODELS = ({"name": "s", "fingerprint": "s"}, {"name": "l", "fingerprint": "l"})


def _token_data(n_problems=300, steps=4, seed=0, marker=7) -> RouterDataset:
    """Random drafts; the large model is better exactly when the draft holds token `marker`.
    The scalar features are noise, so only a router reading the tokens can see the signal."""
    rng = np.random.default_rng(seed)
    n = n_problems * steps
    lengths = rng.integers(3, 11, n)
    ids = rng.integers(0, 20, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    better = np.array([marker in ids[offsets[i]:offsets[i + 1]] for i in range(n)])
    return RouterDataset(
        features=rng.standard_normal((n, SCALARS_ONLY.size)),
        small_score=np.where(better, 0.0, 1.0), large_score=np.where(better, 1.0, 0.0),
        group=np.repeat(np.arange(n_problems), steps), step_index=np.tile(np.arange(steps), n_problems),
        spec=SCALARS_ONLY, models=MODELS, scorer="synthetic",
        token_offsets=offsets, token_ids=ids, token_logprobs=rng.uniform(-3, 0, len(ids)),
        token_entropies=rng.uniform(0, 2, len(ids)))


@functools.lru_cache(maxsize=1)
def _trained() -> SequenceRouter:
    return train_sequence_router(_token_data(), tau=0.0, seed=1, spec=SMALL_NET, epochs=12)


def _probabilities(router: SequenceRouter, data: RouterDataset) -> np.ndarray:
    return router.probability([data.step_tokens(i) for i in range(len(data))], data.features)


def test_learns_a_signal_only_the_tokens_carry():
    router = _trained()
    assert router.metrics.auroc > 0.9
    assert router.metrics.captured_advantage > 0.8
    logistic = train_router(_token_data(), tau=0.0, seed=1)
    assert logistic.metrics.auroc < 0.7  # the summary features cannot see it: the test can fail
    # The same held-out steps for both routers (same seed, same split).
    assert (logistic.metrics.n_heldout, logistic.metrics.positive_rate_heldout) == \
        (router.metrics.n_heldout, router.metrics.positive_rate_heldout)


def test_training_is_deterministic_and_leaves_torch_random_state_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = train_sequence_router(_token_data(n_problems=60), seed=4, spec=SMALL_NET, epochs=2)
    after = torch.rand(3)
    again = train_sequence_router(_token_data(n_problems=60), seed=4, spec=SMALL_NET, epochs=2)
    np.testing.assert_array_equal(after, before)
    assert repr(first) == repr(again)
    for name in first.state:
        np.testing.assert_array_equal(first.state[name], again.state[name])
    other = train_sequence_router(_token_data(n_problems=60), seed=5, spec=SMALL_NET, epochs=2)
    assert repr(other) != repr(first)  # the seed matters


def test_refuses_one_class_and_token_less_data_and_bad_settings():
    data = _token_data(n_problems=40)
    with pytest.raises(ConfigError, match="both classes"):
        train_sequence_router(data, tau=5.0, spec=SMALL_NET, epochs=1)
    without = RouterDataset(data.features, data.small_score, data.large_score, data.group, data.step_index,
                            data.spec, data.models, data.scorer)
    with pytest.raises(RouterFileError, match="tokens"):
        train_sequence_router(without, spec=SMALL_NET, epochs=1)
    with pytest.raises(ConfigError, match="epochs"):
        train_sequence_router(data, spec=SMALL_NET, epochs=0)
    with pytest.raises(ConfigError, match="width"):
        SequenceSpec(width=0)


def test_save_load_round_trip_refusals_and_damaged_files(tmp_path):
    router = _trained()
    data = _token_data(n_problems=20, seed=9)
    path = router.save(tmp_path / "seq.pt")
    loaded = load_router(path)
    assert isinstance(loaded, SequenceRouter)
    np.testing.assert_array_equal(_probabilities(loaded, data), _probabilities(router, data))
    assert loaded.metrics == router.metrics and loaded.spec == router.spec and repr(loaded) == repr(router)
    ok = [ModelInfo("s", "s", 1, "\n"), ModelInfo("l", "l", 2, "\n")]
    load_router(path, models=ok)
    with pytest.raises(RouterFileError, match="trained for"):
        load_router(path, models=ok[::-1])
    # Trained on exact entropies of the drafting model: a top-k estimate there is refused;
    # the large model's entropies are not read.
    with pytest.raises(RouterFileError, match="entropies"):
        load_router(path, models=[ModelInfo("s", "s", 1, "\n", entropy="top-1"), ok[1]])
    load_router(path, models=[ok[0], ModelInfo("l", "l", 2, "\n", entropy="top-1")])
    payload = torch.load(path, weights_only=True)
    payload["state"]["head.0.weight"] = torch.zeros(3, 3)  # weights of another shape
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(RouterFileError, match="damaged"):
        load_router(tmp_path / "damaged.pt")
    del payload["state"]
    torch.save(payload, tmp_path / "cut.pt")
    with pytest.raises(RouterFileError, match="damaged"):
        load_router(tmp_path / "cut.pt")


def test_probability_does_not_depend_on_the_batch_a_draft_is_read_in():
    """Padding must not leak into a draft's score: a draft read alone or among longer ones
    gets the same probability."""
    router = _trained()
    data = _token_data(n_problems=10, seed=3)
    together = _probabilities(router, data)
    alone = [float(router.probability([data.step_tokens(i)], data.features[i:i + 1])[0])
             for i in range(len(data))]
    np.testing.assert_allclose(together, alone, atol=1e-6)
    empty = router.probability([((), (), ())], data.features[:1])  # an empty draft still gets a score
    assert empty.shape == (1,) and 0.0 <= empty[0] <= 1.0


def test_collection_records_the_drafts_tokens(tmp_path):
    def script(problem, context):
        text, logprobs = counting_script(3, confident=False)(problem, context)
        return (text.replace("=", "=1", 1), logprobs[:1] + logprobs) if len(problem) % 2 else (text, logprobs)

    small, large = FakeBackend("small", 100, script), FakeBackend("large", 1000, counting_script(3))

    class Digits:
        name = "digits"

        def score(self, problem, context, candidates):
            return [1.0 if c and c[-1] in "02468" else 0.0 for c in candidates]

    data = collect_router_data(small, large, ["p1", "p22", "p333"], Digits(), tmp_path / "rows.jsonl",
                               max_steps=4, max_step_tokens=12)
    assert data.has_tokens and data.token_offsets[-1] == len(data.token_ids)
    ids, logprobs, entropies = data.step_tokens(0)
    assert len(ids) == len(logprobs) == len(entropies) >= 1
    again = load_router_data(data.save(tmp_path / "rows.npz"))
    for i in range(len(data)):
        for a, b in zip(again.step_tokens(i), data.step_tokens(i), strict=False):
            np.testing.assert_array_equal(a, b)


def test_gate_scores_are_the_routers_probabilities_on_tiny_models(tiny_dirs, tmp_path):
    """End to end on tiny models: collect (tokens recorded), train, save, load for these
    models only, run AdvantageGate; each decision's score is the router's probability of the
    draft's tokens and features computed by hand from a fresh call."""
    from cascade import LikelihoodScorer

    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    problems = [f"a={k};b=a+{k + 1};?b" for k in range(12)]
    data = collect_router_data(small, large, problems, LikelihoodScorer(large), tmp_path / "rows.jsonl",
                               projection_dim=4, max_steps=3, max_step_tokens=6)
    router = train_sequence_router(data, tau=float(np.median(data.advantage)), holdout=0.25, spec=SMALL_NET,
                                   epochs=2)
    path = router.save(tmp_path / "seq.pt")
    with pytest.raises(RouterFileError):
        load_router(path, models=[large, small])
    router = load_router(path, models=[small, large])
    options = SolveOptions(max_steps=3, max_step_tokens=6)
    result = Cascade(small, large, AdvantageGate(router, threshold=0.5), options=options).solve(problems[0])
    for step, out, _ in replayed_drafts(small, problems[0], result.steps, 6):
        features = step_features(router.features, router.features.projection(), Confidence.of(out, 4),
                                 step.index, out)
        expected = float(router.probability([(out.token_ids, out.logprobs, out.entropies)],
                                            features[None, :])[0])
        assert step.decisions[0].score == pytest.approx(expected, abs=1e-5)
        assert step.decisions[0].escalated == (expected >= 0.5)
    assert result.steps


def test_gate_with_a_sequence_router_honours_the_hard_cap():
    router = _trained()
    models = [FakeBackend(name, 10 ** (k + 2), counting_script(4, confident=k == 1))
              for k, name in enumerate(("s", "l"))]  # the models the router was trained for
    for budget in (0.0, 150.0, 900.0, 5000.0):
        for threshold in (0.0, 0.5, 1.0):
            result = Cascade(models=models, gates=[AdvantageGate(router, threshold=threshold)],
                             options=SolveOptions(max_steps=8, max_step_tokens=12)).solve(
                "cap", budget=budget)
            assert result.cost.total <= budget + 1e-9


def test_cli_trains_a_sequence_router_on_the_embedded_pair(tmp_path, capsys):
    import json

    problems = tmp_path / "train.jsonl"
    from bench.tasks import generate_split

    problems.write_text("".join(json.dumps({"problem": p.problem}) + "\n"
                                for p in generate_split("train", 20)))
    code = cli_main(["train-router", "--problems", str(problems), "--scorer", "exact", "--router-model",
                     "sequence", "--epochs", "1", "-o", str(tmp_path / "seq.pt")])
    out = capsys.readouterr().out
    assert code == 0 and "sequence router" in out
    assert isinstance(load_router(tmp_path / "seq.pt"), SequenceRouter)
    # ... and serves: cascade solve / serve --gate advantage --router FILE, for these models only.
    from app.cli import build_parser
    from app.server import build_served_cascade

    router = str(tmp_path / "seq.pt")
    code = cli_main(["solve", "a=5;b=a+3;c=b*2;?c", "--gate", "advantage", "--threshold", "0",
                     "--router", router, "--json"])
    trace = json.loads(capsys.readouterr().out)
    assert code == 0 and trace["steps"] and all(s["tier"] == 1 for s in trace["steps"])  # threshold 0
    code = cli_main(["solve", "a=5;?a", "--models", "embedded:small,embedded:medium,embedded:large",
                     "--gate", "advantage", "--router", router])
    assert code == 2 and "trained for" in capsys.readouterr().err  # medium -> large is not its pair
    assert cli_main(["solve", "a=5;?a", "--gate", "advantage"]) == 2
    assert "--router FILE" in capsys.readouterr().err
    assert cli_main(["solve", "a=5;?a", "--gate", "confidence", "--router", router]) == 2
    assert "--gate advantage" in capsys.readouterr().err
    assert cli_main(["solve", "a=5;?a", "--gate", "verify", "--router", router]) == 2
    assert "--screen-threshold" in capsys.readouterr().err
    # nothing passes the screen (P < 1): the small model writes every step
    code = cli_main(["solve", "a=5;b=a+3;c=b*2;?c", "--gate", "verify", "--router", router,
                     "--screen-threshold", "1", "--json"])
    trace = json.loads(capsys.readouterr().out)
    assert code == 0 and all(s["tier"] == 0 for s in trace["steps"])
    served = build_served_cascade(build_parser().parse_args(["serve", "--gate", "advantage",
                                                             "--threshold", "0.4", "--router", router]))
    assert isinstance(served.gates[0], AdvantageGate) and served.gates[0].threshold == 0.4
    assert isinstance(served.gates[0].router, SequenceRouter)
    # A request may pick the advantage gate at its own threshold: the server's router is used.
    import asyncio

    import httpx

    from app.server import ServerConfig, create_app

    async def ask(threshold):
        transport = httpx.ASGITransport(app=create_app(served, ServerConfig()))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            response = await client.post("/v1/completions", timeout=120, json={
                "model": "stepcascade", "prompt": "a=5;b=a+3;c=b*2;?c", "gate": "advantage",
                "threshold": threshold})
            return response.status_code, response.json()

    status, body = asyncio.run(ask(0.0))
    assert status == 200, body
    assert body["cascade"]["authors"] and set(body["cascade"]["authors"]) == {"large"}  # threshold 0


def test_harness_and_report_run_two_routers_side_by_side(tmp_path):
    """--router FILE and --router seq=FILE: advantage and advantage:seq policies in one run,
    each router loaded for the run's models, each its own family in the report."""
    import json

    from bench.gate_report import gate_report
    from bench.harness import BenchError, parse_policies, run_benchmark

    fake_models = ({"name": "small", "fingerprint": "small"}, {"name": "large", "fingerprint": "large"})
    data = _token_data(n_problems=60)
    data = RouterDataset(data.features, data.small_score, data.large_score, data.group, data.step_index,
                         data.spec, fake_models, data.scorer, data.token_offsets, data.token_ids,
                         data.token_logprobs, data.token_entropies)
    sequence_file = train_sequence_router(data, spec=SMALL_NET, epochs=1).save(tmp_path / "seq.pt")
    logistic_file = train_router(data).save(tmp_path / "lr.pt")
    routers = [str(logistic_file), f"seq={sequence_file}"]
    with pytest.raises(BenchError, match="--router other=FILE"):
        parse_policies("advantage:other@0.3", dataset="embedded", router=routers)
    with pytest.raises(BenchError, match="twice"):
        parse_policies("advantage", dataset="embedded", router=[str(logistic_file), str(sequence_file)])
    small, large = FakeBackend("small", 100, counting_script(2, confident=False)), \
        FakeBackend("large", 1000, counting_script(2))
    cascade = Cascade(small, large, options=SolveOptions(max_steps=6, max_step_tokens=12))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{k}", "problem": f"q{k}", "answer": "2"}) + "\n"
                                for k in range(3)))
    out = tmp_path / "run"
    summary = run_benchmark(cascade, "jsonl", path=problems, out_dir=out, router=routers, progress=False,
                            policies="small,large,confidence@0.5,advantage@0.5,advantage:seq@0.5,advantage:seq@0,"
                                     "verify-fix:seq=0.5@0.3",
                            plots=False, use_math_verify=False)
    assert summary["policies"]["advantage:seq@0"]["step_escalation_rate"] == 1.0  # threshold 0: always
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert set(settings["router"]) == {"", "seq"} and settings["router"]["seq"]["sha256"]
    run = json.loads((out / "run.json").read_text())
    gates = {p["name"]: p["gates"] for p in run["settings"]["policies"]}
    assert "SequenceRouter" in gates["advantage:seq@0.5"][0]
    assert "SequenceRouter" not in gates["advantage@0.5"][0]
    report = gate_report(out, tmp_path / "report", router=routers)
    assert {"advantage", "advantage:seq", "verify-fix:seq=0.5"} <= set(report["matched"])
    assert "screen=SequenceRouter" in gates["verify-fix:seq=0.5@0.3"][0]
    assert set(report["routers"]) == {"", "seq"} and "sequence router" in report["routers"]["seq"]["summary"]
    assert set(report["targets"]["advantage_gaps"]) == {"advantage", "advantage:seq"}


def cascade_verify_gate(router):
    from cascade import VerifyGate

    return VerifyGate(0.5, screen=router, screen_threshold=0.2)


def test_a_calibration_of_an_advantage_gate_names_its_router_file(tmp_path):
    """calibrate() with an AdvantageGate records the router's file and weights digest;
    from_calibration loads it back (once), refuses a router file that changed since, and a
    router not loaded from a file is refused before any problem is run."""
    from cascade import calibrate
    from cascade.calibrate import CalibrationFileError

    fake_models = ({"name": "small", "fingerprint": "small"}, {"name": "large", "fingerprint": "large"})
    data = _token_data(n_problems=60)
    data = RouterDataset(data.features, data.small_score, data.large_score, data.group, data.step_index,
                         data.spec, fake_models, data.scorer, data.token_offsets, data.token_ids,
                         data.token_logprobs, data.token_entropies)
    trained = train_sequence_router(data, spec=SMALL_NET, epochs=1)
    path = trained.save(tmp_path / "seq.pt")
    small, large = FakeBackend("small", 100, counting_script(3, confident=False)), \
        FakeBackend("large", 1000, counting_script(3))
    options = SolveOptions(max_steps=6, max_step_tokens=12)
    problems = [f"q{k}" for k in range(40)]
    unsaved = Cascade(small, large, AdvantageGate(trained, threshold=0.5), options=options)
    calls = small.calls
    with pytest.raises(ConfigError, match="load_router"):
        calibrate(unsaved, problems, budget=5000.0)
    assert small.calls == calls  # refused before running anything
    runner = Cascade(small, large, AdvantageGate(load_router(path), threshold=0.5), options=options)
    saved = calibrate(runner, problems, budget=5000.0).save(tmp_path / "cal.json")
    served = Cascade.from_calibration(saved, models=[small, large], options=options)
    gate = served.calibration.gates_for(5000.0)[0]
    assert isinstance(gate.router, SequenceRouter) and repr(gate.router) == repr(trained)
    assert served.calibration.gates_for(5000.0)[0].router is gate.router  # the file is read once
    assert served.solve("q1", budget=5000.0).steps
    screened = Cascade(small, large, cascade_verify_gate(load_router(path)), options=options)
    again = Cascade.from_calibration(calibrate(screened, problems, budget=5000.0)
                                     .save(tmp_path / "cal2.json"),
                                     models=[small, large], options=options)
    assert repr(again.gates[0].screen) == repr(trained) and again.gates[0].screen_threshold == 0.2
    train_sequence_router(data, spec=SMALL_NET, epochs=1, seed=7).save(path)  # another router, same file
    with pytest.raises(CalibrationFileError, match="not the one"):
        Cascade.from_calibration(saved, models=[small, large], options=options)


def test_a_cascade_refuses_a_gate_whose_router_was_trained_for_other_models():
    """The check lives in the cascade's gate check: at construction, per call, and for a
    verify gate's screen alike."""
    from cascade import VerifyGate

    router = _trained()  # trained for s -> l
    ok = [FakeBackend(name, 10 ** (k + 2), counting_script(2)) for k, name in enumerate(("s", "l"))]
    other = [FakeBackend(name, 10 ** (k + 2), counting_script(2)) for k, name in enumerate(("a", "b"))]
    with pytest.raises(RouterFileError, match="trained for"):
        Cascade(models=other, gates=[AdvantageGate(router)])
    with pytest.raises(RouterFileError, match="trained for"):
        Cascade(models=other, gates=[VerifyGate(screen=router)])
    with pytest.raises(RouterFileError, match="trained for"):
        Cascade(models=other).solve("q", gates=[AdvantageGate(router)])
    assert Cascade(models=ok, gates=[AdvantageGate(router)]).solve("q").steps
