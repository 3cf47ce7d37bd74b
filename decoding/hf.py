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
    StopReason,
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


@dataclass
class _Row:
    """One request's step while it decodes inside a batch."""

    request: StepRequest
    session: _Session
    prefill: int  # tokens fed to catch up before decoding
    generator: torch.Generator | None  # None = greedy
    anchor: int | None  # the token before the step (for decoding its text)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    text: str = ""
    stop_reason: StopReason | None = None  # None while the row still decodes
    seconds: float = 0.0


def _is_plain_dynamic(cache: object) -> bool:
    """A DynamicCache of full-attention layers holding one row: what the batch can pad."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return (isinstance(cache, DynamicCache) and bool(cache.layers)
            and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
                    and layer.keys.shape[0] == 1 for layer in cache.layers))


def _merge_caches(sessions: Sequence[_Session]) -> tuple[object, list[int]]:
    """One batched cache from per-request caches, each left-padded with zeros to the
    longest; returns it and each row's padding (columns the attention mask must hide).
    A single session's cache is used as is (batch size 1 costs nothing extra)."""
    from transformers import DynamicCache

    if len(sessions) == 1:
        return sessions[0].cache, [0]
    lengths = [len(session.ids) for session in sessions]
    longest = max(lengths)
    layers = []
    for index in range(len(sessions[0].cache.layers)):
        parts = [session.cache.layers[index] for session in sessions]
        merged = []
        for tensors in ([layer.keys for layer in parts], [layer.values for layer in parts]):
            _, heads, _, width = tensors[0].shape
            batch = tensors[0].new_zeros((len(sessions), heads, longest, width))
            for row, (tensor, length) in enumerate(zip(tensors, lengths)):
                assert tensor.shape[-2] == length, "session cache and ids disagree"
                batch[row, :, longest - length:] = tensor[0]
            merged.append(batch)
        layers.append((merged[0], merged[1]))
    return DynamicCache(ddp_cache_data=layers), [longest - length for length in lengths]


def _row_cache(cache, row: int, pad: int):
    """Row `row` of a batched cache as a one-row cache of its own, padding dropped."""
    from transformers import DynamicCache

    # DynamicCache copies the slices (its layers concatenate), so the batch can be freed.
    return DynamicCache(ddp_cache_data=[(layer.keys[row:row + 1, :, pad:], layer.values[row:row + 1, :, pad:])
                                        for layer in cache.layers])


def _select_rows(cache, pads: list[int], keep: list[int]) -> tuple[object, list[int]]:
    """Keep only rows `keep` of a batched cache, and drop the columns that are now padding
    in every remaining row."""
    cache.batch_select_indices(torch.tensor(keep, device=cache.layers[0].keys.device))
    pads = [pads[k] for k in keep]
    trim = min(pads)
    if trim:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, trim:]
            layer.values = layer.values[:, :, trim:]
        pads = [pad - trim for pad in pads]
    return cache, pads


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
        self._ends_delimiter: dict[int, bool] = {}

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
        """Generate one step for each request, all rows decoding together as one padded batch.

        Each request is first caught up on its own cache (only its new tokens are fed);
        then the per-request caches are left-padded into one batched cache and every row
        decodes token by token in one forward pass per token, with an attention mask over
        the padding and explicit position ids; a row leaves the batch (and gets its cache
        back, padding dropped) as soon as it stops. Greedy and seeded-sampled rows give
        the same tokens as running each request alone.

        `StepOutput.seconds` is the latency this request saw: wall seconds from the start
        of this call until its row stopped (rows share the batch's time, so the seconds of
        one call's rows add up to more than the call's wall time).
        """
        for request in requests:
            if request.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        outputs: list[StepOutput | None] = [None] * len(requests)
        # A request id may appear only once per batch (its rows would share one cache):
        # repeated ids go to later rounds, in their order, as if called one after another.
        remaining = list(range(len(requests)))
        while remaining:
            seen: set[str] = set()
            this_round, later = [], []
            for index in remaining:
                rid = requests[index].request_id
                (later if rid in seen else this_round).append(index)
                seen.add(rid)
            for index, output in zip(this_round, self._next_step_batch([requests[i] for i in this_round])):
                outputs[index] = output
            remaining = later
        return outputs  # type: ignore[return-value]

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        return [self._score(request) for request in requests]

    def release(self, request_id: str) -> None:
        self._sessions.pop(request_id, None)

    def fork(self, source_id: str, target_id: str) -> None:
        """Give `target_id` a copy of `source_id`'s cached state (KV cache included), so two
        branches of a calibration sweep each continue exactly as an independent run would."""
        source = self._sessions.get(source_id)
        self._sessions[target_id] = copy.deepcopy(source) if source is not None else _Session()

    # ---- batched decoding ----------------------------------------------------------------

    @torch.no_grad()
    def _next_step_batch(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """One step for requests with distinct ids: catch each up alone, decode all together."""
        started = time.perf_counter()
        rows: list[_Row] = []
        try:
            for request in requests:
                session, fed = self._catch_up(request.request_id, request.problem, request.context,
                                              hidden=request.return_hidden)
                generator = None
                if request.temperature > 0:
                    # Seeded from the request alone, so a row samples the same step whatever
                    # else shares its batch.
                    seed = zlib.crc32(f"{request.seed}\x00{request.problem}\x00{request.context}".encode())
                    generator = torch.Generator().manual_seed(seed)
                rows.append(_Row(request, session, fed, generator, session.ids[-1] if session.ids else None))
            if len(rows) > 1 and not all(_is_plain_dynamic(row.session.cache) for row in rows):
                for row in rows:  # a cache layout we cannot pad (sliding window, recurrent...)
                    self._decode([row], started)
            else:
                self._decode(rows, started)
        except BaseException:
            # A failure can leave caches inside the merged batch: drop these requests'
            # sessions, so their next call starts over from the text instead of a bad cache.
            for request in requests:
                self._sessions.pop(request.request_id, None)
            raise
        return [self._finish(row) for row in rows]

    def _decode(self, rows: list[_Row], started: float) -> None:
        """Decode every row until it stops; each row's session ends with its cache, ids and
        next-token logits exactly as if it had been decoded alone."""
        active = list(rows)
        cache, pads = _merge_caches([row.session for row in active])
        if len(active) > 1:
            for row in active:
                row.session.cache = None  # the batch holds it until the row leaves
        logits = torch.stack([row.session.next_logits for row in active])  # (rows, vocab)
        want_hidden = any(row.request.return_hidden for row in active)
        while active:
            log_probs = torch.log_softmax(logits, dim=-1)
            entropies = -(log_probs.exp() * log_probs).nan_to_num().sum(dim=-1)
            tokens = torch.argmax(log_probs, dim=-1)
            if any(row.generator is not None for row in active):
                tokens = tokens.clone()
                for k, row in enumerate(active):
                    if row.generator is not None:
                        probs = torch.softmax(logits[k] / row.request.temperature, dim=-1)
                        tokens[k] = torch.multinomial(probs, 1, generator=row.generator)[0]
            chosen = log_probs.gather(1, tokens[:, None])[:, 0]
            token_list = tokens.tolist()
            for row, token, logprob, entropy in zip(active, token_list, chosen.tolist(), entropies.tolist()):
                row.token_ids.append(token)
                row.logprobs.append(logprob)
                row.entropies.append(entropy)
                if token in self.eos_ids:
                    row.stop_reason = "eos"  # EOS is not fed: the cache ends before it
            cache, pads, logits, active, token_list = self._leave(
                active, cache, pads, logits, token_list, started)
            if not active:
                break
            positions = torch.tensor([[len(row.session.ids)] for row in active], dtype=torch.long,
                                     device=self.device)
            mask = None
            if any(pads):
                mask = torch.ones((len(active), cache.get_seq_length() + 1), dtype=torch.long,
                                  device=self.device)
                for k, pad in enumerate(pads):
                    mask[k, :pad] = 0
            try:
                out = self.model(input_ids=torch.tensor([[t] for t in token_list], device=self.device),
                                 attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True, logits_to_keep=1, output_hidden_states=want_hidden)
            except (RuntimeError, IndexError) as error:
                raise BackendError(f"forward pass failed: {error}", self.info.name) from error
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            hidden = out.hidden_states[-1][:, -1].float() if want_hidden else None
            delimiter = self.info.step_delimiter
            for k, (row, token) in enumerate(zip(active, token_list)):
                row.session.ids.append(token)
                row.session.next_hidden = hidden[k] if hidden is not None and row.request.return_hidden else None
                # Decoding the whole step each token is quadratic; only look when this token
                # could have completed the delimiter (decoded text is matched, not token ids).
                if self._may_end_delimiter(token):
                    row.text = self._decode_after(row.anchor, row.token_ids)
                    if delimiter in row.text:
                        row.stop_reason = "delimiter"
                        continue
                if len(row.token_ids) >= row.request.max_tokens:
                    row.stop_reason = "max_tokens"
            cache, pads, logits, active, token_list = self._leave(
                active, cache, pads, logits, token_list, started)

    def _leave(self, active: list[_Row], cache, pads: list[int], logits: torch.Tensor,
               token_list: list[int], started: float):
        """Hand the stopped rows their caches back (padding dropped) and shrink the batch."""
        keep = [k for k, row in enumerate(active) if row.stop_reason is None]
        if len(keep) == len(active):
            return cache, pads, logits, active, token_list
        now = time.perf_counter() - started
        for k, row in enumerate(active):
            if row.stop_reason is not None:
                row.seconds = now
                row.session.next_logits = logits[k].clone() if len(active) > 1 else logits[k]
                row.session.cache = cache if len(active) == 1 else _row_cache(cache, k, pads[k])
        if not keep:
            return None, [], logits[:0], [], []
        cache, pads = _select_rows(cache, pads, keep)
        return (cache, pads, logits[keep], [active[k] for k in keep], [token_list[k] for k in keep])

    def _may_end_delimiter(self, token: int) -> bool:
        """Does this token's text contain the delimiter's last character? (memoized per id)"""
        known = self._ends_delimiter.get(token)
        if known is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            known = self._ends_delimiter[token] = self.info.step_delimiter[-1] in text
        return known

    def _finish(self, row: _Row) -> StepOutput:
        """The row's StepOutput; records the generated text in its session."""
        text = row.text
        if row.stop_reason == "max_tokens":
            text = self._decode_after(row.anchor, row.token_ids)
        if row.token_ids and row.token_ids[-1] in self.eos_ids:
            text = self._decode_after(row.anchor, row.token_ids[:-1]) if len(row.token_ids) > 1 else ""
        session = row.session
        session.text += text
        session.boundaries.append((len(session.ids), len(session.text)))
        hidden = None
        if row.request.return_hidden and session.next_hidden is not None:
            hidden = tuple(float(x) for x in session.next_hidden)
        return StepOutput(
            text=text, token_ids=tuple(row.token_ids), logprobs=tuple(row.logprobs),
            entropies=tuple(row.entropies), stop_reason=row.stop_reason or "max_tokens",
            prefill_tokens=row.prefill, seconds=row.seconds, hidden=hidden,
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
