"""The project's error hierarchy: every error a user can meet names the problem."""

from __future__ import annotations

__all__ = ["CascadeError", "ConfigError", "StepFailedError", "RequestTimeoutError"]


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
