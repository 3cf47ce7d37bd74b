"""The project's error hierarchy: every error a user can meet names the problem."""

from __future__ import annotations

import calibration.errors as _calibration

__all__ = ["CascadeError", "ConfigError", "StepFailedError", "RequestTimeoutError", "CertificationError",
           "InfeasibleBudgetError", "InsufficientDataError", "certification_error"]


class CascadeError(Exception):
    """Base of every error the cascade runtime raises on purpose."""


class ConfigError(CascadeError, ValueError):
    """A bad argument: the message names the parameter, the value and what is allowed."""


class StepFailedError(CascadeError):
    """A model failed while the cascade was writing a step.

    `partial` is the Result of the steps finished before the failure (nothing is lost);
    `backend` names the model and `step_index` the step.
    """

    def __init__(self, message: str, *, backend: str, step_index: int, partial=None) -> None:
        super().__init__(f"step {step_index}, model {backend!r}: {message}")
        self.backend = backend
        self.step_index = step_index
        self.partial = partial


class RequestTimeoutError(CascadeError):
    """A request ran past `SolveOptions.request_timeout`.

    `partial` is the Result of the steps finished before the deadline (nothing is lost).
    """

    def __init__(self, message: str, *, partial=None) -> None:
        super().__init__(message)
        self.partial = partial


# The calibration package is a leaf and knows nothing of this hierarchy, so its errors are
# re-raised where cascade calls it (`certification_error`), as these classes: each is both
# a CascadeError and the calibration package's own class, so `except CascadeError` and
# `except calibration.InfeasibleBudgetError` both catch it.

class CertificationError(CascadeError, _calibration.CalibrationError):
    """Calibration could not certify a threshold (or refused its statistical inputs)."""


class InfeasibleBudgetError(CertificationError, _calibration.InfeasibleBudgetError):
    """No candidate threshold satisfies the budget on this calibration set."""


class InsufficientDataError(CertificationError, _calibration.InsufficientDataError):
    """Too few calibration problems for the requested alpha/delta."""


def certification_error(error: _calibration.CalibrationError) -> CertificationError:
    """The cascade-side error for a calibration package error (same message)."""
    if isinstance(error, CertificationError):
        return error
    if isinstance(error, _calibration.InfeasibleBudgetError):
        return InfeasibleBudgetError(str(error))
    if isinstance(error, _calibration.InsufficientDataError):
        return InsufficientDataError(str(error))
    return CertificationError(str(error))
