"""Synthetic, reasonably realistic step-cascade cost families for the
calibration tests (seeded numpy Generators only; no global RNG).

Cost model: a problem has 3..20 reasoning steps with 20..200 tokens each.
Every step is drafted by the small model (1 cost unit per token); an
escalated step is also written by the large model (8 units per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

MAX_STEPS = 20
TOK_MIN, TOK_MAX = 20.0, 200.0
C_SMALL, C_LARGE = 1.0, 8.0
COST_MAX = MAX_STEPS * TOK_MAX * (C_SMALL + C_LARGE)  # every step maximal and escalated


@dataclass(frozen=True)
class Family:
    pool: np.ndarray  # (n_pool, n_candidates) costs
    order: np.ndarray  # candidate indices, cheapest first (fixed by design, not by data)
    thresholds: np.ndarray | None
    cost_max: float = COST_MAX  # upper bound on any problem's cost in this model


def _steps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Token counts, shape (n, MAX_STEPS); 0 for steps the problem does not have."""
    n_steps = rng.integers(3, MAX_STEPS + 1, size=n)
    live = np.arange(MAX_STEPS)[None, :] < n_steps[:, None]
    return rng.uniform(TOK_MIN, TOK_MAX, size=(n, MAX_STEPS)) * live


def monotone_costs(rng: np.random.Generator, n: int, thresholds: np.ndarray) -> np.ndarray:
    """Deterministic gate: a step is escalated iff its difficulty score > threshold,
    so raising the threshold escalates less and every problem's cost is
    nonincreasing in the threshold. Difficulty = problem hardness ~ Beta(2, 5)
    plus N(0, 0.15^2) step noise. ``thresholds`` must be sorted ascending.
    Returns shape (n, thresholds.size)."""
    tokens = _steps(rng, n)
    hardness = rng.beta(2.0, 5.0, size=n)
    diff = np.clip(hardness[:, None] + 0.15 * rng.standard_normal((n, MAX_STEPS)), 0.0, 1.0)
    m = thresholds.size
    n_below = np.searchsorted(thresholds, diff, side="left")  # escalated at j iff j < n_below
    flat = (np.arange(n)[:, None] * (m + 1) + n_below).ravel()
    hist = np.bincount(flat, weights=tokens.ravel(), minlength=n * (m + 1)).reshape(n, m + 1)
    escalated = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # tokens with diff > t_j
    return C_SMALL * tokens.sum(axis=1)[:, None] + C_LARGE * escalated


def stochastic_gate_costs(rng: np.random.Generator, n: int, esc_probs: np.ndarray) -> np.ndarray:
    """Sampled gate (e.g. a temperature-sampled router): under candidate j each
    step escalates independently with probability esc_probs[j], resampled per
    candidate, so costs are NOT monotone across candidates for a problem.
    Returns shape (n, esc_probs.size)."""
    tokens = _steps(rng, n)
    esc = rng.random((n, MAX_STEPS, esc_probs.size)) < esc_probs
    return np.einsum("ik,ikj->ij", tokens, C_SMALL + C_LARGE * esc)


@pytest.fixture(scope="session")
def monotone_family() -> Family:
    """20000 problems x 60 thresholds in [0, 1]; cheapest = highest threshold."""
    thresholds = np.linspace(0.0, 1.0, 60)
    pool = monotone_costs(np.random.default_rng(20240601), 20000, thresholds)
    return Family(pool=pool, order=np.arange(thresholds.size)[::-1], thresholds=thresholds)


@pytest.fixture(scope="session")
def nonmonotone_family() -> Family:
    """20000 problems x 51 candidates: candidate 0 escalates 15% of steps,
    candidates 1..50 escalate 40% each with independent sampling."""
    probs = np.r_[0.15, np.full(50, 0.40)]
    pool = stochastic_gate_costs(np.random.default_rng(20240602), 20000, probs)
    return Family(pool=pool, order=np.arange(probs.size), thresholds=None)
