"""A scripted backend that satisfies `decoding.Backend` without a model: one token per
character, steps and confidences chosen by a script, prefill counted like a real cache."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from decoding import Backend, BackendError, ModelInfo, ScoreOutput, StepOutput

# script(problem, context) -> (step text including the delimiter, logprob of each char)
Script = Callable[[str, str], tuple[str, list[float]]]


def counting_script(steps: int = 4, confident: bool = True, delimiter: str = "\n") -> Script:
    """Writes `s<k>=<k>` lines, then `#### <steps>`; confidence varies with the context."""
    def script(problem: str, context: str) -> tuple[str, list[float]]:
        k = context.count(delimiter)
        text = (f"#### {steps}" if k >= steps else f"s{k}={k}") + delimiter
        wobble = (zlib.crc32((problem + context).encode()) % 100) / 100.0
        base = -0.01 if confident else -0.01 - 3.0 * wobble
        return text, [base] * len(text)
    return script


class FakeBackend(Backend):
    supports_fork = True

    def __init__(self, name: str, params: int, script: Script, delimiter: str = "\n",
                 fail_at: set[int] | None = None) -> None:
        self.info = ModelInfo(name=name, fingerprint=name, num_parameters=params, step_delimiter=delimiter)
        self.script = script
        self.cached: dict[str, str] = {}
        self.calls = 0
        self.batches: list[int] = []
        self.fail_at = fail_at or set()

    def _prompt(self, problem: str) -> str:
        return f"<{problem}>"

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        target = self._prompt(problem) + context
        cached = self.cached.get(request_id, "")
        shared = 0
        while shared < min(len(cached), len(target)) and cached[shared] == target[shared]:
            shared += 1
        return len(target) - shared + (1 if 0 < shared < len(cached) else 0)

    def _catch_up(self, request_id: str, problem: str, context: str) -> int:
        fed = self.prefill_bound(request_id, problem, context)
        self.cached[request_id] = self._prompt(problem) + context
        return fed

    def next_steps(self, requests):
        self.batches.append(len(requests))
        outputs = []
        for request in requests:
            self.calls += 1
            if self.calls in self.fail_at:
                raise BackendError("injected failure", self.info.name)
            fed = self._catch_up(request.request_id, request.problem, request.context)
            # A context that ends inside a step (a route probe) continues that step.
            cut = request.context.rfind(self.info.step_delimiter) + len(self.info.step_delimiter)
            done, partial = request.context[:cut], request.context[cut:]
            text, logprobs = self.script(request.problem, done)
            if partial:
                assert text.startswith(partial), (text, partial)
                text, logprobs = text[len(partial):], logprobs[len(partial):]
            stop = "delimiter"
            if len(text) > request.max_tokens:
                text, logprobs, stop = (text[: request.max_tokens], logprobs[: request.max_tokens],
                                        "max_tokens")
            self.cached[request.request_id] += text
            outputs.append(StepOutput(text, tuple(ord(c) for c in text), tuple(logprobs),
                                      tuple(0.1 for _ in text), stop, fed, 0.001))
        return outputs

    def score_steps(self, requests):
        outputs = []
        for request in requests:
            fed = self._catch_up(request.request_id, request.problem, request.context)
            self.cached[request.request_id] += request.text
            outputs.append(ScoreOutput(tuple(ord(c) for c in request.text),
                                       tuple(-0.5 for _ in request.text), fed, 0.001))
        return outputs

    def fork(self, source_id: str, target_id: str) -> None:
        if source_id in self.cached:
            self.cached[target_id] = self.cached[source_id]

    def release(self, request_id: str) -> None:
        self.cached.pop(request_id, None)


def replayed_drafts(small, problem: str, steps, max_tokens: int):
    """For each step of a solved trace: (step, the small model's draft from that step's
    context by a fresh call with hidden states, that context), to check a gate's scores
    by hand."""
    from decoding import StepRequest

    context, out = "", []
    for step in steps:
        draft = small.next_steps([StepRequest(f"hand{step.index}", problem, context, max_tokens,
                                              return_hidden=True)])[0]
        small.release(f"hand{step.index}")
        out.append((step, draft, context))
        context += step.text + "\n"
    return out
