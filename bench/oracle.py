"""The oracle gate of the embedded task: escalate exactly the drafts that are wrong.

It reads the exact step checker, so it is an upper bound for every real gate (which
only sees confidences), not something a user can deploy. It lives in bench because it
needs the task; cascade stays task-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.tasks import check_step
from cascade import Gate, GateState

__all__ = ["OracleGate"]


@dataclass(frozen=True)
class OracleGate(Gate):
    """score = 1 when the draft step is locally wrong (by the exact checker), else 0."""

    threshold: float = 0.5
    mode: str = "speculate"
    probe_tokens: int = 0
    requires_verification: bool = False

    def score(self, state: GateState) -> float:
        lines = [line for line in state.context.split("\n") if line]
        return 0.0 if check_step(state.problem, lines, state.output.text.strip()) else 1.0
