"""stepcascade's runtime: a small model writes reasoning steps; gates decide, step by step,
whether a larger model writes (or re-writes) a step instead.

    import cascade
    result = cascade.solve("a=17;b=a+38;c=b-25;?c", budget=400)   # embedded default pair: 30
    print(result.answer, result.cost.total, result.escalation_rate)
"""

from __future__ import annotations

from functools import lru_cache

from cascade.answer import extract_answer
from cascade.budget import (
    BudgetCurve,
    BudgetGate,
    PacedPolicy,
    calibrate_budget_curve,
    fit_budget_gate,
    load_budget_curve,
)
from cascade.calibrate import Calibration, CalibrationFileError, SweepResult, calibrate, sweep, sweep_file
from cascade.cost import Cost, CostModel, Prices, Usage
from cascade.embedded import EMBEDDED_DELIMITER, EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS, embedded_path
from cascade.errors import CascadeError, ConfigError, RequestTimeoutError, StepFailedError
from cascade.gates import (
    GATES,
    AdvantageGate,
    AlwaysLarge,
    AlwaysSmall,
    Confidence,
    ConfidenceGate,
    Gate,
    GateState,
    VerifyGate,
    decide,
    effective_threshold,
)
from cascade.records import Decision, Result, Step
from cascade.router import Router, collect_router_data, load_router, train_router
from cascade.runtime import Cascade, SolveOptions
from cascade.scorers import LikelihoodScorer, PRMScorer, StepScorer
from cascade.sequence_router import SequenceRouter, train_sequence_router
from cascade.specs import (
    GateSpec,
    ModelSpec,
    PolicySpec,
    load_model,
    load_models,
    make_gate,
    parse_gate,
    parse_policy,
)

__all__ = [
    "AdvantageGate",
    "AlwaysLarge",
    "AlwaysSmall",
    "BudgetCurve",
    "PacedPolicy",
    "BudgetGate",
    "Calibration",
    "CalibrationFileError",
    "Cascade",
    "CascadeError",
    "Confidence",
    "ConfidenceGate",
    "ConfigError",
    "Cost",
    "CostModel",
    "DEFAULT_EMBEDDED_GATE",
    "EMBEDDED_DELIMITER",
    "Decision",
    "GATES",
    "Gate",
    "GateSpec",
    "GateState",
    "LikelihoodScorer",
    "ModelSpec",
    "PRMScorer",
    "PolicySpec",
    "Prices",
    "RequestTimeoutError",
    "Result",
    "Router",
    "SequenceRouter",
    "SolveOptions",
    "Step",
    "StepFailedError",
    "StepScorer",
    "SweepResult",
    "Usage",
    "VerifyGate",
    "calibrate",
    "calibrate_budget_curve",
    "collect_router_data",
    "load_model",
    "load_models",
    "load_router",
    "decide",
    "effective_threshold",
    "embedded_cascade",
    "embedded_path",
    "extract_answer",
    "fit_budget_gate",
    "load_budget_curve",
    "make_gate",
    "parse_gate",
    "parse_policy",
    "solve",
    "sweep",
    "sweep_file",
    "train_router",
    "train_sequence_router",
]

# The gate the embedded pair uses by default (chosen on the calibration split; see README).
DEFAULT_EMBEDDED_GATE = ConfidenceGate(threshold=0.5, signal="min_prob", mode="speculate")


@lru_cache(maxsize=4)
def _load_embedded(tiers: tuple[str, ...], isolate: bool = False, threads: int = 1):
    return tuple(load_models([ModelSpec(f"embedded:{tier}", backend="process" if isolate and k > 0 else "hf",
                                        threads=threads if isolate and k > 0 else None)
                              for k, tier in enumerate(tiers)]))


def embedded_cascade(gate: Gate | None = None, tiers: tuple[str, ...] = ("small", "large"), *,
                     gates: list[Gate] | None = None, isolate: bool = False, threads: int = 1) -> Cascade:
    """A Cascade over the shipped embedded models (loaded once per process and shared).

    tiers: embedded model names, cheapest first. gate: the gate at every position, or
    gates: one per position (len(tiers) - 1). isolate: every tier above the first runs in
    a process of its own (`decoding.ProcessBackend`, `threads` torch threads each), so
    concurrent requests use one core per tier instead of sharing one GIL."""
    options = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS)
    if gates is not None and gate is not None:
        raise ConfigError("give either gate= or gates=, not both")
    if gates is None:  # given gates are checked by Cascade (a single gate there is refused clearly)
        gates = [gate or DEFAULT_EMBEDDED_GATE] * (len(tiers) - 1)
    return Cascade(models=list(_load_embedded(tuple(tiers), isolate, threads)), gates=gates, options=options)


def solve(problem: str, budget: float | None = None, *, gate: Gate | None = None) -> Result:
    """Solve one problem with the embedded default pair. `budget`: hard cap in cost units."""
    return embedded_cascade(gate).solve(problem, budget)
