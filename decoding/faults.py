"""Fault injection: wrap any backend so chosen calls fail, stall or return malformed output.

For testing what a deployment does when a model misbehaves (the cascade's
`on_large_failure` policy, step and request timeouts) without breaking a real engine:

    flaky = FaultyBackend(large, at_calls({3: "error", 5: "stall"}), stall_seconds=2.0)
    Cascade(small, flaky, gate, on_large_failure="degrade")

Calls are counted per request served (a batch of 4 requests is 4 calls), in the order
the backend receives them, starting at 1. This module knows nothing about cascades.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Literal

from decoding.types import Backend, BackendError, ScoreOutput, ScoreRequest, StepOutput, StepRequest

__all__ = ["FaultKind", "FaultSchedule", "FaultyBackend", "at_calls"]

FaultKind = Literal["error", "stall", "malformed"]
# schedule(call_number, request) -> the fault to inject into this call, or None
FaultSchedule = Callable[[int, "StepRequest | ScoreRequest"], "FaultKind | None"]
_KINDS = ("error", "stall", "malformed")


def at_calls(faults: Mapping[int, FaultKind]) -> FaultSchedule:
    """A schedule that injects `faults[n]` into call number n (1-based)."""
    for number, kind in faults.items():
        if kind not in _KINDS:
            raise ValueError(f"unknown fault {kind!r} for call {number}; choose one of {_KINDS}")
    table = dict(faults)
    return lambda number, request: table.get(number)


class FaultyBackend(Backend):
    """A backend that behaves like `backend` except where `schedule` injects a fault.

    error: the call raises BackendError. stall: the call sleeps `stall_seconds` first,
    then answers normally (a step timeout shorter than that turns it into a failure).
    malformed: the output's log-probabilities are NaN (a broken engine or server reply).
    A fault in one request of a batch fails (error) or delays (stall) the whole batch,
    as a real engine would. `injected` lists (call number, kind) of every fault injected.
    """

    def __init__(self, backend: Backend, schedule: FaultSchedule, *, stall_seconds: float = 1.0) -> None:
        if not (isinstance(stall_seconds, (int, float)) and math.isfinite(stall_seconds)
                and stall_seconds >= 0):
            raise ValueError(f"stall_seconds must be a finite number >= 0, got {stall_seconds!r}")
        self.backend = backend
        self.info = backend.info
        self.schedule = schedule
        self.stall_seconds = float(stall_seconds)
        self.calls = 0
        self.injected: list[tuple[int, FaultKind]] = []

    def _faults(self, requests: Sequence[StepRequest | ScoreRequest]) -> list[FaultKind | None]:
        kinds = []
        for request in requests:
            self.calls += 1
            kind = self.schedule(self.calls, request)
            if kind is not None:
                if kind not in _KINDS:
                    raise ValueError(f"schedule returned unknown fault {kind!r}; choose one of {_KINDS}")
                self.injected.append((self.calls, kind))
            kinds.append(kind)
        return kinds

    def _before(self, kinds: list[FaultKind | None]) -> None:
        if "stall" in kinds:
            time.sleep(self.stall_seconds)
        if "error" in kinds:
            raise BackendError(f"injected failure at call {self.calls}", self.info.name)

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        kinds = self._faults(requests)
        self._before(kinds)
        outputs = self.backend.next_steps(requests)
        return [replace(o, logprobs=tuple(math.nan for _ in o.logprobs) or (math.nan,),
                        token_ids=o.token_ids or (0,), entropies=o.entropies or (0.0,))
                if kind == "malformed" else o for o, kind in zip(outputs, kinds, strict=False)]

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        kinds = self._faults(requests)
        self._before(kinds)
        outputs = self.backend.score_steps(requests)
        return [replace(o, logprobs=tuple(math.nan for _ in o.logprobs) or (math.nan,),
                        token_ids=o.token_ids or (0,))
                if kind == "malformed" else o for o, kind in zip(outputs, kinds, strict=False)]

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        return self.backend.prefill_bound(request_id, problem, context)

    def release(self, request_id: str) -> None:
        self.backend.release(request_id)

    # The wrapped backend forks when it can (calibration sweeps). The async methods are not
    # passed on (native_async stays False): the driver then calls the sync, fault-injecting ones.
    @property
    def supports_fork(self) -> bool:  # type: ignore[override]
        return self.backend.supports_fork

    def fork(self, source_id: str, target_id: str) -> None:
        self.backend.fork(source_id, target_id)

    def state_key(self, request: StepRequest | ScoreRequest) -> Hashable | None:
        return self.backend.state_key(request)

    def adopt(self, source_id: str, request: StepRequest | ScoreRequest) -> None:
        self.backend.adopt(source_id, request)
