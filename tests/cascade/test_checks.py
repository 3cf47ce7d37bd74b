"""cascade.checks and the bad inputs of issue 20 that used to slip through the Python API
(each case here failed before its fix: a silent wrong result, or a raw traceback)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from fakes import FakeBackend, counting_script

import calibration as cal
import cascade
from cascade import (
    AdvantageGate,
    AlwaysLarge,
    AlwaysSmall,
    Cascade,
    CascadeError,
    ConfidenceGate,
    ConfigError,
    CostModel,
    SolveOptions,
    VerifyGate,
    calibrate,
    sweep,
)
from cascade.checks import check_budget, check_probability, check_problem, check_problems, check_threshold
from cascade.cost import Prices
from cascade.gates import AdvantageModel, Gate
from decoding import HFBackend, ModelInfo

OPTIONS = SolveOptions(max_steps=6, max_step_tokens=12)


class _Counted(FakeBackend):
    """A FakeBackend that counts every call (steps and scores)."""

    def next_steps(self, requests):
        self.calls_made = getattr(self, "calls_made", 0) + len(requests)
        return super().next_steps(requests)

    def score_steps(self, requests):
        self.calls_made = getattr(self, "calls_made", 0) + len(requests)
        return super().score_steps(requests)


def _pair(context_length=None):
    small = _Counted("small", 100, counting_script(3, confident=False))
    large = _Counted("large", 1000, counting_script(3))
    if context_length is not None:
        for model in (small, large):
            model.info = dataclasses.replace(model.info, context_length=context_length)
    return small, large


def _cascade(gate=None, **kwargs):
    small, large = _pair(**kwargs)
    return Cascade(small, large, gate or ConfidenceGate(0.5), options=OPTIONS)


def _calls(runner: Cascade) -> int:
    return sum(getattr(m, "calls_made", 0) for m in runner.models)


# ---- the checks themselves ---------------------------------------------------------------

def test_checks_accept_numpy_numbers_and_return_plain_floats():
    assert check_budget(np.int64(40)) == 40.0 and type(check_budget(np.int64(40))) is float
    assert check_budget(np.float32(2.5)) == 2.5
    assert type(check_threshold(np.float32(0.25))) is float
    assert check_probability(np.float64(0.1), "alpha") == pytest.approx(0.1)
    assert check_budget(None) is None
    assert check_problems(("a", "b")) == ["a", "b"]


@pytest.mark.parametrize("call,message", [
    (lambda: check_budget(np.bool_(True)), "budget must be a number"),
    (lambda: check_threshold(True), "threshold must be a number"),
    (lambda: check_threshold(np.bool_(False)), "threshold must be a number"),
    (lambda: check_threshold(math.nan), "NaN"),
    (lambda: check_threshold(1.5), r"threshold must lie in \[0, 1\]"),
    (lambda: check_threshold(-0.5), r"\[0, 1\]"),
    (lambda: check_threshold(math.inf), r"\[0, 1\]"),
    (lambda: check_probability(0.0, "alpha"), "alpha must lie strictly between 0 and 1"),
    (lambda: check_probability(1, "delta"), "delta"),
    (lambda: check_probability("0.1", "alpha"), "alpha must be a number"),
    (lambda: check_problem("a\ud800b"), "lone surrogate"),
    (lambda: check_problems("a=1;?a"), "single str"),
    (lambda: check_problems(42), "problems must be a list"),
])
def test_checks_refuse_with_the_parameter_and_value(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


# ---- problems ----------------------------------------------------------------------------

def test_solve_many_refuses_a_bare_string_instead_of_solving_its_characters():
    runner = _cascade()
    with pytest.raises(ConfigError, match="single str 'a=1;\\?a'"):
        runner.solve_many("a=1;?a")
    assert _calls(runner) == 0


def test_a_lone_surrogate_in_the_problem_is_a_clear_error():
    with pytest.raises(ConfigError, match="lone surrogate"):
        _cascade().solve("a=1;\udc00?a")


def test_a_lone_surrogate_is_refused_before_a_real_tokenizer_sees_it(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    with pytest.raises(ConfigError, match="position 4 is a lone surrogate"):
        Cascade(small, large, options=OPTIONS).solve("a=1;\ud800?a")


@pytest.mark.parametrize("problems,message", [
    ([42], "problem must be a string"),
    (["a", ""], "problem is empty"),
    ("a=1;?a", "single str"),
])
@pytest.mark.parametrize("entry", ["sweep", "calibrate"])
def test_sweep_and_calibrate_refuse_the_problems_solve_refuses(entry, problems, message):
    runner = _cascade()
    with pytest.raises(ConfigError, match=message):
        if entry == "sweep":
            sweep(runner, problems, [(0.5,)])
        else:
            calibrate(runner, problems, budget=50)
    assert _calls(runner) == 0


# ---- calibration arguments are checked before any model call -----------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": 0.0}, "alpha must lie strictly between 0 and 1"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": "0.1"}, "alpha must be a number"),
    ({"delta": -0.1}, "delta must lie strictly between 0 and 1"),
    ({"delta": math.nan}, "delta"),
    ({"method": "bayes"}, "method must be 'ltt', 'conformal' or 'risk'"),
    ({"objective": "accuracy"}, "objective must be"),
    ({"method": "risk"}, "needs cost_max"),
    ({"budgets": [10, None]}, "budgets must be numbers"),
    ({"budgets": [10, -1]}, "budget must be finite and >= 0"),
])
def test_calibrate_checks_its_arguments_before_the_sweep(kwargs, message):
    runner = _cascade()
    kwargs = {"budget": 50, **kwargs} if "budgets" not in kwargs else kwargs
    with pytest.raises(ConfigError, match=message):
        calibrate(runner, [f"p{i}" for i in range(4)], **kwargs)
    assert _calls(runner) == 0  # refused before a single model call


def test_calibration_failures_are_cascade_errors_and_keep_their_calibration_class():
    runner = _cascade()
    with pytest.raises(CascadeError, match="cheapest") as info:
        calibrate(runner, [f"p{i}" for i in range(60)], budget=1, alpha=0.2, delta=0.2)
    assert isinstance(info.value, cal.InfeasibleBudgetError)
    assert isinstance(info.value, cal.CalibrationError) and isinstance(info.value, ValueError)
    with pytest.raises(CascadeError) as info:
        calibrate(runner, ["p0", "p1"], budget=100, alpha=0.01, delta=0.01)
    assert isinstance(info.value, cal.InsufficientDataError)


# ---- budgets -----------------------------------------------------------------------------

def test_a_huge_budget_is_no_cap_not_an_overflow():
    runner = _cascade()
    huge = runner.solve("p", budget=1e308)
    free = runner.solve("p")
    assert [(s.text, s.tier) for s in huge.steps] == [(s.text, s.tier) for s in free.steps]
    assert huge.cost.total == free.cost.total and not huge.cap_intervened
    assert CostModel((Prices(1e-6, 1e-6),)).affordable_tokens(0, 10, 1e308) == 1 << 30


def test_numpy_budgets_are_accepted():
    runner = _cascade()
    assert runner.solve("p", budget=np.int64(500)).cost.total == runner.solve("p", budget=500).cost.total


# ---- thresholds: the range of each gate's score ------------------------------------------

@pytest.mark.parametrize("make", [
    lambda t: ConfidenceGate(threshold=t),
    lambda t: VerifyGate(threshold=t),
    lambda t: VerifyGate(screen_threshold=t),
])
@pytest.mark.parametrize("value", [1.5, -0.5, math.inf, True, math.nan])
def test_thresholds_outside_the_score_range_are_refused(make, value):
    with pytest.raises(ConfigError, match="threshold"):
        make(value)


def test_advantage_and_fixed_gates_check_their_thresholds():
    class Router(AdvantageModel):
        def advantage_probability(self, state):
            return 0.5
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        AdvantageGate(Router(), threshold=2.0)
    with pytest.raises(ConfigError, match="threshold"):
        AlwaysSmall(threshold=-1)
    with pytest.raises(ConfigError, match="threshold"):
        AlwaysLarge(threshold=1.5)
    assert AlwaysSmall().threshold == math.inf  # its default: the score 0 never reaches it


def test_numpy_thresholds_are_accepted_and_recorded_as_floats():
    gate = ConfidenceGate(threshold=np.float32(0.25))
    assert gate.threshold == 0.25 and type(gate.threshold) is float
    assert gate == ConfidenceGate(threshold=0.25)
    gate = VerifyGate(threshold=np.float64(0.5), screen_threshold=np.int64(0))
    assert type(gate.screen_threshold) is float


# ---- gates given the wrong way -----------------------------------------------------------

def test_a_gate_class_instead_of_a_gate_is_refused():
    small, large = _pair()
    with pytest.raises(ConfigError, match=r"ConfidenceGate is a gate class, not a gate.*ConfidenceGate\(\)"):
        Cascade(small, large, ConfidenceGate)
    with pytest.raises(ConfigError, match="gate class"):
        Cascade(small, large).solve("p", gates=[VerifyGate])


def test_embedded_cascade_refuses_a_gate_class_and_a_lone_gate():
    with pytest.raises(ConfigError, match="gate class"):
        cascade.embedded_cascade(ConfidenceGate)
    with pytest.raises(ConfigError, match="gates must be a list of 1 gate"):
        cascade.embedded_cascade(gates=ConfidenceGate())


def test_one_gate_given_as_gates_is_refused_clearly():
    small, large = _pair()
    with pytest.raises(ConfigError, match="gates must be a list .* give gate="):
        Cascade(small, large, gates=ConfidenceGate())
    with pytest.raises(ConfigError, match="gates must be a list"):
        Cascade(small, large).solve("p", gates=ConfidenceGate())


@dataclasses.dataclass(frozen=True)
class _ScoreGate(Gate):
    value: object
    threshold: float = 0.5
    mode: str = "speculate"
    probe_tokens: int = 0
    requires_verification: bool = False

    def score(self, state):
        return self.value


@pytest.mark.parametrize("value", ["high", "0.9", None, math.nan, True])
def test_a_gate_returning_a_non_number_score_is_a_clear_error(value):
    small, large = _pair()
    with pytest.raises(ConfigError, match=r"_ScoreGate.score returned .* at step 0; a gate's score must be"):
        Cascade(small, large, _ScoreGate(value), options=OPTIONS).solve("p")


def test_numpy_scores_are_fine():
    small, large = _pair()
    high = Cascade(small, large, _ScoreGate(np.float32(0.9)), options=OPTIONS).solve("p")
    assert all(s.tier == 1 for s in high.steps)


# ---- the order of tiers ------------------------------------------------------------------

def test_tiers_in_the_wrong_order_are_refused():
    small, large = _pair()
    with pytest.raises(ConfigError, match="cheapest first: 'large'"):
        Cascade(large, small)
    with pytest.raises(ConfigError, match="cheapest first"):
        Cascade(small, large, cost_model=CostModel((Prices(1, 1), Prices(0.5, 0.5))))
    Cascade(large, small, cost_model=CostModel((Prices(0.1, 0.1), Prices(1, 1))))  # prices decide


def test_embedded_tiers_in_the_wrong_order_are_refused():
    with pytest.raises(ConfigError, match="cheapest first: 'embedded:large'"):
        cascade.embedded_cascade(tiers=("large", "small"))


# ---- the context length ------------------------------------------------------------------

def test_a_problem_longer_than_the_context_is_refused_before_any_call():
    runner = _cascade(context_length=40)
    assert runner.solve("p").answer == "3"  # a short one runs
    with pytest.raises(ConfigError, match=r"problem too long for model 'small'.*context holds 40"):
        runner.solve("x" * 30)  # prompt 32 tokens + a 12-token step > 40
    counted = _cascade(context_length=40)
    with pytest.raises(ConfigError):
        counted.solve_many(["x" * 30])
    assert _calls(counted) == 0
    outcomes = counted.solve_many(["p", "x" * 30], return_exceptions=True)
    assert outcomes[0].answer == "3" and isinstance(outcomes[1], ConfigError)  # the others go on


def test_hf_backends_report_their_context_length_and_long_problems_are_refused(tiny_dirs):
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    assert small.info.context_length == 512 == large.info.context_length  # max_position_embeddings
    runner = Cascade(small, large, options=OPTIONS)
    with pytest.raises(ConfigError, match="context holds 512"):
        runner.solve("a=1;" * 130 + "?a")
    assert ModelInfo("m", "f", 1, "\n").context_length is None  # unknown: not checked
