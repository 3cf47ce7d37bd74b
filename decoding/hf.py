"""Hugging Face transformers backend: any causal LM by local path or hub id.

Each request keeps its own KV cache across steps. The cache is keyed by the text it
holds; a call whose context extends that text feeds only the new tokens, and a call
whose context diverged (a rejected draft, a sweep taking another branch) crops the
cache back to the last shared piece boundary instead of re-encoding the whole prefix.

This module knows nothing about gates, costs or budgets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from decoding.prompting import render_prompt
from decoding.types import (
    BackendError,
    ModelInfo,
    ModelLoadError,
    ScoreOutput,
    ScoreRequest,
    StepOutput,
    StepRequest,
)

__all__ = ["HFBackend", "weights_fingerprint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_fingerprint(model_dir: str | Path) -> str:
    """A stable digest of a model directory: config, file sizes and the head and tail of
    each weight file (hashing every byte of a 15 GB checkpoint at start-up is too slow)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.suffix not in {".safetensors", ".bin", ".json", ".gguf"} or not path.is_file():
            continue
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


@dataclass
class _Session:
    """Per-request cache: the text fed so far, its token ids and the model's KV cache."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    # (tokens, characters) after each piece fed or generated: the safe places to crop to.
    boundaries: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    cache: object | None = None
    next_logits: torch.Tensor | None = None  # (vocab,) float32, after the last id
    next_hidden: torch.Tensor | None = None  # (hidden,) after the last id


class HFBackend:
    """A causal LM and its tokenizer, behind the `decoding.Backend` protocol.

    Prompt: `prompt_template` (a format string with `{problem}`) when given; else the
    tokenizer's chat template (one user message, generation prompt added) when it has
    one; else the problem followed by the step delimiter.
    """

    def __init__(self, model, tokenizer, *, name: str, step_delimiter: str = "\n\n",
                 prompt_template: str | None = None, fingerprint: str = "",
                 device: str = "cpu") -> None:
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        if prompt_template is not None and "{problem}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{problem}}', got {prompt_template!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.prompt_template = prompt_template
        self.eos_ids = self._eos_ids()
        self.info = ModelInfo(
            name=name,
            fingerprint=fingerprint or "unknown",
            num_parameters=sum(p.numel() for p in model.parameters()),
            step_delimiter=step_delimiter,
        )
        self._sessions: dict[str, _Session] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, step_delimiter: str = "\n\n",
                        prompt_template: str | None = None, dtype: str = "float32",
                        device: str = "cpu", name: str | None = None, **model_kwargs) -> "HFBackend":
        """Load any causal LM + tokenizer from a local directory or a hub id.

        name: what `info.name` reports (default: the path or id as given)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        display_name = name
        name = str(name_or_path)
        local = Path(name).expanduser()
        looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not (local / "config.json").exists():
            raise ModelLoadError(f"no model at {name!r}: expected a directory with config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype], **model_kwargs)
        except (OSError, ValueError, EnvironmentError) as error:
            raise ModelLoadError(f"could not load model {name!r}: {error}".split("\n")[0]) from error
        model.to(device)
        fingerprint = weights_fingerprint(local) if local.is_dir() else hashlib.sha256(
            json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(model, tokenizer, name=display_name or name, step_delimiter=step_delimiter,
                   prompt_template=prompt_template, fingerprint=fingerprint, device=device)

    # ---- prompt and tokenization -------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id,
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return frozenset(ids)

    def render_prompt(self, problem: str) -> tuple[str, bool]:
        """The prompt text for a problem, and whether the tokenizer should add its specials."""
        return render_prompt(problem, tokenizer=self.tokenizer, step_delimiter=self.info.step_delimiter,
                             prompt_template=self.prompt_template)

    def _encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _decode_after(self, anchor: int | None, ids: list[int]) -> str:
        """Text of `ids` as it reads after the token `anchor` (keeps the leading space that
        SentencePiece-style decoders drop at the start of a sequence)."""
        if anchor is None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        with_anchor = self.tokenizer.decode([anchor] + ids, skip_special_tokens=False)
        return with_anchor[len(self.tokenizer.decode([anchor], skip_special_tokens=False)):]

    # ---- cache management ----------------------------------------------------------------

    @torch.no_grad()
    def _feed(self, session: _Session, ids: list[int], keep_logits: int = 1,
              hidden: bool = False) -> torch.Tensor:
        """Run `ids` through the model on top of the session's cache.

        Returns float32 log-probabilities for the last `keep_logits` positions,
        shape (keep_logits, vocab); updates next_logits / next_hidden.
        """
        from transformers import DynamicCache

        if session.cache is None:
            session.cache = DynamicCache()
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        try:
            out = self.model(input_ids=input_ids, past_key_values=session.cache, use_cache=True,
                             logits_to_keep=keep_logits, output_hidden_states=hidden)
        except (RuntimeError, IndexError) as error:
            raise BackendError(f"forward pass failed: {error}", self.info.name) from error
        session.cache = out.past_key_values
        logits = out.logits[0].float()
        session.next_logits = logits[-1]
        session.next_hidden = out.hidden_states[-1][0, -1].float() if hidden else None
        session.ids.extend(ids)
        return torch.log_softmax(logits, dim=-1)

    def _plan_catch_up(self, session: _Session, target: str) -> tuple[int, int]:
        """The (tokens, characters) boundary to keep: the last one inside the shared prefix."""
        shared = 0
        limit = min(len(session.text), len(target))
        while shared < limit and session.text[shared] == target[shared]:
            shared += 1
        keep = (0, 0)
        for tokens, chars in session.boundaries:
            if chars <= shared:
                keep = (tokens, chars)
        return keep

    def _catch_up(self, request_id: str, problem: str, context: str,
                  hidden: bool = False) -> tuple[_Session, int]:
        """Bring the session to prompt + context; returns it and the number of tokens fed."""
        session = self._sessions.setdefault(request_id, _Session())
        prompt, add_special = self.render_prompt(problem)
        target = prompt + context
        tokens, chars = self._plan_catch_up(session, target)
        fed = 0
        if tokens == 0:
            # Fresh (or fully diverged) request: start over from the prompt.
            self._sessions[request_id] = session = _Session()
            prompt_ids = self._encode(prompt, add_special_tokens=add_special)
            if not prompt_ids:
                raise BackendError("the prompt encoded to no tokens", self.info.name)
            self._feed(session, prompt_ids, hidden=hidden)
            fed += len(prompt_ids)
            tokens, chars = len(prompt_ids), len(prompt)
            session.text = prompt
            session.boundaries.append((tokens, chars))
        elif tokens < len(session.ids):
            # Diverged after a shared boundary: crop to one token before it and re-feed
            # that token, so the distribution at the boundary is known again.
            last = session.ids[tokens - 1]
            session.cache.crop(-(len(session.ids) - (tokens - 1)))  # negative: tokens to drop
            del session.ids[tokens - 1:]
            session.text = target[:chars]
            session.boundaries = [b for b in session.boundaries if b[0] <= tokens]
            self._feed(session, [last], hidden=hidden)
            fed += 1
        rest = target[chars:]
        if rest:
            ids = self._encode(rest)
            self._feed(session, ids, hidden=hidden)
            fed += len(ids)
            session.text = target
            session.boundaries.append((len(session.ids), len(target)))
        return session, fed

    # ---- the protocol ----------------------------------------------------------------------

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        session = self._sessions.get(request_id, _Session())
        prompt, add_special = self.render_prompt(problem)
        target = prompt + context
        tokens, chars = self._plan_catch_up(session, target)
        if tokens == 0:
            prompt_tokens = len(self._encode(prompt, add_special))
            return prompt_tokens + (len(self._encode(context)) if context else 0)
        rest = target[chars:]
        return int(tokens < len(session.ids)) + (len(self._encode(rest)) if rest else 0)

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        return [self._next_step(request) for request in requests]

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        return [self._score(request) for request in requests]

    def release(self, request_id: str) -> None:
        self._sessions.pop(request_id, None)

    def fork(self, source_id: str, target_id: str) -> None:
        """Give `target_id` a copy of `source_id`'s cached state (KV cache included), so two
        branches of a calibration sweep each continue exactly as an independent run would."""
        source = self._sessions.get(source_id)
        self._sessions[target_id] = copy.deepcopy(source) if source is not None else _Session()

    @torch.no_grad()
    def _next_step(self, request: StepRequest) -> StepOutput:
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        started = time.perf_counter()
        session, fed = self._catch_up(request.request_id, request.problem, request.context,
                                      hidden=request.return_hidden)
        generator = None
        if request.temperature > 0:
            seed = zlib.crc32(f"{request.seed}\x00{request.problem}\x00{request.context}".encode())
            generator = torch.Generator().manual_seed(seed)
        anchor = session.ids[-1] if session.ids else None
        delimiter = self.info.step_delimiter
        token_ids: list[int] = []
        logprobs: list[float] = []
        entropies: list[float] = []
        text = ""
        stop_reason = "max_tokens"
        for _ in range(request.max_tokens):
            log_probs = torch.log_softmax(session.next_logits, dim=-1)
            if generator is None:
                token = int(torch.argmax(log_probs))
            else:
                probs = torch.softmax(session.next_logits / request.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            token_ids.append(token)
            logprobs.append(float(log_probs[token]))
            entropies.append(float(-(log_probs.exp() * log_probs).nan_to_num().sum()))
            if token in self.eos_ids:
                stop_reason = "eos"
                break
            self._feed(session, [token], hidden=request.return_hidden)
            # Decoding the whole step each token is quadratic; only look when this token
            # could have completed the delimiter (decoded text is matched, not token ids).
            if delimiter[-1] in self.tokenizer.decode([token], skip_special_tokens=False):
                text = self._decode_after(anchor, token_ids)
                if delimiter in text:
                    stop_reason = "delimiter"
                    break
        if stop_reason == "max_tokens":
            text = self._decode_after(anchor, token_ids)
        if token_ids and token_ids[-1] in self.eos_ids:
            text = self._decode_after(anchor, token_ids[:-1]) if len(token_ids) > 1 else ""
        session.text += text
        session.boundaries.append((len(session.ids), len(session.text)))
        hidden = None
        if request.return_hidden and session.next_hidden is not None:
            hidden = tuple(float(x) for x in session.next_hidden)
        return StepOutput(
            text=text, token_ids=tuple(token_ids), logprobs=tuple(logprobs),
            entropies=tuple(entropies), stop_reason=stop_reason, prefill_tokens=fed,
            seconds=time.perf_counter() - started, hidden=hidden,
        )

    @torch.no_grad()
    def _score(self, request: ScoreRequest) -> ScoreOutput:
        started = time.perf_counter()
        session, fed = self._catch_up(request.request_id, request.problem, request.context)
        ids = self._encode(request.text)
        if not ids:
            return ScoreOutput((), (), fed, time.perf_counter() - started)
        first = float(torch.log_softmax(session.next_logits, dim=-1)[ids[0]])
        logprobs = [first]
        if len(ids) > 1:
            log_probs = self._feed(session, ids, keep_logits=len(ids))
            logprobs += [float(log_probs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        else:
            self._feed(session, ids)
        session.text += request.text
        session.boundaries.append((len(session.ids), len(session.text)))
        if any(math.isnan(lp) for lp in logprobs):
            raise BackendError("scoring produced NaN log-probabilities", self.info.name)
        return ScoreOutput(tuple(ids), tuple(logprobs), fed, time.perf_counter() - started)
