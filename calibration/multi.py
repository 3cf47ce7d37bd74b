"""Learn-then-Test for threshold VECTORS: N-tier cascades with one threshold per gate.

An N-tier cascade has N - 1 gates, so a candidate is a vector of thresholds and the
candidates form a grid (usually a product of per-gate threshold lists). A single
ordered path through that grid (:func:`calibration.select_ltt_path`) can only certify
what lies on it; here several paths are tested, each by fixed-sequence testing at its
own share of delta (Bonferroni over paths), and the union of what they certify is kept.

* :func:`product_grid` -- the product grid of per-gate threshold lists, shape
  (K, n_gates), each gate's values from highest (cheapest: escalates least) to lowest.
* :func:`grid_paths` -- paths fixed by design (no data): from the cheapest corner of a
  product grid to the most escalating one, lowering all gates together (the diagonal)
  and lowering one gate first (one staircase per gate).
* :func:`select_ltt_paths` -- the procedure; its docstring states the guarantee.

This module only sees arrays; it knows nothing about models or gates.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from ._common import (
    check_budget,
    check_costs,
    check_finite_array,
    check_order,
    check_probability,
    check_thresholds,
    describe_threshold,
    fmt,
    leading_true,
    scatter,
)
from .errors import CalibrationError, InfeasibleBudgetError, InsufficientDataError
from .ltt import PValueMethod, ltt_pvalues, min_n_ltt
from .selection import LTT_PATHS, Selection

__all__ = ["product_grid", "grid_paths", "select_ltt_paths"]


def product_grid(values_per_gate: Sequence[Sequence[float]]) -> np.ndarray:
    """All threshold vectors of a product grid.

    Args:
        values_per_gate: one list of threshold values per gate (n_gates lists).

    Returns:
        float array, shape (prod(len(v)), n_gates): every combination, each gate's
        values sorted from highest to lowest (for the built-in gates the highest
        threshold escalates least, so row 0 is the cheapest corner), rows in
        lexicographic order of those sorted positions.
    """
    if not values_per_gate:
        raise CalibrationError("values_per_gate must name at least one gate's thresholds")
    axes = []
    for g, values in enumerate(values_per_gate):
        arr = check_finite_array(f"values_per_gate[{g}]", values, ndim=1)
        axes.append(np.unique(arr)[::-1])
    return np.array(list(itertools.product(*axes)), dtype=float)


def _grid_axes(grid: np.ndarray) -> list[np.ndarray]:
    """Per-gate values (highest first) of a product grid; raises if it is not one."""
    axes = [np.unique(grid[:, g])[::-1] for g in range(grid.shape[1])]
    if int(np.prod([a.size for a in axes])) != grid.shape[0] or \
            np.unique(grid, axis=0).shape[0] != grid.shape[0]:
        raise CalibrationError(
            f"candidates (shape {grid.shape}) are not a product grid of per-gate thresholds "
            "without repeats; give the paths explicitly"
        )
    return axes


def grid_paths(candidates: ArrayLike) -> tuple[np.ndarray, ...]:
    """Paths through a product grid of threshold vectors, fixed without data.

    Each path starts at the cheapest corner (every gate at its highest threshold)
    and, one grid notch at a time, lowers thresholds until every gate is at its
    lowest (the most escalating corner):

    * the diagonal: every gate moves one notch per move (a gate with fewer values
      stops at its lowest);
    * for each gate g, a staircase: gate g moves first down to its lowest value,
      then the other gates move together as on the diagonal.

    Identical paths are returned once (with one gate, there is a single path).

    Args:
        candidates: float array, shape (K, n_gates), a product grid in any row
            order (e.g. from :func:`product_grid`).

    Returns:
        tuple of int arrays of candidate (row) indices, cheapest first.
    """
    grid = check_finite_array("candidates", candidates, ndim=2)
    axes = _grid_axes(grid)
    where = {tuple(row): k for k, row in enumerate(grid.tolist())}
    depth = [a.size - 1 for a in axes]

    def row_of(position: Sequence[int]) -> int:
        return where[tuple(float(axes[g][p]) for g, p in enumerate(position))]

    def diagonal_from(start: list[int], gates: Sequence[int]) -> list[list[int]]:
        moves, position = [], list(start)
        while any(position[g] < depth[g] for g in gates):
            position = [min(p + 1, depth[g]) if g in gates else p for g, p in enumerate(position)]
            moves.append(position)
        return moves

    n_gates = grid.shape[1]
    start = [0] * n_gates
    shapes = [[start] + diagonal_from(start, range(n_gates))]
    if n_gates > 1:
        for first in range(n_gates):
            lowered = [[depth[g] if g == first else 0 for g in range(n_gates)]]
            head = [[p if g == first else 0 for g in range(n_gates)] for p in range(depth[first] + 1)]
            rest = [g for g in range(n_gates) if g != first]
            shapes.append(head + diagonal_from(lowered[0], rest))
    paths: list[np.ndarray] = []
    for shape in shapes:
        path = np.array([row_of(p) for p in shape], dtype=np.intp)
        if not any(np.array_equal(path, seen) for seen in paths):
            paths.append(path)
    return tuple(paths)


def select_ltt_paths(
    costs: ArrayLike,
    budget: float,
    alpha: float,
    delta: float,
    paths: Sequence[ArrayLike],
    weights: ArrayLike | None = None,
    pvalue: PValueMethod = "binomial",
    thresholds: ArrayLike | None = None,
) -> Selection:
    """Learn-then-Test over several ordered paths through a grid of threshold vectors:
    fixed-sequence testing along each path at level delta * w_p (Bonferroni over paths).

    For candidate c, H0_c: P(cost(c) > B) > alpha is tested with the exact
    p-value of :func:`calibration.ltt_pvalues` from k_c = #{i : cost_ic > B}. Along
    path p (cheapest first), candidates are rejected while p_c <= delta * w_p, and
    testing of that path stops at its first non-rejection. The certified set is
    the union of the paths' rejected prefixes, ranked by ascending mean calibration
    cost; the chosen index is the last (most escalating) of them.

    Args:
        costs: float array, shape (n_problems, n_candidates), cost units: cost of
            problem i under threshold vector c.
        budget: per-problem budget B >= 0, same units.
        alpha: level for P(cost > B), in (0, 1).
        delta: allowed probability of certifying any bad candidate, in (0, 1).
        paths: m int arrays of candidate indices, each cheapest first, fixed
            WITHOUT looking at this calibration data (e.g. :func:`grid_paths`).
            Paths may share candidates; a candidate on no path is never tested.
        weights: m nonnegative weights summing to 1 (default: equal), fixed in
            advance like the paths.
        pvalue: ``"binomial"`` (default) or ``"hoeffding_bentkus"``.
        thresholds: optional vectors, shape (n_candidates, n_gates), for reporting.

    Returns:
        Selection (method ``"ltt_paths"``); ``p_values`` and ``statistics``
        (empirical violation rates) are set for every candidate some path tested.

    Guarantee: if the calibration problems and a test problem are i.i.d., then
    P( some certified c has P(cost_test(c) > B) > alpha ) <= delta (probability over
    the calibration set). Proof: a false rejection on path p happens with
    probability <= delta * w_p (fixed-sequence testing controls the FWER of a
    pre-ordered sequence at its level, whatever the truth of later hypotheses);
    the union bound over paths gives sum_p delta * w_p = delta. No monotonicity of
    cost in the thresholds is assumed. With one path it certifies the same set as
    :func:`calibration.select_ltt_path`.

    Raises:
        InfeasibleBudgetError: no path rejects its first candidate (the message
            states that candidate's violation rate and p-value).
        InsufficientDataError: even k = 0 would not give a p-value <= the largest
            path level (the message states the minimum n).
        CalibrationError: invalid inputs (bad weights, paths out of range, ...).

    Reference: Angelopoulos et al., "Learn then Test" (2021), Sec. 4 (fixed-sequence
    testing, multi-parameter families); Bretz et al., "A graphical approach to
    sequentially rejective multiple test procedures" (2009) -- this is that scheme
    with Bonferroni weights and no recycling of level between paths.
    """
    arr = check_costs(costs)
    budget = check_budget(budget)
    alpha = check_probability("alpha", alpha)
    delta = check_probability("delta", delta)
    n, m_all = arr.shape
    if len(paths) == 0:
        raise CalibrationError("paths must hold at least one path of candidate indices")
    idx = [check_order(np.asarray(p), m_all, name=f"paths[{q}]") for q, p in enumerate(paths)]
    if weights is None:
        w = np.full(len(idx), 1.0 / len(idx))
    else:
        w = check_finite_array("weights", weights, ndim=1)
        if w.size != len(idx) or (w < 0).any() or abs(w.sum() - 1.0) > 1e-9:
            raise CalibrationError(f"weights must be {len(idx)} nonnegative numbers summing to 1, "
                                   f"got {w.tolist()}")
    thr = check_thresholds(thresholds, m_all, allow_vectors=True)
    levels = delta * w
    n_min = min_n_ltt(alpha, float(levels.max()), pvalue)
    if n < n_min:
        raise InsufficientDataError(
            f"n={n} calibration problems cannot certify any threshold vector at alpha={fmt(alpha)} "
            f"with delta={fmt(delta)} split over {len(idx)} paths (largest path level "
            f"{fmt(levels.max())}): even zero violations give p-value (1-alpha)^n = "
            f"{fmt((1 - alpha) ** n)}; need n >= {n_min}"
        )
    k = (arr > budget).sum(axis=0)
    p_all = ltt_pvalues(k, n, alpha, pvalue)
    tested = np.zeros(m_all, dtype=bool)
    certified_mask = np.zeros(m_all, dtype=bool)
    for path, level in zip(idx, levels, strict=False):
        n_rej = leading_true(p_all[path] <= level) if level > 0 else 0
        certified_mask[path[:n_rej]] = True
        tested[path[: min(n_rej + 1, path.size)]] = True
    if not certified_mask.any():
        first = int(idx[int(np.argmax(levels))][0])
        raise InfeasibleBudgetError(
            f"no threshold vector keeps P(cost > {fmt(budget)}) <= {fmt(alpha)} "
            f"(delta={fmt(delta)} over {len(idx)} paths): the cheapest candidate "
            f"({describe_threshold(first, thr)}) has empirical violation rate "
            f"{fmt(k[first] / n)} ({int(k[first])}/{n}) and {pvalue} p-value {fmt(p_all[first])} > "
            f"{fmt(levels.max())}"
        )
    certified_idx = np.nonzero(certified_mask)[0]
    ranked = certified_idx[np.argsort(arr[:, certified_idx].mean(axis=0), kind="stable")]
    order = np.unique(np.concatenate(idx))
    order = order[np.argsort(arr[:, order].mean(axis=0), kind="stable")]
    tested_idx = np.nonzero(tested)[0]
    return Selection(
        index=int(ranked[-1]),
        certified=tuple(int(i) for i in ranked),
        order=tuple(int(i) for i in order),
        method=LTT_PATHS,
        budget=budget,
        n=n,
        alpha=alpha,
        delta=delta,
        p_values=scatter(tested_idx, p_all[tested_idx], m_all),
        statistics=scatter(tested_idx, k[tested_idx] / n, m_all),
        statistic_name=f"empirical P(cost > {fmt(budget)})",
        thresholds=thr,
        pvalue=pvalue,
    )
