"""Cost accounting: prices per model, and the one function that charges a model call.

Default unit: *large-model token equivalents*. One token decoded by the most expensive
(last) tier costs 1; every other token, prefilled or decoded, by any tier, is priced
by its FLOPs relative to that (2 * parameters per token), so a budget reads as "at
most the price of N top-tier tokens". Users may set their own prices per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cascade.errors import ConfigError

__all__ = ["Prices", "CostModel", "Usage", "Cost"]


@dataclass(frozen=True)
class Prices:
    """Cost units per token a model reads (prefill, `input`) and writes (decode, `output`)."""

    input: float
    output: float

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"price {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class CostModel:
    """Prices per tier, cheapest tier first."""

    prices: tuple[Prices, ...]

    @classmethod
    def flops(cls, num_parameters: Sequence[int]) -> CostModel:
        """FLOPs-ratio prices: a token of tier k costs params_k / params_top, read or written."""
        if not num_parameters or min(num_parameters) <= 0:
            raise ConfigError(f"num_parameters must be positive, got {list(num_parameters)}")
        top = num_parameters[-1]
        return cls(tuple(Prices(input=p / top, output=p / top) for p in num_parameters))

    def charge(self, tier: int, prefill_tokens: int, generated_tokens: int) -> float:
        """The cost of one model call. Every cost in a Result comes from here."""
        prices = self.prices[tier]
        return prices.input * prefill_tokens + prices.output * generated_tokens

    def worst_case(self, tier: int, prefill_tokens: int, max_tokens: int) -> float:
        """The most a call could cost: what the hard-cap check compares to what is left."""
        return self.charge(tier, prefill_tokens, max_tokens)

    def affordable_tokens(self, tier: int, prefill_tokens: int, remaining: float) -> int:
        """How many tokens tier can decode after prefilling, without spending past `remaining`."""
        left = remaining - self.prices[tier].input * prefill_tokens
        if left < 0:
            return 0
        output = self.prices[tier].output
        # The small epsilon keeps float rounding from granting a token that would overshoot.
        tokens = left / output * (1 - 1e-12) if output > 0 else math.inf
        if tokens >= 1 << 30:  # free decoding, or a budget so large it overflows a float
            return 1 << 30
        return max(0, math.floor(tokens))


@dataclass(frozen=True)
class Usage:
    """What one tier did for a step or a request: tokens read and written, seconds, cost."""

    prefill_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prefill_tokens + other.prefill_tokens,
                     self.generated_tokens + other.generated_tokens,
                     self.seconds + other.seconds, self.cost + other.cost)


@dataclass(frozen=True)
class Cost:
    """A request's totals. per_tier[k] is tier k's Usage; total is the sum of their costs."""

    per_tier: tuple[Usage, ...]

    @property
    def total(self) -> float:
        return math.fsum(u.cost for u in self.per_tier)

    @property
    def seconds(self) -> float:
        return math.fsum(u.seconds for u in self.per_tier)

    def to_json(self) -> dict:
        return {"total": self.total,
                "per_tier": [u.__dict__.copy() for u in self.per_tier]}
