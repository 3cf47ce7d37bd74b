"""Selection object, objective choice, ordering helper, and input validation
shared by every selector."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import calibration
from calibration import (
    CalibrationError,
    InfeasibleBudgetError,
    InsufficientDataError,
    bonferroni_ltt,
    choose_by_objective,
    order_by_mean_cost,
    select_conformal,
    select_ltt,
    select_ltt_path,
    select_risk_control,
)


def test_error_hierarchy() -> None:
    assert issubclass(calibration.CalibrationError, ValueError)
    assert issubclass(InfeasibleBudgetError, CalibrationError)
    assert issubclass(InsufficientDataError, CalibrationError)
    assert set(calibration.__all__) <= set(dir(calibration))


def test_statement_ltt_exact_wording() -> None:
    costs = np.column_stack([np.full(300, 100.0), np.full(300, 700.0)])
    sel = select_ltt(costs, 600, alpha=0.1, delta=0.05, order=[0, 1], thresholds=[0.42, 0.1])
    assert sel.statement() == (
        "With probability >= 0.95 over the 300 calibration problems, P(cost > 600) <= 0.1 "
        "at threshold 0.42 (Learn-then-Test, fixed-sequence, binomial p-values)"
    )
    assert (sel.index, sel.threshold, sel.n, sel.budget) == (0, 0.42, 300, 600.0)


def test_statement_conformal_and_bonferroni_name_their_guarantee() -> None:
    costs = np.column_stack([np.full(300, 100.0), np.full(300, 200.0)])
    conf = select_conformal(costs, 600, 0.1, order=[0, 1])
    assert conf.statement().startswith("Marginally over 300 exchangeable")
    assert "P(cost > 600) <= 0.1 at threshold index 1" in conf.statement()
    bonf = bonferroni_ltt(costs, 600, 0.1, 0.05)
    assert "all 2 certified candidates" in bonf.statement() and "Bonferroni over 2" in bonf.statement()


def _selection() -> calibration.Selection:
    """Four candidates, all certified, in cheapest-first order [3, 1, 0, 2]."""
    costs = np.tile(np.array([3.0, 2.0, 4.0, 1.0]), (30, 1))
    return select_ltt(costs, 10.0, 0.1, 0.1, order=[3, 1, 0, 2])


def test_choose_by_objective_ties_go_to_cheaper() -> None:
    sel = _selection()
    assert sel.certified == (3, 1, 0, 2)
    # Candidates 0 and 1 tie at the max; 1 comes first in cheapest-first order.
    assert choose_by_objective(sel, [0.8, 0.8, 0.5, 0.1]) == 1
    assert choose_by_objective(sel, [0.8, 0.8, 0.5, 0.5], maximize=False) == 3
    assert sel.at(1).index == 1 and sel.at(1).certified == sel.certified


def test_choose_by_objective_only_among_certified() -> None:
    costs = np.column_stack([np.zeros(30), np.full(30, 5.0)])
    sel = select_ltt(costs, 1.0, 0.1, 0.1, order=[0, 1])
    assert sel.certified == (0,)
    assert choose_by_objective(sel, [0.1, np.nan]) == 0  # NaN off the certified set is fine
    with pytest.raises(CalibrationError, match="not certified"):
        sel.at(1)


@pytest.mark.parametrize("objective", [[1.0, 2.0, 3.0], [np.nan, 0.0, 0.0, 0.0]])
def test_choose_by_objective_rejects_bad_objective(objective: list[float]) -> None:
    with pytest.raises(CalibrationError, match="objective"):
        choose_by_objective(_selection(), objective)


def test_order_by_mean_cost_is_stable_ascending() -> None:
    costs = np.array([[3.0, 1.0, 2.0, 1.0], [3.0, 1.0, 2.0, 1.0]])
    assert order_by_mean_cost(costs).tolist() == [1, 3, 2, 0]


# ---------------------------------------------------------------- validation

GOOD = np.tile(np.array([1.0, 2.0, 3.0]), (40, 1))

Selector = Callable[..., object]
SELECTORS: dict[str, Selector] = {
    "conformal": lambda c, b, a, d, o: select_conformal(c, b, a, o),
    "ltt": lambda c, b, a, d, o: select_ltt(c, b, a, d, o),
    "ltt_path": lambda c, b, a, d, o: select_ltt_path(c, b, a, d, o),
    "bonferroni": lambda c, b, a, d, o: bonferroni_ltt(c, b, a, d, o),
    "risk": lambda c, b, a, d, o: select_risk_control(c, b, o, cost_max=10.0),
}
ALL = list(SELECTORS)
WITH_ALPHA = ["conformal", "ltt", "ltt_path", "bonferroni"]
WITH_DELTA = ["ltt", "ltt_path", "bonferroni"]


def _call(name: str, costs=GOOD, budget=100.0, alpha=0.1, delta=0.1, order=(0, 1, 2)):
    return SELECTORS[name](costs, budget, alpha, delta, np.asarray(order))


@pytest.mark.parametrize("name", ALL)
def test_all_selectors_accept_good_input(name: str) -> None:
    assert _call(name).certified == (0, 1, 2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad, pattern", [(np.nan, r"costs must be finite, got nan"), (np.inf, r"got inf")])
def test_non_finite_costs(name: str, bad: float, pattern: str) -> None:
    costs = GOOD.copy()
    costs[5, 1] = bad
    with pytest.raises(CalibrationError, match=pattern + r".*index \[5, 1\]"):
        _call(name, costs=costs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("costs", [np.zeros((0, 3)), np.zeros((40, 0)), np.zeros(40), [["a"]]])
def test_empty_or_misshaped_costs(name: str, costs) -> None:
    with pytest.raises(CalibrationError, match="costs"):
        _call(name, costs=costs)


@pytest.mark.parametrize("name", WITH_ALPHA)
@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, np.nan, "x"])
def test_bad_alpha(name: str, alpha) -> None:
    with pytest.raises(CalibrationError, match=r"alpha must be .*got " + repr(alpha).replace(".", r"\.")):
        _call(name, alpha=alpha)


@pytest.mark.parametrize("name", WITH_DELTA)
@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5, 2.0, np.nan])
def test_bad_delta(name: str, delta: float) -> None:
    pattern = r"delta must be in \(0, 1\), got " + repr(delta).replace(".", r"\.")
    with pytest.raises(CalibrationError, match=pattern):
        _call(name, delta=delta)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [-1.0, np.nan, np.inf])
def test_bad_budget(name: str, budget: float) -> None:
    with pytest.raises(CalibrationError, match=r"budget must be a finite number >= 0, got"):
        _call(name, budget=budget)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "order, pattern",
    [
        ((), "non-empty"),
        ((0, 0, 1), "repeat"),
        ((0, 3), r"\[0, 2\]"),
        ((-1, 0), r"\[0, 2\]"),
        ((0.0, 1.0), "integer"),
    ],
)
def test_bad_order(name: str, order: tuple, pattern: str) -> None:
    with pytest.raises(CalibrationError, match=pattern):
        _call(name, order=order)


def test_bad_pvalue_and_thresholds() -> None:
    with pytest.raises(CalibrationError, match="pvalue"):
        select_ltt(GOOD, 100.0, 0.1, 0.1, [0, 1, 2], pvalue="bentkus")  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match=r"thresholds must have 3 rows"):
        select_ltt(GOOD, 100.0, 0.1, 0.1, [0, 1, 2], thresholds=[0.1, 0.2])
    with pytest.raises(CalibrationError, match="thresholds must be finite"):
        select_conformal(GOOD, 100.0, 0.1, [0, 1, 2], thresholds=[0.1, np.nan, 0.3])
