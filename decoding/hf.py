"""Hugging Face transformers backend: any causal LM by local path or hub id.

Each request keeps its own KV cache across steps. The cache is keyed by the text it
holds; a call whose context extends that text feeds only the new tokens, and a call
whose context diverged (a rejected draft, a sweep taking another branch) crops the
cache back to the last shared piece boundary instead of re-encoding the whole prefix.

A `next_steps` call runs its requests as one padded batch: every request is caught up
(rows with similar numbers of new tokens share a forward pass), their caches are
left-padded into one batched cache, and all rows decode together, one forward pass per
token, with an attention mask over the padding and each row's own position ids. A row
leaves the batch as soon as it stops and gets its cache back with the padding dropped,
so a request's tokens, log-probabilities and cache are what it would get alone (up to
float rounding, well under 1e-4 in log-probability).

This module knows nothing about gates, costs or budgets.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from decoding.prompting import (
    CatchUp,
    decode_after,
    delimiter_end,
    greedy_prefix,
    piece_encoder,
    plan_catch_up,
    render_prompt,
)
from decoding.types import (
    Backend,
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
    each weight file (hashing every byte of a 15 GB checkpoint at start-up is too slow).
    A single weight file (a .gguf) digests as a directory holding only that file."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in ([model_dir] if model_dir.is_file() else sorted(model_dir.iterdir())):
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


def check_model_path(name: str, gguf_file: str | None = None) -> Path:
    """A ModelLoadError naming the problem when `name` looks like a local path (it exists,
    starts with . / ~, or has more than one /) that holds no model; else its Path."""
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if gguf_file is not None:
        if looks_local and not (local / gguf_file).is_file():
            raise ModelLoadError(f"no GGUF file {gguf_file!r} in {name!r}")
    elif looks_local and not (local / "config.json").exists():
        raise ModelLoadError(f"no model at {name!r}: expected a directory with config.json")
    return local


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
    scored: _Scored | None = None  # left by the last score call, until the next call


@dataclass
class _Scored:
    """What scoring a text left in a session, for a greedy step from the same context.

    A verification pass computes the model's distribution at every position of the draft,
    so it already knows the model's greedy choice there. If the draft is then rejected
    and this model writes the step itself, its greedy step starts with the longest prefix
    of the draft that matches those choices, and the next token is the argmax of the
    distribution at the first mismatch: no need to decode those tokens again.
    """

    start_tokens: int  # session length (tokens, characters) before the scored text
    start_chars: int
    ids: list[int]  # the scored text's token ids
    agreed: int  # leading ids that are the model's greedy choices
    logprobs: list[float]  # of the scored ids
    entropies: list[float]  # of the distributions at the agreed positions
    at_mismatch: torch.Tensor | None  # (vocab,) log-probabilities at `agreed` (< len(ids))


def _agreement(log_probs: torch.Tensor, ids: list[int]) -> tuple[int, list[float], torch.Tensor | None]:
    """log_probs[i] is the distribution that predicts ids[i]: (agreed, entropies of the
    agreed positions, the distribution at the first mismatch or None)."""
    greedy = torch.argmax(log_probs, dim=-1).tolist()
    agreed = next((i for i, (g, t) in enumerate(zip(greedy, ids, strict=False)) if g != t), len(ids))
    head = log_probs[:agreed]
    entropies = (-(head.exp() * head).nan_to_num().sum(dim=-1)).tolist() if agreed else []
    return agreed, entropies, (log_probs[agreed].clone() if agreed < len(ids) else None)


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
    reused: int = 0  # leading tokens taken from a scored draft (see _Scored)


def _is_plain_dynamic(cache: object) -> bool:
    """A DynamicCache of full-attention layers holding one row (or nothing yet): what a
    batch can pad and split again."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if cache is None:
        return True
    return (isinstance(cache, DynamicCache) and bool(cache.layers)
            and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
                    and layer.keys.shape[0] == 1 for layer in cache.layers))


class _Batch:
    """Rows that run through the model together: one batched KV cache, shape per layer
    (rows, heads, columns, head_dim), and which columns hold each row's tokens.

    Rows are left-padded to a common length when merged, and a batched catch-up leaves a
    gap after a row whose new tokens were fewer than the longest row's; the attention mask
    hides those columns and each row's position ids count only its own tokens, so every
    row computes what it would alone. Padding queries only ever come after a real token
    of their row (never a fully masked attention row, so no NaN can enter the cache).
    """

    def __init__(self, cache, valid: torch.Tensor | None) -> None:
        self.cache = cache
        # (rows, columns) bool; None while every column is valid for every row (the common
        # unpadded case costs no mask, no position ids and no bookkeeping per token).
        self.valid = None if valid is None or bool(valid.all()) else valid

    @property
    def padded(self) -> bool:
        return self.valid is not None

    @property
    def rows(self) -> int:
        return self.cache.layers[0].keys.shape[0]

    @classmethod
    def merge(cls, sessions: Sequence[_Session], device: torch.device) -> _Batch:
        """Left-pad the sessions' caches into one batch. A single session's cache is used
        as is, so a batch of one costs nothing extra."""
        from transformers import DynamicCache

        lengths = [len(session.ids) for session in sessions]
        if len(sessions) == 1 and sessions[0].cache is not None:
            return cls(sessions[0].cache, None)
        longest = max(lengths)
        valid = torch.zeros((len(sessions), longest), dtype=torch.bool, device=device)
        for row, length in enumerate(lengths):
            valid[row, longest - length:] = True
        template = next((s.cache for s in sessions if s.cache is not None and len(s.ids)), None)
        if template is None:
            return cls(DynamicCache(), valid)
        layers = []
        for index, layer in enumerate(template.layers):
            merged = []
            for name in ("keys", "values"):
                _, heads, _, width = getattr(layer, name).shape
                batch = getattr(layer, name).new_zeros((len(sessions), heads, longest, width))
                for row, (session, length) in enumerate(zip(sessions, lengths, strict=False)):
                    if length:
                        tensor = getattr(session.cache.layers[index], name)
                        assert tensor.shape[-2] == length, "session cache and ids disagree"
                        batch[row, :, longest - length:] = tensor[0]
                merged.append(batch)
            layers.append((merged[0], merged[1]))
        return cls(DynamicCache(ddp_cache_data=layers), valid)

    def extend(self, new_valid: torch.Tensor | None) -> torch.Tensor | None:
        """Record the columns a forward pass appends (None: one valid column per row);
        returns the attention mask for that pass (None when no row has padding, so the
        model takes its unmasked path)."""
        if self.valid is None:
            if new_valid is None or bool(new_valid.all()):
                return None
            rows, columns = new_valid.shape[0], self.cache.get_seq_length()
            self.valid = torch.ones((rows, columns), dtype=torch.bool, device=new_valid.device)
        if new_valid is None:
            new_valid = torch.ones((self.valid.shape[0], 1), dtype=torch.bool, device=self.valid.device)
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        return self.valid.long()

    def row_cache(self, row: int):
        """Row `row` as a one-row cache of its own, padding dropped (the batch is left
        intact; DynamicCache copies what it is given, so the batch can be freed)."""
        from transformers import DynamicCache

        if self.valid is None and self.rows == 1:
            return self.cache
        columns = None if self.valid is None else self.valid[row]
        if columns is None or bool(columns.all()):
            parts = [(layer.keys[row:row + 1], layer.values[row:row + 1]) for layer in self.cache.layers]
        else:
            parts = [(layer.keys[row:row + 1, :, columns], layer.values[row:row + 1, :, columns])
                     for layer in self.cache.layers]
        return DynamicCache(ddp_cache_data=parts)

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, and drop leading columns that no remaining row uses."""
        if len(keep) == self.rows:
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.cache.layers[0].keys.device))
        if self.valid is None:
            return
        self.valid = self.valid[keep]
        used = self.valid.any(dim=0)
        trim = int(torch.argmax(used.int())) if bool(used.any()) else 0
        if trim:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, trim:]
                layer.values = layer.values[:, :, trim:]
            self.valid = self.valid[:, trim:]
        if bool(self.valid.all()):
            self.valid = None


def _in_rounds(requests: Sequence, run_batch) -> list:
    """`run_batch` over the requests, each batch with distinct request ids (two rows of one
    id would share one cache): a repeated id goes to a later round, in order, as if the
    calls had come one after another. Outputs in the requests' order."""
    outputs: list = [None] * len(requests)
    remaining = list(range(len(requests)))
    while remaining:
        seen: set[str] = set()
        this_round, later = [], []
        for index in remaining:
            rid = requests[index].request_id
            (later if rid in seen else this_round).append(index)
            seen.add(rid)
        for index, output in zip(this_round, run_batch([requests[i] for i in this_round]), strict=False):
            outputs[index] = output
        remaining = later
    return outputs


def _context_length(model) -> int | None:
    """The positions a model attends over, from its config (None when it does not say)."""
    length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


class HFBackend(Backend):
    """A causal LM and its tokenizer, behind the `decoding.Backend` protocol (it forks:
    a request's KV cache is copied for a calibration sweep's branches).

    Prompt: `prompt_template` (a format string with `{problem}`) when given; else the
    tokenizer's chat template (one user message, generation prompt added) when it has
    one; else the problem followed by the step delimiter.
    """

    supports_fork = True

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
            context_length=_context_length(model),
        )
        self._sessions: dict[str, _Session] = {}
        self._ends_delimiter: dict[int, bool] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, step_delimiter: str = "\n\n",
                        prompt_template: str | None = None, dtype: str = "float32",
                        device: str = "cpu", name: str | None = None, gguf_file: str | None = None,
                        **model_kwargs) -> HFBackend:
        """Load any causal LM + tokenizer from a local directory or a hub id.

        name: what `info.name` reports (default: the path or id as given).
        gguf_file: a GGUF checkpoint inside that directory (needs the `gguf` package);
            transformers de-quantizes it to `dtype`, tokenizer and chat template included."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        display_name = name
        name = str(name_or_path)
        local = check_model_path(name, gguf_file)
        if gguf_file is not None:
            model_kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))
            model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype], **model_kwargs)
        except (OSError, ValueError, ImportError) as error:
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
        return decode_after(self.tokenizer, anchor, ids)

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

    def _plan(self, session: _Session, problem: str, context: str) -> tuple[str, int, CatchUp]:
        """(prompt, its token count, how the session reaches prompt + context)."""
        prompt, add_special = self.render_prompt(problem)
        encode = piece_encoder(self._encode, self.tokenizer, add_special)
        plan = plan_catch_up(session.text, len(session.ids), session.boundaries, prompt, context, encode)
        prompt_tokens = len(encode(prompt, True)) if plan.keep_tokens == 0 else 0
        return prompt, prompt_tokens, plan

    @staticmethod
    def _caught_up_boundaries(session: _Session, plan: CatchUp, prompt: str, prompt_tokens: int,
                              target: str) -> list[tuple[int, int]]:
        """The piece boundaries a session holds after catching up by `plan` (see `_plan_feed`)."""
        if plan.keep_tokens == 0:
            boundaries = [(0, 0), (prompt_tokens, len(prompt))]
            tokens, chars, new = prompt_tokens, len(prompt), len(plan.new_ids) - prompt_tokens
        else:
            boundaries = [b for b in session.boundaries if b[0] <= plan.keep_tokens]
            tokens, chars, new = plan.keep_tokens, plan.keep_chars, len(plan.new_ids)
        if len(target) > chars:
            boundaries.append((tokens + new, len(target)))
        return boundaries

    def _plan_feed(self, request_id: str, problem: str, context: str) -> tuple[_Session, list[int]]:
        """Bring the session's text and boundaries to prompt + context by the shared rule
        (`decoding.prompting.plan_catch_up`), cropping its cache back to the last shared
        boundary when the context diverged; returns the session and the token ids still
        to be fed through the model."""
        session = self._sessions.setdefault(request_id, _Session())
        session.scored = None  # this call changes what the session holds
        prompt, prompt_tokens, plan = self._plan(session, problem, context)
        target = prompt + context
        boundaries = self._caught_up_boundaries(session, plan, prompt, prompt_tokens, target)
        feed: list[int] = []
        if plan.keep_tokens == 0:
            # Fresh (or fully diverged) request: start over from the prompt.
            self._sessions[request_id] = session = _Session()
            if not prompt_tokens:
                raise BackendError("the prompt encoded to no tokens", self.info.name)
            feed = plan.new_ids[:prompt_tokens]
            chars, new_ids = len(prompt), plan.new_ids[prompt_tokens:]
        else:
            chars, new_ids = plan.keep_chars, plan.new_ids
            if plan.refeed:
                # Diverged after a shared boundary: crop to one token before it and re-feed
                # that token, so the distribution at the boundary is known again.
                tokens = plan.keep_tokens
                feed = [session.ids[tokens - 1]]
                session.cache.crop(-(len(session.ids) - (tokens - 1)))  # negative: tokens to drop
                del session.ids[tokens - 1:]
        session.text = target if len(target) > chars else target[:chars]
        session.boundaries = boundaries
        if len(target) > chars:
            feed = feed + new_ids
        return session, feed

    def _catch_up(self, request_id: str, problem: str, context: str,
                  hidden: bool = False) -> tuple[_Session, int]:
        """Bring the session to prompt + context; returns it and the number of tokens fed."""
        session, feed = self._plan_feed(request_id, problem, context)
        if feed:
            self._feed(session, feed, hidden=hidden)
        return session, len(feed)

    # ---- the protocol ----------------------------------------------------------------------

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        return self._plan(self._sessions.get(request_id, _Session()), problem, context)[2].prefill

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """Generate one step for each request, all rows decoding together as one padded batch.

        Each request is first caught up on its own cache (only its new tokens are fed;
        rows with similar numbers of new tokens share one padded forward pass); then the
        per-request caches are left-padded into one batched cache and every row
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
        return _in_rounds(requests, self._next_step_batch)

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        """Score each given text, all rows in one padded forward pass (catch-up and text
        together). `ScoreOutput.seconds` is the call's wall time, the same for every row."""
        return _in_rounds(requests, self._score_batch)

    def release(self, request_id: str) -> None:
        self._sessions.pop(request_id, None)

    def fork(self, source_id: str, target_id: str) -> None:
        """Give `target_id` a copy of `source_id`'s cached state (KV cache included), so two
        branches of a calibration sweep each continue exactly as an independent run would."""
        source = self._sessions.get(source_id)
        self._sessions[target_id] = copy.deepcopy(source) if source is not None else _Session()

    def state_key(self, request: StepRequest | ScoreRequest) -> tuple[int, ...] | None:
        """The token ids `request.request_id` would hold once caught up on the request's
        context: two requests with equal keys make the same call from the same tokens.
        None where more than the tokens decides the output (a scored draft a greedy step
        may reuse, a hidden state asked for)."""
        session = self._sessions.get(request.request_id) or _Session()
        if session.scored is not None or getattr(request, "return_hidden", False):
            return None
        plan = self._plan(session, request.problem, request.context)[2]
        return tuple(session.ids[: plan.keep_tokens]) + tuple(plan.new_ids)

    def adopt(self, source_id: str, request: StepRequest | ScoreRequest) -> None:
        """Give `request.request_id` the state running `request` would have left in it,
        copied from `source_id`, which just ran the same call from an equal `state_key`.
        The target keeps its own piece boundaries (where its later catch-ups cut back to),
        so it goes on as if it had made the call itself."""
        target = self._sessions.get(request.request_id) or _Session()
        prompt, prompt_tokens, plan = self._plan(target, request.problem, request.context)
        target_text = prompt + request.context
        boundaries = self._caught_up_boundaries(target, plan, prompt, prompt_tokens, target_text)
        end = (len(target.ids[: plan.keep_tokens]) + len(plan.new_ids), len(target_text))
        adopted = copy.deepcopy(self._sessions[source_id])
        adopted.boundaries = boundaries + [b for b in adopted.boundaries if b > end]  # the call's own
        self._sessions[request.request_id] = adopted

    # ---- batched decoding ----------------------------------------------------------------

    @torch.no_grad()
    def _next_step_batch(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """One step for requests with distinct ids: catch up and decode all rows together."""
        started = time.perf_counter()
        rows: list[_Row] = []
        feeds: list[list[int]] = []
        try:
            decoding: list[_Row] = []
            for request in requests:
                row = self._reuse_scored(request)
                if row is not None:
                    rows.append(row)
                    if row.stop_reason is None:
                        decoding.append(row)
                        feeds.append([])
                    else:
                        row.seconds = time.perf_counter() - started
                    continue
                session, feed = self._plan_feed(request.request_id, request.problem, request.context)
                generator = None
                if request.temperature > 0:
                    # Seeded from the request alone, so a row samples the same step whatever
                    # else shares its batch.
                    seed = zlib.crc32(f"{request.seed}\x00{request.problem}\x00{request.context}".encode())
                    generator = torch.Generator().manual_seed(seed)
                anchor = feed[-1] if feed else (session.ids[-1] if session.ids else None)
                rows.append(_Row(request, session, len(feed), generator, anchor))
                decoding.append(rows[-1])
                feeds.append(feed)
            if len(decoding) > 1 and not all(_is_plain_dynamic(row.session.cache) for row in decoding):
                # a cache layout we cannot pad (sliding, recurrent)
                for row, feed in zip(decoding, feeds, strict=False):
                    self._decode([row], [feed], started)
            elif decoding:
                self._decode(decoding, feeds, started)
        except BaseException:
            # A failure can leave caches half fed or inside the merged batch: drop these
            # requests' sessions, so their next call starts over from the text.
            for request in requests:
                self._sessions.pop(request.request_id, None)
            raise
        return [self._finish(row) for row in rows]

    def _forward(self, batch: _Batch, input_ids: torch.Tensor, new_valid: torch.Tensor | None,
                 positions: torch.Tensor | None, logits_to_keep: int | torch.Tensor, hidden: bool):
        mask = batch.extend(new_valid)
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=batch.cache, use_cache=True, logits_to_keep=logits_to_keep,
                             output_hidden_states=hidden)
        except (RuntimeError, IndexError) as error:
            raise BackendError(f"forward pass failed: {error}", self.info.name) from error
        batch.cache = out.past_key_values
        return out

    def _catch_up_batch(self, batch: _Batch, rows: list[_Row], feeds: list[list[int]]) -> None:
        """Feed every row's new tokens in one forward pass: each row's tokens start right
        after its cache, shorter rows are padded after theirs (those queries see their
        row's real tokens, and the mask hides them from everything after)."""
        width = max(len(feed) for feed in feeds)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        new_valid = torch.zeros((len(rows), width), dtype=torch.bool)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (row, feed) in enumerate(zip(rows, feeds, strict=False)):
            input_ids[k, : len(feed)] = torch.tensor(feed, dtype=torch.long)
            new_valid[k, : len(feed)] = True
            positions[k] = torch.arange(len(row.session.ids), len(row.session.ids) + width)
        last = sorted({len(feed) - 1 for feed in feeds if feed})
        want_hidden = any(row.request.return_hidden for row, feed in zip(rows, feeds, strict=False) if feed)
        out = self._forward(batch, input_ids.to(self.device), new_valid.to(self.device),
                            positions.to(self.device), torch.tensor(last, device=self.device), want_hidden)
        for k, (row, feed) in enumerate(zip(rows, feeds, strict=False)):
            if not feed:
                continue
            column = last.index(len(feed) - 1)
            row.session.next_logits = out.logits[k, column].float()
            row.session.next_hidden = (out.hidden_states[-1][k, len(feed) - 1].float()
                                       if row.request.return_hidden else None)
            row.session.ids.extend(feed)

    def _catch_up_rows(self, rows: list[_Row], feeds: list[list[int]]) -> None:
        """Feed each row its new tokens: rows of similar feed length share one padded forward
        pass, then get their caches back (padding dropped); a row alone is fed directly."""
        pending = sorted((k for k, feed in enumerate(feeds) if feed), key=lambda k: len(feeds[k]))
        groups: list[list[int]] = []
        for k in pending:  # ascending length: a group's width is its last member's
            group = groups[-1] + [k] if groups else [k]
            tokens = sum(len(feeds[j]) for j in group)
            # Padding is compute thrown away, a forward pass has a fixed cost: accept up
            # to half the real tokens plus 16 as padding before starting another pass.
            if groups and (len(feeds[k]) * len(group) <= 1.5 * tokens + 16) \
                    and self._fits_logits([feeds[j] for j in group]):
                groups[-1] = group
            else:
                groups.append([k])
        for group in groups:
            if len(group) == 1:
                row = rows[group[0]]
                self._feed(row.session, feeds[group[0]], hidden=row.request.return_hidden)
                continue
            members = [rows[k] for k in group]
            batch = _Batch.merge([row.session for row in members], self.device)
            self._catch_up_batch(batch, members, [feeds[k] for k in group])
            for index, row in enumerate(members):
                row.session.cache = batch.row_cache(index)

    def _decode(self, rows: list[_Row], feeds: list[list[int]], started: float) -> None:
        """Catch every row up and decode it until it stops; each row's session ends with its
        cache, ids and next-token logits as if it had been run alone."""
        self._catch_up_rows(rows, feeds)
        batch = _Batch.merge([row.session for row in rows], self.device)
        active = list(rows)
        if len(active) > 1:
            for row in active:
                row.session.cache = None  # the batch holds it until the row leaves
        logits = torch.stack([row.session.next_logits for row in active])  # (rows, vocab)
        want_hidden = any(row.request.return_hidden for row in active)
        delimiter = self.info.step_delimiter
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
            for row, token, logprob, entropy in zip(active, token_list, chosen.tolist(), entropies.tolist(),
                                                    strict=False):
                row.token_ids.append(token)
                row.logprobs.append(logprob)
                row.entropies.append(entropy)
                if token in self.eos_ids:
                    row.stop_reason = "eos"  # EOS is not fed: the cache ends before it
            logits, active, token_list = self._leave(batch, active, logits, token_list, started)
            if not active:
                break
            positions = None  # unpadded: every row's position is the cache length, the default
            if batch.padded:
                positions = torch.tensor([[len(row.session.ids)] for row in active], dtype=torch.long,
                                         device=self.device)
            out = self._forward(batch, torch.tensor([[t] for t in token_list], device=self.device),
                                None, positions, 1, want_hidden)
            logits = out.logits[:, -1].float()
            hidden = out.hidden_states[-1][:, -1].float() if want_hidden else None
            for k, (row, token) in enumerate(zip(active, token_list, strict=False)):
                row.session.ids.append(token)
                row.session.next_hidden = (hidden[k] if hidden is not None and row.request.return_hidden
                                           else None)
                # Decoding the whole step each token is quadratic; only look when this token
                # could have completed the delimiter (decoded text is matched, not token ids).
                if self._may_end_delimiter(token):
                    row.text = self._decode_after(row.anchor, row.token_ids)
                    if delimiter in row.text:
                        row.stop_reason = "delimiter"
                        continue
                if len(row.token_ids) >= row.request.max_tokens:
                    row.stop_reason = "max_tokens"
            logits, active, token_list = self._leave(batch, active, logits, token_list, started)

    def _fits_logits(self, feeds: list[list[int]]) -> bool:
        """A batched catch-up keeps logits for each distinct feed length (rows x lengths x
        vocab floats); past ~256 MB (large vocabularies, many rows) feed rows one by one."""
        lengths = len({len(feed) for feed in feeds if feed})
        vocab = getattr(self.model.config, "vocab_size", None) or len(self.tokenizer)
        return len(feeds) * lengths * vocab * 4 <= 256 << 20

    def _leave(self, batch: _Batch, active: list[_Row], logits: torch.Tensor, token_list: list[int],
               started: float) -> tuple[torch.Tensor, list[_Row], list[int]]:
        """Hand the stopped rows their caches back (padding dropped) and shrink the batch."""
        keep = [k for k, row in enumerate(active) if row.stop_reason is None]
        if len(keep) == len(active):
            return logits, active, token_list
        now = time.perf_counter() - started
        for k, row in enumerate(active):
            if row.stop_reason is not None:
                row.seconds = now
                row.session.next_logits = logits[k].clone() if len(active) > 1 else logits[k]
                row.session.cache = batch.row_cache(k)
        if keep:
            batch.select(keep)
        return logits[keep], [active[k] for k in keep], [token_list[k] for k in keep]

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
            prefill_tokens=row.prefill, seconds=row.seconds, hidden=hidden, reused_tokens=row.reused,
        )

    def _reuse_scored(self, request: StepRequest) -> _Row | None:
        """A greedy step right after this session scored a draft from the same context: a
        row that starts with the draft's agreed prefix (see `_Scored`), its cache cropped to
        it and its next distribution the one at the first mismatch; None when the record
        does not apply (sampling, hidden states wanted, another context, or the agreed
        prefix would end the step somewhere the record has no distribution for).

        The row stops, or goes on decoding, exactly as a row decoding from the context
        would: the same checks (EOS, delimiter, max_tokens) after each agreed token."""
        session = self._sessions.get(request.request_id)
        scored = session.scored if session is not None else None
        if scored is None or request.temperature > 0 or request.return_hidden:
            return None
        prompt, _ = self.render_prompt(request.problem)
        target = prompt + request.context
        if scored.start_chars != len(target) or session.text[: len(target)] != target:
            return None
        anchor = session.ids[scored.start_tokens - 1] if scored.start_tokens else None
        agreed = scored.ids[: scored.agreed]
        end = self._delimiter_end(anchor, agreed[: request.max_tokens])  # decoding stops at the limit
        if end is not None:
            keep, stop = end, "delimiter"
        elif len(agreed) >= request.max_tokens:
            keep, stop = request.max_tokens, "max_tokens"
        else:
            keep, stop = len(agreed), None
        if any(token in self.eos_ids for token in agreed[:keep]):
            return None  # the cache would end before it: the record has no distribution there
        if keep not in (scored.agreed, len(scored.ids)):
            return None  # stopped inside the agreed prefix, where no distribution was kept
        drop = len(scored.ids) - keep
        if drop:
            session.cache.crop(-drop)
            del session.ids[scored.start_tokens + keep:]
            session.next_logits = scored.at_mismatch
        session.next_hidden = None
        session.scored = None
        session.text = target  # `_finish` appends the step's text
        session.boundaries = [b for b in session.boundaries if b[0] <= scored.start_tokens]
        row = _Row(request, session, 0, None, anchor, token_ids=scored.ids[:keep],
                   logprobs=scored.logprobs[:keep], entropies=scored.entropies[:keep],
                   stop_reason=stop, reused=keep)
        row.text = self._decode_after(anchor, row.token_ids)
        return row

    @torch.no_grad()
    def _score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        started = time.perf_counter()
        try:
            plans = []
            for request in requests:
                session, feed = self._plan_feed(request.request_id, request.problem, request.context)
                plans.append((session, feed, self._encode(request.text)))
            together = [k for k, (_, _, ids) in enumerate(plans) if ids]
            width = max((len(plans[k][1]) + len(plans[k][2]) for k in together), default=0)
            vocab = getattr(self.model.config, "vocab_size", None) or len(self.tokenizer)
            if (len(together) < 2 or len(together) * width * vocab * 4 > 256 << 20
                    or not all(_is_plain_dynamic(plans[k][0].cache) for k in together)):
                together = []  # one at a time (or a cache layout a batch cannot pad)
            scored = self._score_together([requests[k] for k in together], [plans[k] for k in together])
            outputs = []
            for k, (request, (session, feed, ids)) in enumerate(zip(requests, plans, strict=False)):
                if k in together:
                    outputs.append(scored[together.index(k)])
                    continue
                outputs.append(self._score_fed(request, session, feed, ids))
        except BaseException:
            for request in requests:  # caches may be half fed: start these requests over
                self._sessions.pop(request.request_id, None)
            raise
        seconds = time.perf_counter() - started
        return [replace(o, prefill_tokens=len(plan[1]), seconds=seconds)
                for o, plan in zip(outputs, plans, strict=False)]

    def _score_together(self, requests: Sequence[ScoreRequest], plans: list) -> list[ScoreOutput]:
        """Catch-up and scored text of every row in one forward pass, right-padded."""
        if not requests:
            return []
        feeds = [feed + ids for _, feed, ids in plans]
        width = max(len(feed) for feed in feeds)
        input_ids = torch.zeros((len(feeds), width), dtype=torch.long)
        new_valid = torch.zeros((len(feeds), width), dtype=torch.bool)
        positions = torch.zeros((len(feeds), width), dtype=torch.long)
        for k, ((session, _, _), feed) in enumerate(zip(plans, feeds, strict=False)):
            input_ids[k, : len(feed)] = torch.tensor(feed, dtype=torch.long)
            new_valid[k, : len(feed)] = True
            positions[k] = torch.arange(len(session.ids), len(session.ids) + width)
        batch = _Batch.merge([session for session, _, _ in plans], self.device)
        out = self._forward(batch, input_ids.to(self.device), new_valid.to(self.device),
                            positions.to(self.device), width, False)
        logits = out.logits.float()  # (rows, width, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        outputs = []
        for k, (request, (session, feed, ids)) in enumerate(zip(requests, plans, strict=False)):
            fed = len(feed)
            before = log_probs[k, fed - 1] if fed else torch.log_softmax(session.next_logits, dim=-1)
            predicting = torch.cat([before[None], log_probs[k, fed: fed + len(ids) - 1]])  # row i -> ids[i]
            session.next_logits = logits[k, fed + len(ids) - 1].clone()
            session.next_hidden = None
            session.ids.extend(feed + ids)
            session.cache = batch.row_cache(k)
            outputs.append(self._record_scored(request, session, ids, predicting))
        return outputs

    def _score_fed(self, request: ScoreRequest, session: _Session, feed: list[int],
                   ids: list[int]) -> ScoreOutput:
        """Catch one request up (`feed`) and score `ids`, in one forward pass."""
        if not ids:
            if feed:
                self._feed(session, feed)
            return ScoreOutput((), (), 0, 0.0)
        if feed:
            log_probs = self._feed(session, feed + ids, keep_logits=len(ids) + 1)
            predicting = log_probs[: len(ids)]  # row i -> ids[i]
        else:
            before = torch.log_softmax(session.next_logits, dim=-1)
            log_probs = self._feed(session, ids, keep_logits=len(ids))
            predicting = torch.cat([before[None], log_probs[: len(ids) - 1]])
        return self._record_scored(request, session, ids, predicting)

    def _record_scored(self, request: ScoreRequest, session: _Session, ids: list[int],
                       predicting: torch.Tensor) -> ScoreOutput:
        """Log-probabilities of the scored ids (predicting[i] is the distribution over
        ids[i]); records the text in the session and what a greedy step may reuse."""
        logprobs = predicting.gather(1, torch.tensor(ids, device=predicting.device)[:, None])[:, 0].tolist()
        if any(math.isnan(lp) for lp in logprobs):
            raise BackendError("scoring produced NaN log-probabilities", self.info.name)
        start_chars = len(session.text)
        session.text += request.text
        session.boundaries.append((len(session.ids), len(session.text)))
        agreed, entropies, at_mismatch = _agreement(predicting, ids)
        start = len(session.ids) - len(ids)
        session.scored = _Scored(start, start_chars, list(ids), agreed, logprobs, entropies, at_mismatch)
        prefix, tokens = self._greedy_prefix(session, start, ids, agreed, at_mismatch, request.text)
        return ScoreOutput(tuple(ids), tuple(logprobs), 0, 0.0, prefix, tokens)

    def _greedy_prefix(self, session: _Session, start: int, ids: list[int], agreed: int,
                       at_mismatch: torch.Tensor | None, text: str) -> tuple[str | None, int]:
        """`ScoreOutput.greedy_prefix` of a scored text and its tokens (see there)."""
        after = at_mismatch if at_mismatch is not None else session.next_logits
        anchor = session.ids[start - 1] if start else None
        next_token = int(torch.argmax(after)) if after is not None else None
        return greedy_prefix(ids, agreed, next_token, text=text, delimiter=self.info.step_delimiter,
                             decode=functools.partial(self._decode_after, anchor), eos_ids=self.eos_ids,
                             may_end=self._may_end_delimiter)

    def _delimiter_end(self, anchor: int | None, ids: list[int]) -> int | None:
        """How many of `ids` a step decoding them would keep before stopping at the
        delimiter (the first token that completes it), or None if none does."""
        return delimiter_end(ids, functools.partial(self._decode_after, anchor), self.info.step_delimiter,
                             self._may_end_delimiter)
