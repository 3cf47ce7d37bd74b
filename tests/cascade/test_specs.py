"""The spec layer: one grammar, one vocabulary, checked values, one place that builds."""

from __future__ import annotations

import sys
import types
import warnings
from types import SimpleNamespace

import pytest

from cascade import (
    GATES,
    AlwaysLarge,
    AlwaysSmall,
    ConfidenceGate,
    ConfigError,
    VerifyGate,
    make_gate,
)
from cascade.gates import AdvantageModel
from cascade.specs import (
    GateSpec,
    ModelSpec,
    build_gate,
    gate_spec_of,
    load_model,
    parse_gate,
    parse_policy,
    warn_on_tier_order,
)


class _Router(AdvantageModel):
    source = "/tmp/r.pt"

    def advantage_probability(self, state):
        return 0.5

    def __repr__(self):
        return "Router(abc)"


def test_the_bench_grammar_names_every_policy():
    fix = parse_policy("verify-fix:seq=0.02@0.3")
    assert (fix.kind, fix.router, fix.screen_threshold, fix.threshold, fix.draft_ahead) == \
        ("verify-fix", "seq", 0.02, 0.3, True)
    assert fix.gate_specs(1) == [GateSpec("verify", threshold=0.3, rewrite="token", router="seq",
                                          screen_threshold=0.02)]
    gate = build_gate(fix.gate_specs(1)[0], {"seq": _Router()})
    assert isinstance(gate, VerifyGate) and gate.rewrite == "token" and gate.screen_threshold == 0.02
    confidence = parse_policy("confidence:entropy:route@0.3")
    assert confidence.label == "confidence:entropy:route@0.3"
    built = build_gate(confidence.gate_specs(1)[0])
    assert isinstance(built, ConfidenceGate) and (built.signal, built.mode, built.threshold) == \
        ("entropy", "route", 0.3)
    assert parse_policy("confidence@0.3/0.5").gate_specs(2)[1].threshold == 0.5
    assert parse_policy("confidence", threshold=0.7).threshold == 0.7
    assert parse_gate("advantage:lr@0.4") == GateSpec("advantage", threshold=0.4, router="lr")


def test_one_vocabulary_with_the_old_names_read_in_one_place():
    assert list(GATES) == ["small", "large", "confidence", "verify", "advantage"]
    assert parse_gate("always-small") == parse_gate("small") == GateSpec("small")
    assert isinstance(make_gate("always-large"), AlwaysLarge) and isinstance(make_gate("small"), AlwaysSmall)
    assert isinstance(build_gate(parse_gate("large")), AlwaysLarge)
    with pytest.raises(ConfigError, match="unknown gate 'nope'"):
        parse_gate("nope@0.3")


@pytest.mark.parametrize("text, message", [
    ("confidence@1.5", r"\[0, 1\]"),
    ("confidence@inf", "threshold"),
    ("confidence@x", "not a number"),
    ("small@0.3", "takes no threshold"),
    ("confidence:vibes", "signal"),
    ("verify:seq@0.3", "NAME=S"),
    ("verify:seq=2@0.3", "screen threshold"),
    ("oracle", "unknown gate"),
])
def test_bad_names_and_values_are_refused_by_name(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_gate(text)


def test_gate_spec_values_are_checked():
    with pytest.raises(ConfigError, match="threshold"):
        GateSpec("confidence", threshold=True)
    with pytest.raises(ConfigError, match="signal is a setting of gate confidence"):
        GateSpec("verify", signal="min_prob")
    with pytest.raises(ConfigError, match="needs a router"):
        GateSpec("advantage")
    with pytest.raises(ConfigError, match="both a router"):
        GateSpec("verify", screen_threshold=0.2)
    assert GateSpec("small", threshold=float("inf")).threshold == float("inf")  # AlwaysSmall's own default


def test_the_calibration_record_round_trips_and_is_checked():
    for gate in (ConfidenceGate(0.3, signal="entropy"), VerifyGate(0.4, rewrite="token"),
                 VerifyGate(0.4, screen=_Router(), screen_threshold=0.1), AlwaysSmall()):
        spec = gate_spec_of(gate)
        record = spec.to_json()
        assert "threshold" not in record
        again = GateSpec.from_json(record).with_threshold(gate.threshold)
        assert again == spec
    # the records of older files: fixed fields and the old names
    old = {"type": "always-small", "mode": "route", "probe_tokens": 0, "requires_verification": False}
    assert GateSpec.from_json(old) == GateSpec("small", mode="route", probe_tokens=0)
    for record, message in [({"type": "confidence", "probe_tokens": "4"}, "probe_tokens"),
                            ({"type": "confidence", "colour": "red"}, "no setting 'colour'"),
                            ({"type": "verify", "screen": "r.pt"}, "screen must be"),
                            ({"type": "verify", "requires_verification": False}, "requires_verification"),
                            ({"type": 3}, "gate name")]:
        with pytest.raises(ConfigError, match=message):
            GateSpec.from_json(record)


def test_model_specs_pick_the_backend_and_check_their_settings():
    assert ModelSpec("m.gguf").backend == "llamacpp" and ModelSpec("dir").backend == "hf"
    assert ModelSpec("embedded:small").step_delimiter == "\n" and ModelSpec("dir").step_delimiter == "\n\n"
    with pytest.raises(ConfigError, match="no embedded model 'huge'"):
        ModelSpec("embedded:huge")
    with pytest.raises(ConfigError, match="needs endpoints"):
        ModelSpec("dir", backend="openai")
    with pytest.raises(ConfigError, match="backend must be one of"):
        ModelSpec("dir", backend="tgi")
    with pytest.raises(ConfigError, match="gpu_memory"):
        ModelSpec("dir", backend="vllm", gpu_memory=1.5)


def test_a_gguf_model_without_llama_cpp_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        load_model(ModelSpec("/models/tiny.gguf", n_ctx=512))


def test_a_gguf_model_is_built_by_the_llamacpp_backend(monkeypatch):
    calls = []

    class FakeLlamaCpp:
        def __init__(self, model_path, **settings):
            calls.append((model_path, settings))

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    module = types.ModuleType("decoding.llamacpp")
    module.LlamaCppBackend = FakeLlamaCpp
    monkeypatch.setitem(sys.modules, "decoding.llamacpp", module)
    load_model(ModelSpec("/models/tiny.gguf", n_ctx=512, n_threads=2, seed=7, template="Q: {problem}\n"))
    assert calls == [("/models/tiny.gguf", {"name": "/models/tiny.gguf", "step_delimiter": "\n\n",
                                            "prompt_template": "Q: {problem}\n", "n_ctx": 512, "n_threads": 2,
                                            "seed": 7})]


def test_a_small_tier_larger_than_the_large_one_is_warned_about():
    def model(name, params):
        return SimpleNamespace(info=SimpleNamespace(name=name, num_parameters=params))
    with pytest.warns(UserWarning, match="larger than tier 1"):
        warn_on_tier_order([model("big", 1000), model("tiny", 10)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_tier_order([model("tiny", 10), model("big", 1000)])


def test_load_models_warns_on_swapped_tiers(tiny_dirs):
    from cascade.specs import load_models

    with pytest.warns(UserWarning, match="larger than tier 1"):
        load_models([ModelSpec(tiny_dirs[2], delimiter="\n"), ModelSpec(tiny_dirs[0], delimiter="\n")])
