"""Step scorers: how good is a candidate step, given the problem and the steps before it.

A scorer is what router training labels steps with (`cascade.router`): the small model's
draft and the large model's step from the same prefix are both scored, and the large
step is "meaningfully better" when its score exceeds the draft's by more than tau.
Scores lie in [0, 1] (1 = certainly a good step), so one tau means the same across
scorers.

This module owns the `StepScorer` protocol and the task-agnostic scorers:

- `LikelihoodScorer`: a model's own likelihood of the step (via `Backend.score_steps`),
  exp(mean token log-probability), i.e. the geometric mean token probability.
- `PRMScorer`: a process reward model loaded through transformers from a local path or
  hub id, in one of the two common formats (see its docstring).

The exact checker of the embedded task is a scorer too; it lives in `bench.router_data`
because it needs the task, and `cascade` knows no task.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from cascade.errors import ConfigError
from decoding import Backend, ModelLoadError, ScoreRequest

__all__ = ["StepScorer", "LikelihoodScorer", "PRMScorer", "PRMFormat"]


@runtime_checkable
class StepScorer(Protocol):
    """Scores candidate steps that all follow the same prefix (batch form: a router
    scores the small draft and the large step from one prefix together)."""

    name: str

    def score(self, problem: str, context: str, candidates: Sequence[str]) -> list[float]:
        """One score in [0, 1] per candidate step (text without the trailing delimiter).

        context: the steps accepted so far, each ending in the step delimiter."""
        ...


class LikelihoodScorer:
    """A model's own likelihood of each candidate: exp(mean log-probability of its tokens)
    under `backend`, given the problem's prompt and the context (one forward pass per
    candidate, on the backend's KV cache). An empty candidate scores 0."""

    def __init__(self, backend: Backend, name: str = "large-likelihood") -> None:
        if not isinstance(backend, Backend):
            raise ConfigError(f"LikelihoodScorer needs a decoding.Backend, got {type(backend).__name__}")
        self.backend = backend
        self.name = name

    def score(self, problem: str, context: str, candidates: Sequence[str]) -> list[float]:
        # One request id per call: candidates share the prefix, so the backend's cache
        # crops each scored candidate away before the next (no prefix re-encoding).
        request_id = f"scorer-{uuid.uuid4().hex}"
        try:
            requests = [ScoreRequest(request_id, problem, context, text) for text in candidates]
            outputs = [self.backend.score_steps([request])[0] for request in requests]
        finally:
            self.backend.release(request_id)
        scores = []
        for output in outputs:
            if not output.logprobs:
                scores.append(0.0)
            else:
                scores.append(math.exp(math.fsum(output.logprobs) / len(output.logprobs)))
        return scores


PRMFormat = Literal["auto", "step-tag", "reward-head"]


@dataclass(frozen=True)
class _PRMLayout:
    """How a PRM's input is built and read."""

    format: Literal["step-tag", "reward-head"]
    step_tag: str | None
    positive_label: int


class PRMScorer:
    """A process reward model (PRM) loaded through transformers.

    The PRM reads `template` filled with the problem and the steps (context + the
    candidate; the context's step delimiters are kept), and returns the probability that
    the last step is good. Two formats:

    - ``"step-tag"`` (token classification, e.g. Qwen2.5-Math-PRM-style and
      Math-Shepherd-style PRMs exported with a classification head): a
      `*ForTokenClassification` model; a tag string (`step_tag`, e.g. "<extra_0>" or
      "ки") follows every step, and the score is read at the last tag's token:
      softmax(logits)[positive_label] with 2+ labels, sigmoid(logit) with 1 label.
    - ``"reward-head"`` (sequence classification: a scalar reward head on the last
      token): a `*ForSequenceClassification` model; the input ends with the candidate
      step, and the score is sigmoid(logit) with 1 label, softmax(...)[positive_label]
      with 2+.

    format="auto" picks the format from the config's `architectures`. A causal LM
    checkpoint (a PRM that reads "+"/"-" token logits through its LM head) is refused
    with an error saying so: export it with a classification head first.
    """

    def __init__(self, model, tokenizer, *, format: Literal["step-tag", "reward-head"],
                 step_tag: str | None = None, positive_label: int = 1,
                 template: str = "{problem}\n{steps}", name: str = "prm",
                 device: str = "cpu", max_length: int | None = None) -> None:
        if format not in ("step-tag", "reward-head"):
            raise ConfigError(f"PRM format must be 'step-tag' or 'reward-head', got {format!r}")
        if "{problem}" not in template or "{steps}" not in template:
            raise ConfigError(f"PRM template must contain '{{problem}}' and '{{steps}}', got {template!r}")
        num_labels = int(getattr(model.config, "num_labels", 1))
        if num_labels > 1 and not 0 <= positive_label < num_labels:
            raise ConfigError(f"positive_label must be in [0, {num_labels}), got {positive_label!r}")
        if format == "step-tag":
            if not step_tag:
                raise ConfigError("a step-tag PRM needs step_tag= (the string written after each step)")
            tag_ids = tokenizer.encode(step_tag, add_special_tokens=False)
            if len(tag_ids) != 1:
                raise ConfigError(f"step_tag {step_tag!r} must be one token of the PRM's tokenizer, "
                                  f"it encodes to {len(tag_ids)}")
            self._tag_id = tag_ids[0]
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layout = _PRMLayout(format, step_tag, positive_label)
        self.template = template
        self.name = name
        self.device = device
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, format: PRMFormat = "auto",
                        step_tag: str | None = None, positive_label: int = 1,
                        template: str = "{problem}\n{steps}", device: str = "cpu") -> PRMScorer:
        """Load a PRM from a local directory or a hub id (see the class docstring)."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        name = str(name_or_path)
        local = Path(name).expanduser()
        looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not (local / "config.json").exists():
            raise ModelLoadError(f"no PRM at {name!r}: expected a directory with config.json")
        try:
            config = AutoConfig.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load PRM {name!r}: {error}".split("\n")[0]) from error
        architectures = list(getattr(config, "architectures", None) or [])
        if format == "auto":
            if any(a.endswith("ForTokenClassification") for a in architectures):
                format = "step-tag"
            elif any(a.endswith("ForSequenceClassification") for a in architectures):
                format = "reward-head"
            else:
                raise ConfigError(
                    f"PRM {name!r} has architectures {architectures}: neither a token-classification "
                    "(step-tag) nor a sequence-classification (reward-head) model; a causal-LM PRM "
                    "must be exported with a classification head, or give format= explicitly")
        if format not in ("step-tag", "reward-head"):
            raise ConfigError(f"PRM format must be 'auto', 'step-tag' or 'reward-head', got {format!r}")
        auto = (transformers.AutoModelForTokenClassification if format == "step-tag"
                else transformers.AutoModelForSequenceClassification)
        try:
            model = auto.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load PRM {name!r} as {format}: {error}".split("\n")[0]) from error
        model.to(device)
        return cls(model, tokenizer, format=format, step_tag=step_tag, positive_label=positive_label,
                   template=template, name=f"prm:{name}", device=device)

    def render(self, problem: str, context: str, candidate: str) -> str:
        """The PRM's input text for one candidate step."""
        if self.layout.format == "step-tag":
            # The tag follows every step: context steps (delimiter-terminated) and the candidate.
            steps = "".join(self._tagged(context)) + candidate + self.layout.step_tag
        else:
            steps = context + candidate
        return self.template.format(problem=problem, steps=steps)

    def _tagged(self, context: str) -> list[str]:
        # Put the tag before each step's line break: "step<tag>\n".
        lines = context.splitlines(keepends=True)
        out = []
        for line in lines:
            body = line.rstrip("\r\n")
            out.append(body + self.layout.step_tag + line[len(body):])
        return out

    def score(self, problem: str, context: str, candidates: Sequence[str]) -> list[float]:
        import torch

        scores = []
        for candidate in candidates:
            text = self.render(problem, context, candidate)
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            if self.max_length is not None and len(ids) > self.max_length:
                raise ConfigError(f"PRM input is {len(ids)} tokens, more than {self.name}'s "
                                  f"{self.max_length}")
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids).logits[0].float()
            if self.layout.format == "step-tag":
                positions = [i for i, t in enumerate(ids) if t == self._tag_id]
                if not positions:
                    raise ConfigError(f"step tag {self.layout.step_tag!r} is lost in the PRM's "
                                      "tokenization of the input")
                row = logits[positions[-1]]
            else:
                row = logits  # (num_labels,): the head already pooled the last token
            scores.append(self._probability(row))
        return scores

    def _probability(self, row) -> float:
        import torch

        if row.numel() == 1:
            return float(torch.sigmoid(row.reshape(())))
        return float(torch.softmax(row, dim=-1)[self.layout.positive_label])
