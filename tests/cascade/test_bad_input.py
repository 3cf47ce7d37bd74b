"""Every bad input a user can hand the Python API, in one table: each is rejected with an
error of this project (not a traceback from torch, numpy or transformers) whose message
names the problem. (Files, the CLI and the server have their own tables next to them.)"""

from __future__ import annotations

import math

import pytest
from fakes import FakeBackend, counting_script

import cascade
from cascade import (
    AlwaysLarge,
    Cascade,
    CascadeError,
    ConfidenceGate,
    CostModel,
    Prices,
    SolveOptions,
    VerifyGate,
    make_gate,
)
from decoding import FaultyBackend, HFBackend, ModelLoadError, at_calls

OURS = ("cascade", "decoding", "calibration", "bench")


def _pair(delimiter="\n"):
    return (FakeBackend("small", 100, counting_script(3), delimiter=delimiter),
            FakeBackend("large", 1000, counting_script(3)))


def _solve(*args, **kwargs):
    small, large = _pair()
    return Cascade(small, large, ConfidenceGate(0.5)).solve(*args, **kwargs)


def _many(*args, **kwargs):
    small, large = _pair()
    return Cascade(small, large, ConfidenceGate(0.5)).solve_many(*args, **kwargs)


CASES = [
    # problems
    ("empty problem", lambda: _solve(""), "problem is empty"),
    ("whitespace problem", lambda: _solve(" \n\t "), "problem is empty"),
    ("non-string problem", lambda: _solve(42), "problem must be a string"),
    ("None problem", lambda: _solve(None), "problem must be a string"),
    ("bytes problem", lambda: _solve(b"a=1"), "problem must be a string"),
    ("one bad problem among many", lambda: _many(["a", ""]), "problem is empty"),
    # budgets
    ("negative budget", lambda: _solve("p", -1), "budget must be finite and >= 0"),
    ("NaN budget", lambda: _solve("p", math.nan), "budget must be finite"),
    ("infinite budget", lambda: _solve("p", math.inf), "budget must be finite"),
    ("string budget", lambda: _solve("p", "10"), "budget must be a number"),
    ("boolean budget", lambda: _solve("p", True), "budget must be a number"),
    # request options
    ("max_steps < 1", lambda: SolveOptions(max_steps=0), "max_steps"),
    ("non-integer max_steps", lambda: SolveOptions(max_steps=2.5), "max_steps"),
    ("negative max_step_tokens", lambda: SolveOptions(max_step_tokens=-1), "max_step_tokens"),
    ("negative temperature", lambda: SolveOptions(temperature=-0.1), "temperature"),
    ("NaN temperature", lambda: SolveOptions(temperature=math.nan), "temperature"),
    ("zero step timeout", lambda: SolveOptions(step_timeout=0), "step_timeout"),
    ("negative request timeout", lambda: SolveOptions(request_timeout=-5), "request_timeout"),
    ("options of the wrong type", lambda: _solve("p", options={"max_steps": 3}),
     "options must be a SolveOptions"),
    ("concurrency 0", lambda: _many(["p"], concurrency=0), "concurrency"),
    ("boolean concurrency", lambda: _many(["p"], concurrency=True), "concurrency"),
    # gates
    ("NaN threshold", lambda: ConfidenceGate(threshold=math.nan), "threshold"),
    ("string threshold", lambda: ConfidenceGate(threshold="high"), "threshold"),
    ("unknown signal", lambda: ConfidenceGate(signal="vibes"), "signal"),
    ("unknown mode", lambda: ConfidenceGate(mode="guess"), "mode"),
    ("route gate with no probe", lambda: ConfidenceGate(mode="route", probe_tokens=0), "probe_tokens"),
    ("negative probe", lambda: ConfidenceGate(mode="route", probe_tokens=-2), "probe_tokens"),
    ("verify gate in route mode", lambda: VerifyGate(mode="route"), "speculate"),
    ("unknown gate name", lambda: make_gate("magic"), "unknown gate"),
    ("bad gate option", lambda: make_gate("confidence", colour="red"), "bad options"),
    ("non-gate object", lambda: Cascade(*_pair(), gate="confidence"), "is not a gate"),
    ("gate count mismatch", lambda: Cascade(models=list(_pair()), gates=[AlwaysLarge()] * 2), "need 1 gates"),
    ("gate and gates", lambda: Cascade(*_pair(), gate=AlwaysLarge(), gates=[AlwaysLarge()]), "not both"),
    # cascades and models
    ("one model", lambda: Cascade(models=[_pair()[0]]), "at least 2 models"),
    ("small without large", lambda: Cascade(small=_pair()[0]), "give small= and large="),
    ("small= and models=", lambda: Cascade(small=_pair()[0], models=list(_pair())), "not both"),
    ("delimiters disagree", lambda: Cascade(*_pair(delimiter="\n\n")), "disagree on the step delimiter"),
    ("price count mismatch", lambda: Cascade(*_pair(), cost_model=CostModel((Prices(1, 1),))),
     "price entries"),
    ("negative price", lambda: Prices(input=-1, output=1), "price input"),
    ("NaN price", lambda: Prices(input=1, output=math.nan), "price output"),
    ("tier names mismatch", lambda: Cascade(*_pair(), tier_names=["a"]), "tier_names"),
    ("unknown fault policy", lambda: Cascade(*_pair(), on_large_failure="retry"), "on_large_failure"),
    ("unknown model path", lambda: HFBackend.from_pretrained("/no/such/model/dir"), "no model at"),
    ("a file, not a model dir", lambda: HFBackend.from_pretrained(__file__), "no model at"),
    ("unknown dtype", lambda: HFBackend.from_pretrained("/tmp", dtype="int3"), "dtype"),
    ("from_pretrained with one model", lambda: Cascade.from_pretrained(small="/tmp"),
     "needs small= and large="),
    ("unknown embedded tier", lambda: cascade.embedded_cascade(tiers=("small", "huge")), "huge"),
    ("unknown fault kind", lambda: at_calls({1: "explode"}), "unknown fault"),
    ("negative stall", lambda: FaultyBackend(_pair()[1], at_calls({}), stall_seconds=-1), "stall_seconds"),
]


@pytest.mark.parametrize("name,call,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_of_ours(name, call, message):
    with pytest.raises((CascadeError, ValueError, ModelLoadError)) as info:
        call()
    assert message in str(info.value), (name, str(info.value))
    origin = type(info.value).__module__.split(".")[0]
    assert origin in OURS or type(info.value) is ValueError and info.traceback[-1].path.parts[-2] in OURS, \
        f"{name}: {type(info.value).__module__}.{type(info.value).__name__} raised from outside the project"


def test_the_table_is_large_enough_to_report():
    assert len(CASES) >= 45
