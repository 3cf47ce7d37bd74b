"""Checks of the values that cross the Python API: the one place they are validated.

Each check returns the value in the form the library uses (a plain `str` or `float`) or
raises `ConfigError` naming the parameter, the value given and what is allowed. Numbers
may be any real number type, numpy's included (`np.int64`, `np.float32`), but never a
bool: `True` is a mistake, not 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from cascade.errors import ConfigError

__all__ = ["check_problem", "check_problems", "check_budget", "check_threshold", "check_probability",
           "check_number"]


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_number(value: object, name: str) -> float:
    """A real number (int, float or numpy number, not a bool) as a float; NaN is refused,
    infinities are left to the caller's range check."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if math.isnan(number):
        raise ConfigError(f"{name} must be a number, got NaN")
    return number


def check_problem(problem: object) -> str:
    """A problem: a non-empty string of valid Unicode text (no lone surrogates, which
    no tokenizer can encode)."""
    if not isinstance(problem, str):
        raise ConfigError(f"problem must be a string, got {type(problem).__name__}")
    if not problem.strip():
        raise ConfigError("problem is empty")
    try:
        problem.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(f"problem is not valid Unicode text: {problem[error.start:error.end]!r} at "
                          f"position {error.start} is a lone surrogate") from None
    return problem


def check_problems(problems: Iterable[str]) -> list[str]:
    """A list (any iterable) of problems, each checked by `check_problem`. A bare string is
    refused: iterating it would solve each of its characters as a problem."""
    if isinstance(problems, (str, bytes)):
        raise ConfigError(f"problems must be a list of strings, got a single {type(problems).__name__} "
                          f"{problems[:40]!r}; wrap it in a list, or solve one problem with solve()")
    try:
        items = list(problems)
    except TypeError:
        raise ConfigError(f"problems must be a list of strings, got {type(problems).__name__}") from None
    return [check_problem(p) for p in items]


def check_budget(budget: object) -> float | None:
    """A hard cap in cost units: a finite number >= 0, or None for no cap."""
    if budget is None:
        return None
    if _is_bool(budget) or not isinstance(budget, numbers.Real):
        raise ConfigError(f"budget must be a number or None, got {budget!r}")
    value = float(budget)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"budget must be finite and >= 0 (cost units), got {budget!r}")
    return value


def check_threshold(value: object, name: str = "threshold", *, low: float = 0.0, high: float = 1.0) -> float:
    """A gate threshold in [low, high]: the range its gate's score can take (the built-in
    scored gates' scores are probabilities or one minus a confidence, so [0, 1]); a
    threshold outside it would escalate always or never, which `AlwaysLarge` and
    `AlwaysSmall` say plainly."""
    number = check_number(value, name)
    if not low <= number <= high:
        raise ConfigError(f"{name} must lie in [{low:g}, {high:g}] (the range of the gate's score), "
                          f"got {value!r}")
    return number


def check_probability(value: object, name: str) -> float:
    """A risk level or error rate such as calibration's alpha and delta: strictly between
    0 and 1 (0 certifies nothing, 1 promises nothing)."""
    number = check_number(value, name)
    if not 0.0 < number < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return number
