"""Private input validation and small numeric helpers (no public API)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .errors import CalibrationError

Threshold = float | tuple[float, ...]


def fmt(x: float) -> str:
    """Format a number for messages: 6 significant digits, no float noise."""
    return f"{float(x):.6g}"


def ceil_tol(x: float) -> int:
    """``ceil(x)`` that ignores floating-point noise just above an integer.

    ``(n + 1) * (1 - alpha)`` is meant exactly (e.g. ``10 * 0.9 == 9``); a
    relative error of 1e-9 is treated as rounding noise, not as data.
    """
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def check_probability(name: str, value: float) -> float:
    """Return ``value`` as float, raising CalibrationError unless in (0, 1)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < v < 1.0:  # also rejects NaN
        raise CalibrationError(f"{name} must be in (0, 1), got {value!r}")
    return v


def check_budget(budget: float) -> float:
    """Validate the budget B: finite and >= 0."""
    return check_nonnegative("budget", budget)


def check_nonnegative(name: str, value: float) -> float:
    """Return ``value`` as float, raising CalibrationError unless finite and >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0.0:
        raise CalibrationError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_finite_array(name: str, values: ArrayLike, ndim: int) -> np.ndarray:
    """Convert to a float array with ``ndim`` dims, non-empty and all finite."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise CalibrationError(f"{name} must be a numeric array, got {type(values).__name__}") from None
    if arr.ndim != ndim:
        raise CalibrationError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise CalibrationError(f"{name} must be non-empty, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CalibrationError(
            f"{name} must be finite, got {arr[where]} at index {list(where)} "
            f"({int(bad.sum())} non-finite entries)"
        )
    return arr


def check_costs(costs: ArrayLike) -> np.ndarray:
    """Validate a cost matrix of shape (n_problems, n_thresholds)."""
    return check_finite_array("costs", costs, ndim=2)


def check_order(order: ArrayLike, n_thresholds: int, name: str = "order") -> np.ndarray:
    """Validate an ordering: non-empty 1-D distinct integer indices in range."""
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.size == 0:
        raise CalibrationError(f"{name} must be a non-empty 1-D sequence of indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise CalibrationError(f"{name} must contain integer indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n_thresholds:
        raise CalibrationError(
            f"{name} indices must lie in [0, {n_thresholds - 1}], got range [{arr.min()}, {arr.max()}]"
        )
    if np.unique(arr).size != arr.size:
        raise CalibrationError(f"{name} must not repeat indices, got {arr.tolist()}")
    return arr.astype(np.intp)


def check_thresholds(
    thresholds: ArrayLike | None, n_thresholds: int, allow_vectors: bool = False
) -> tuple[Threshold, ...] | None:
    """Validate threshold values: shape (n_thresholds,) or, when
    ``allow_vectors``, (n_thresholds, n_gates) for N-tier cascades."""
    if thresholds is None:
        return None
    arr = np.asarray(thresholds, dtype=float)
    ndim = arr.ndim if allow_vectors and arr.ndim == 2 else 1
    arr = check_finite_array("thresholds", arr, ndim=ndim)
    if arr.shape[0] != n_thresholds:
        raise CalibrationError(
            f"thresholds must have {n_thresholds} rows (one per costs column), got shape {arr.shape}"
        )
    if arr.ndim == 1:
        return tuple(float(t) for t in arr)
    return tuple(tuple(float(t) for t in row) for row in arr)


def leading_true(mask: np.ndarray) -> int:
    """Length of the all-True prefix of a 1-D boolean array."""
    return int(mask.size if mask.all() else np.argmin(mask))


def scatter(order: np.ndarray, values: np.ndarray, size: int) -> tuple[float, ...]:
    """Per-candidate tuple of length ``size``: ``values[k]`` at ``order[k]``, NaN elsewhere."""
    out = np.full(size, np.nan)
    out[order[: values.size]] = values
    return tuple(float(v) for v in out)


def describe_threshold(index: int, thresholds: tuple[Threshold, ...] | None) -> str:
    """Human-readable name of candidate ``index``."""
    if thresholds is None:
        return f"threshold index {index}"
    value = thresholds[index]
    if isinstance(value, tuple):
        return "threshold (" + ", ".join(fmt(v) for v in value) + ")"
    return f"threshold {fmt(value)}"
