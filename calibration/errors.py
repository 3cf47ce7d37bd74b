"""Error hierarchy of the calibration package.

Every failure raised by this package is a :class:`CalibrationError`, which is a
``ValueError`` so that callers that only know "bad value" still catch it.
"""

from __future__ import annotations

__all__ = ["CalibrationError", "InfeasibleBudgetError", "InsufficientDataError"]


class CalibrationError(ValueError):
    """Bad input (NaN/inf costs, empty or mis-shaped arrays, alpha/delta
    outside (0, 1), negative budget, ...) or a calibration that cannot be
    certified. The message names the offending parameter and its value."""


class InfeasibleBudgetError(CalibrationError):
    """No candidate threshold satisfies the budget on this calibration set.

    The message states the cheapest achievable value (e.g. the cheapest
    threshold's conformal cost quantile, or its violation rate and p-value)."""


class InsufficientDataError(CalibrationError):
    """Too few calibration problems for the requested ``alpha``/``delta``:
    no outcome of the data could certify anything. The message states the
    minimum number of problems needed."""
