"""Traces of the embedded models under every mechanism of the step loop, as JSON.

The pin for refactors of the step machine (`cascade.runtime._Run`): the same problems run
under policies that together take every path of `write_step` (route probes, speculative
drafts, verification, screening, token fixes, draft-ahead, the hard cap, three tiers,
degrade-on-failure), and the JSON records each result (steps, decisions, usage, costs,
answers; wall-clock seconds left out) and every model call the runtime made, in order.
A refactor that keeps behaviour gives byte-identical JSON on the same machine:

    python -m tests.step_traces before.json        # from the repository root
    ... refactor ...
    python -m tests.step_traces after.json && cmp before.json after.json

tests/cascade/test_step_traces.py checks a few problems against the committed record
(tests/cascade/data/step_traces.json), comparing floats to a relative 1e-6 so that it holds
on other CPUs too.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

from cascade import (
    AdvantageGate,
    AlwaysLarge,
    AlwaysSmall,
    Cascade,
    ConfidenceGate,
    SolveOptions,
    VerifyGate,
)
from cascade.embedded import EMBEDDED_DELIMITER, EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS, embedded_path
from cascade.gates import AdvantageModel
from decoding import Backend, FaultyBackend, HFBackend

DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "embedded_test.jsonl"
PROBLEMS = 30
OPTIONS = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS)


def problems(n: int = PROBLEMS) -> list[str]:
    lines = DATA.read_text().splitlines()[:n]
    return [json.loads(line)["problem"] for line in lines]


class HiddenRouter(AdvantageModel):
    """A fixed stand-in for a trained router: a logistic function of a few hidden-state
    coordinates and the draft's confidence (deterministic, no training needed)."""

    def advantage_probability(self, state) -> float:
        hidden = state.output.hidden or ()
        z = 4.0 * (sum(hidden[:8]) - sum(hidden[8:16])) / max(1, len(hidden[:16])) \
            + 3.0 * (0.8 - state.confidence.min_prob)
        return 1.0 / (1.0 + math.exp(-z))


def every_seventh(number: int, request) -> str | None:
    """A fault schedule independent of call order: some requests fail by their content."""
    key = f"{type(request).__name__}|{request.problem}|{request.context}"
    return "error" if zlib.crc32(key.encode()) % 7 == 0 else None


class Recorder(Backend):
    """A backend that passes calls through and logs them (the calls the runtime made to
    it, in order; one log per model: calls sent together with draft-ahead reach the two
    models in either order)."""

    def __init__(self, inner, log: list) -> None:
        self.inner, self.log = inner, log
        self.info = inner.info

    def next_steps(self, requests):
        for r in requests:
            self.log.append(["step", r.context, r.max_tokens, r.temperature, r.seed, r.return_hidden])
        return self.inner.next_steps(requests)

    def score_steps(self, requests):
        for r in requests:
            self.log.append(["score", r.context, r.text])
        return self.inner.score_steps(requests)

    def prefill_bound(self, request_id, problem, context):
        return self.inner.prefill_bound(request_id, problem, context)

    def release(self, request_id):
        self.inner.release(request_id)


def _models() -> dict[str, HFBackend]:
    return {tier: HFBackend.from_pretrained(embedded_path(tier), step_delimiter=EMBEDDED_DELIMITER,
                                            name=f"embedded:{tier}")
            for tier in ("small", "medium", "large")}


def policies() -> dict[str, dict]:
    """name -> tiers, gates, budget, options, fault policy (the large tier's faults)."""
    router = HiddenRouter()
    fix = VerifyGate(0.3, rewrite="token")
    ahead = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS,
                         draft_ahead=True)
    sampled = SolveOptions(max_steps=EMBEDDED_MAX_STEPS, max_step_tokens=EMBEDDED_MAX_STEP_TOKENS,
                           temperature=0.7, seed=3)
    two, three = ("small", "large"), ("small", "medium", "large")
    return {
        "small": {"tiers": two, "gates": [AlwaysSmall()]},
        "large": {"tiers": two, "gates": [AlwaysLarge()]},
        "confidence": {"tiers": two, "gates": [ConfidenceGate(0.5)]},
        "confidence-route": {"tiers": two, "gates": [ConfidenceGate(0.3, mode="route", probe_tokens=4)]},
        "verify": {"tiers": two, "gates": [VerifyGate(0.3)]},
        "verify-min": {"tiers": two, "gates": [VerifyGate(0.6, reduce="min")]},
        "verify-fix-ahead": {"tiers": two, "gates": [fix], "options": ahead},
        "verify-fix-ahead-capped": {"tiers": two, "gates": [fix], "options": ahead, "budget": 70},
        "verify-fix-sampled": {"tiers": two, "gates": [fix], "options": sampled},
        "verify-ahead-capped": {"tiers": two, "gates": [VerifyGate(0.2)], "options": ahead, "budget": 40},
        "advantage": {"tiers": two, "gates": [AdvantageGate(router, threshold=0.5)]},
        "verify-screened": {"tiers": two, "gates": [VerifyGate(0.3, screen=router, screen_threshold=0.5)]},
        "confidence-capped": {"tiers": two, "gates": [ConfidenceGate(0.2)], "budget": 45},
        "route-capped": {"tiers": two, "gates": [ConfidenceGate(0.2, mode="route", probe_tokens=3)],
                         "budget": 30},
        "large-capped": {"tiers": two, "gates": [AlwaysLarge()], "budget": 25},
        "three-tier": {"tiers": three, "gates": [ConfidenceGate(0.5), ConfidenceGate(0.5)]},
        "three-tier-route": {"tiers": three, "gates": [ConfidenceGate(0.4),
                                                       ConfidenceGate(0.3, mode="route", probe_tokens=4)]},
        "three-tier-verify-capped": {"tiers": three, "gates": [VerifyGate(0.3), VerifyGate(0.3)],
                                     "budget": 60},
        "degrade-confidence": {"tiers": two, "gates": [ConfidenceGate(0.4)], "faults": True},
        "degrade-verify-fix-ahead": {"tiers": two, "gates": [fix], "options": ahead, "faults": True},
        "degrade-three-tier-route": {"tiers": three, "gates": [ConfidenceGate(0.4),
                                                               ConfidenceGate(0.3, mode="route",
                                                                              probe_tokens=4)],
                                     "faults": True},
        "fail-verify": {"tiers": two, "gates": [VerifyGate(0.3)], "faults": True, "on_failure": "fail"},
        "resolve": {"tiers": two, "gates": [ConfidenceGate(0.03, signal="mean_prob", mode="resolve")]},
        "resolve-capped": {"tiers": two, "gates": [ConfidenceGate(0.03, signal="mean_prob", mode="resolve")],
                           "budget": 75},
        "three-tier-resolve": {"tiers": three,
                               "gates": [ConfidenceGate(0.03, signal="mean_prob", mode="resolve"),
                                         ConfidenceGate(0.3)]},
        "degrade-resolve": {"tiers": two, "gates": [ConfidenceGate(0.03, signal="mean_prob", mode="resolve")],
                            "faults": True},
    }


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def record(n: int = PROBLEMS, names: list[str] | None = None) -> dict:
    """{policy: [{"result" | "error", "calls": {tier: calls}} per problem]} for the first n problems."""
    models = _models()
    chosen = policies()
    out: dict[str, list] = {}
    for name in names or list(chosen):
        policy = chosen[name]
        rows = []
        for problem in problems(n):
            log: dict[str, list] = {tier: [] for tier in policy["tiers"]}
            backends = []
            for k, tier in enumerate(policy["tiers"]):
                backend = models[tier]
                if policy.get("faults") and k > 0:
                    backend = FaultyBackend(backend, every_seventh)
                backends.append(Recorder(backend, log[tier]))
            runner = Cascade(models=backends, gates=policy["gates"], options=policy.get("options", OPTIONS),
                             on_large_failure=policy.get("on_failure", "degrade"))
            row: dict = {}
            try:
                row["result"] = _without_seconds(runner.solve(problem, policy.get("budget")).to_json())
            except Exception as error:  # noqa: BLE001 - the failure itself is part of the trace
                partial = getattr(error, "partial", None)
                row["error"] = [type(error).__name__, str(error),
                                _without_seconds(partial.to_json()) if partial is not None else None]
            row["calls"] = log
            rows.append(row)
        out[name] = rows
    return out


def dumps(record_: dict) -> str:
    return json.dumps(record_, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(dumps(record(int(sys.argv[2]) if len(sys.argv) > 2 else PROBLEMS)))
