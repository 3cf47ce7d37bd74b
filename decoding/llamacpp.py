"""llama.cpp backend: a GGUF file run in this process by llama-cpp-python (the `llamacpp`
extra, `llama-cpp-python==0.3.36`), the standard CPU engine for quantized models.

- Tokenizer, chat template, special tokens and BOS rule are the GGUF file's own, as
  llama.cpp reads them (`GGUFTokenizer`): a prompt starts with BOS exactly when the file's
  `tokenizer.ggml.add_bos_token` says so (and the rendered text does not already start
  with it); a step stops at any end-of-generation token the vocabulary marks (EOS, EOT,
  `<|im_end|>`, ...). Prompts are rendered by `decoding.prompting.render_prompt`, like every
  other backend; the chat template with llama-cpp-python's Jinja2 formatter, which uses
  transformers' Jinja settings.
- Log-probabilities and entropies are exact: each position's full logits come back from
  the engine (`ModelInfo.entropy == "exact"`).
- One engine (a llama.cpp context holding one sequence) per backend object. Each request
  keeps its own KV state: the request whose tokens are in the context continues there; when
  another request needs the context, the resident one's KV is copied out to host memory
  (`llama_state_seq_get_data`) and copied back when it returns. Nothing is re-encoded, so a
  call prefills only what its own history lacks: the same rule as `HFBackend`'s KV cache
  (crop to the last shared piece boundary, re-feed one token when the text diverged after
  it), which is what makes `prefill_bound` exact and costs comparable across backends.
- Concurrency: calls on one backend are serialized by a lock (one context cannot run two
  batches at once). `llama_decode` runs without the GIL (ctypes releases it), so two
  backends (two tiers) driven from two threads compute at the same time.
- Not supported: hidden states (`StepRequest.return_hidden` gives `hidden=None`, as
  `VLLMBackend` does) and recurrent/hybrid architectures' partial cache crops (a diverged
  context then starts over, counted in `prefill_tokens`).

This module knows nothing about gates, costs or budgets.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from decoding.hf import weights_fingerprint
from decoding.prompting import (
    check_prompt_settings,
    crop_point,
    decode_after,
    greedy_prefix,
    piece_encoder,
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

__all__ = ["GGUFTokenizer", "LlamaCppBackend"]

_INSTALL_HINT = "pip install 'llama-cpp-python==0.3.36' (the stepcascade[llamacpp] extra)"


_backend_ready = threading.Lock()
_backend_started = False


def _llama():
    """The llama_cpp module (its backend initialised once per process), or a ModelLoadError
    saying how to install it."""
    global _backend_started
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError as error:
        raise ModelLoadError(f"LlamaCppBackend needs llama-cpp-python ({error}): {_INSTALL_HINT}") from None
    with _backend_ready:
        if not _backend_started:
            llama_cpp.llama_backend_init()
            _backend_started = True
    return llama_cpp, _internals


class _LogCapture:
    """Collects llama.cpp's log lines while it loads a model (so a failure can say why),
    instead of letting them print; the library's own callback is put back afterwards."""

    def __init__(self, llama_cpp) -> None:
        self._llama_cpp = llama_cpp
        self.lines: list[str] = []

        def collect(level, text, user_data):  # noqa: ARG001 - ctypes callback signature
            self.lines.append(text.decode("utf-8", errors="replace"))

        self._callback = llama_cpp.llama_log_callback(collect)  # kept alive while installed

    def __enter__(self) -> _LogCapture:
        self._llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        from llama_cpp import _logger

        self._llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        # Errors only from here on (llama.cpp logs every KV restore at INFO level): what
        # constructing llama-cpp-python's own `Llama(verbose=False)` sets, process-wide.
        _logger.set_verbose(False)

    def reason(self) -> str:
        """The last error-looking line llama.cpp logged (or the last line)."""
        lines = [line.strip() for line in "".join(self.lines).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
        return (errors or lines or ["(llama.cpp logged nothing)"])[-1]


class GGUFTokenizer:
    """llama.cpp's tokenizer of a loaded GGUF, behind the part of the transformers
    tokenizer interface that `decoding.prompting` uses (`chat_template`,
    `apply_chat_template`, `encode`, `decode`, `eos_token_id`, `len`).

    encode(text, add_special_tokens): special-token text in `text` is parsed as the
    special token (as transformers does); with add_special_tokens, BOS is prepended when
    the file's `add_bos_token` says so and the text does not already start with BOS. EOS
    is never appended (a prompt is continued, not closed). decode: the tokens' bytes
    concatenated, special tokens rendered, then UTF-8 (a split character reads as U+FFFD).
    """

    def __init__(self, model, metadata: dict[str, str]) -> None:
        llama_cpp, _ = _llama()
        self._llama_cpp = llama_cpp
        self._model = model
        self._vocab = model.vocab
        self.vocab_size = int(model.n_vocab())
        bos, eos = int(model.token_bos()), int(model.token_eos())
        self.bos_token_id = bos if bos >= 0 else None
        self.eos_token_id = eos if eos >= 0 else None
        self.add_bos_token = bool(model.add_bos_token())
        self.bos_token = self.decode([bos]) if bos >= 0 else ""
        self.eos_token = self.decode([eos]) if eos >= 0 else ""
        self.chat_template = metadata.get("tokenizer.chat_template") or None
        self._formatter = None
        # Every token the vocabulary marks as ending generation (EOS, EOT, <|im_end|>, ...).
        self.eog_ids = frozenset(t for t in range(self.vocab_size)
                                 if llama_cpp.llama_vocab_is_eog(self._vocab, t))

    def __len__(self) -> int:
        return self.vocab_size

    def _check_open(self) -> None:
        if self._model.model is None:  # freed by LlamaCppBackend.close(): its vocabulary is gone too
            raise BackendError("the model was closed; its tokenizer cannot be used")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self._check_open()
        ids = self._model.tokenize(text.encode("utf-8"), False, True) if text else []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None \
                and not (ids and ids[0] == self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return list(ids)

    @functools.cache  # noqa: B019 - one tokenizer per loaded model, kept for its life
    def _piece(self, token: int, special: bool) -> bytes:
        self._check_open()
        buffer = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self._piece(int(t), not skip_special_tokens)
                        for t in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this GGUF file has no tokenizer.chat_template")
        if tokenize:
            raise ValueError("GGUFTokenizer.apply_chat_template renders text only (tokenize=False)")
        if self._formatter is None or self._formatter.add_generation_prompt != add_generation_prompt:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(self.chat_template, eos_token=self.eos_token,
                                                  bos_token=self.bos_token,
                                                  add_generation_prompt=add_generation_prompt)
        return self._formatter(messages=messages).prompt


@dataclass
class _Session:
    """One request's cache: the text fed so far, its token ids, the distribution after the
    last id, and (while another request holds the engine) its KV state in host memory."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    # (tokens, characters) after each piece fed or generated: the safe places to crop to.
    boundaries: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    next_logits: np.ndarray | None = None  # (vocab,) float32 after the last id
    saved: bytes | None = None  # KV state while not resident (None when resident or empty)
    # Each run through the engine as (ids fed together, how many of them are kept after
    # crops): replaying the same pieces in the same shapes rebuilds a dropped KV state bit for
    # bit (one batched prefill of all ids would round differently and can flip a greedy token).
    pieces: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    # The saved KV state was dropped to keep host memory under the backend's bound: it is
    # rebuilt from `pieces` when the request next runs (the engine's cost, not the request's).
    evicted: bool = False
    last_active: int = 0  # the backend's activation count when this session last ran


class _CatchUp(NamedTuple):
    """How a request's session gets to prompt + context (see `LlamaCppBackend._plan_catch_up`)."""

    fresh: bool  # start over from the prompt
    keep: int  # tokens of the session's KV kept
    feed: list[int]  # ids to run after them
    boundaries: list[tuple[int, int]]  # the session's piece boundaries once fed
    text: str  # the session's text once fed


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the engine's logits are float32)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _entropy(log_probs: np.ndarray) -> np.ndarray:
    probs = np.exp(log_probs)
    return -(probs * np.where(probs > 0, log_probs, 0.0)).sum(axis=-1)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCppBackend(Backend):
    """A GGUF model run in process by llama.cpp, behind the `decoding.Backend` protocol.

    model_path: the .gguf file. n_ctx: the most tokens one request's context (prompt,
    accepted steps and the step being written) may hold; a call that would pass it fails
    with a BackendError naming n_ctx. n_threads: CPU threads (default: the cores this
    process may use). seed: mixed into every sampled step's seed (temperature > 0; the
    same seed, request seed and context give the same step). n_batch: tokens per forward
    pass when prefilling. Prompt: `prompt_template` (a format string with `{problem}`)
    when given; else the file's chat template; else the problem followed by the delimiter.
    name: what `info.name` reports (default: the path as given). max_saved_bytes: host memory
    the KV states of waiting requests may take together (None: no bound); past it the states
    of the requests that ran longest ago are dropped and their tokens run again when they
    next run. Requests are charged (and `prefill_bound` counts) only the tokens new to them, so
    budgets do not depend on memory pressure; `tokens_recomputed` counts the engine's extra
    work. A dropped state is rebuilt by running the request's tokens again in the pieces and
    the same shapes as when they first ran, so what a request writes does not depend on
    memory pressure; rebuilding costs about what computing the state first cost.
    """

    # fork copies a request's KV state; a calibration sweep shares its branches' calls with it
    supports_fork = True

    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, step_delimiter: str = "\n\n", prompt_template: str | None = None,
                 name: str | None = None, n_batch: int = 512,
                 max_saved_bytes: int | None = 2 * 1024 ** 3) -> None:
        check_prompt_settings(step_delimiter, prompt_template)
        if max_saved_bytes is not None and (not isinstance(max_saved_bytes, int)
                                            or isinstance(max_saved_bytes, bool) or max_saved_bytes < 0):
            raise ValueError(f"max_saved_bytes must be None or an integer >= 0, got {max_saved_bytes!r}")
        for label, value, low in (("n_ctx", n_ctx, 16), ("n_batch", n_batch, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or isinstance(n_threads, bool)
                                      or n_threads < 1):
            raise ValueError(f"n_threads must be None or an integer >= 1, got {n_threads!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        path = Path(model_path).expanduser()
        _check_gguf_file(path)
        llama_cpp, internals = _llama()
        self._llama_cpp = llama_cpp
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _default_threads()
        self.seed = seed
        self.prompt_template = prompt_template
        self._n_batch = min(n_batch, n_ctx)
        with _LogCapture(llama_cpp) as log:
            params = llama_cpp.llama_model_default_params()
            try:
                self._model = internals.LlamaModel(path_model=str(path), params=params, verbose=True)
            except ValueError:
                raise ModelLoadError(f"llama.cpp could not load {str(path)!r}: {log.reason()} (a corrupt or "
                                     "truncated GGUF file, or an architecture llama-cpp-python 0.3.36 "
                                     "does not support)") from None
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = self._n_batch
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = self.n_threads
            cparams.no_perf = True
            cparams.embeddings = False
            # Flash attention off: llama.cpp's CPU flash-attention kernels differ between a
            # one-token decode and a batch, so a step's score and its generation log-probs
            # drifted apart by up to 0.2 nats with it (0.06 without; SmolLM2 Q4_1, measured).
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            try:
                self._context = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
            except ValueError:
                self._model.close()
                raise ModelLoadError(f"llama.cpp could not create a context of n_ctx={n_ctx} for "
                                     f"{str(path)!r}: {log.reason()}") from None
        self.metadata: dict[str, str] = self._model.metadata()
        self.tokenizer = GGUFTokenizer(self._model, self.metadata)
        self.eos_ids = self.tokenizer.eog_ids
        # Context text after the prompt: the shared rule (a piece ending in whitespace is
        # encoded as it reads with a step after it).
        self._encode_piece = piece_encoder(self.tokenizer.encode, self.tokenizer, False)
        self.info = ModelInfo(name=name or str(model_path), fingerprint=weights_fingerprint(path),
                              num_parameters=int(self._model.n_params()), step_delimiter=step_delimiter,
                              entropy="exact")
        self._memory = self._context.memory
        # Recurrent state cannot be cut back to an earlier position: a diverged context starts over.
        self._croppable = not (llama_cpp.llama_model_is_recurrent(self._model.model)
                               or llama_cpp.llama_model_is_hybrid(self._model.model))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._n_vocab = self.tokenizer.vocab_size
        self._sessions: dict[str, _Session] = {}
        self._resident: str | None = None  # the request whose tokens the engine holds
        self._lock = threading.RLock()
        self._ends_delimiter: dict[int, bool] = {}
        self.max_saved_bytes = max_saved_bytes
        self._activations = 0
        self.tokens_fed = 0  # every token run through the engine (prefill, scoring, decoding)
        self.state_swaps = 0  # KV states copied out to host memory
        self.states_evicted = 0  # saved KV states dropped to stay under max_saved_bytes
        self.tokens_recomputed = 0  # tokens run again because their request's state was dropped

    # ---- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine (idempotent); later calls fail with a BackendError."""
        with self._lock:
            if getattr(self, "_batch", None) is not None:
                self._llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if getattr(self, "_context", None) is not None:
                self._context.close()
                self._model.close()
                self._context = None
            self._sessions.clear()
            self._resident = None

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- prompt and tokens -------------------------------------------------------------

    def render_prompt(self, problem: str) -> tuple[str, bool]:
        """The prompt text for a problem, and whether the tokenizer should add its specials.
        (This backend's prompt encoding follows the file: see `GGUFTokenizer.encode`.)"""
        return render_prompt(problem, tokenizer=self.tokenizer, step_delimiter=self.info.step_delimiter,
                             prompt_template=self.prompt_template)

    def _encode_prompt(self, prompt: str) -> list[int]:
        # The file decides BOS (add_bos_token), with a chat template too: llama.cpp's own rule.
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _decode_after(self, anchor: int | None, ids: Sequence[int]) -> str:
        return decode_after(self.tokenizer, anchor, ids)

    def _may_end_delimiter(self, token: int) -> bool:
        """Does this token's text contain the delimiter's last character? (memoized per id)"""
        known = self._ends_delimiter.get(token)
        if known is None:
            known = self._ends_delimiter[token] = (self.info.step_delimiter[-1]
                                                   in self.tokenizer.decode([token]))
        return known

    # ---- the engine: one sequence, request states swapped in and out ------------------------

    def _check_open(self) -> None:
        if self._context is None:
            raise BackendError("the backend was closed", self.info.name)

    def _copy_out(self) -> bytes:
        """The resident request's KV state, copied to host memory."""
        llama_cpp = self._llama_cpp
        ctx = self._context.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written == 0:
            raise BackendError("llama.cpp could not copy a request's KV state out", self.info.name)
        self.state_swaps += 1
        return bytes(buffer)[:written]

    def _activate(self, request_id: str, session: _Session) -> None:
        """Make `session` the one whose KV the engine holds (the resident one's is saved)."""
        if self._resident == request_id:
            return
        previous = self._sessions.get(self._resident) if self._resident is not None else None
        if previous is not None and previous.ids:
            previous.saved = self._copy_out()
        self._llama_cpp.llama_memory_clear(self._memory, True)
        self._resident = None
        if session.saved is not None:
            data = (ctypes.c_uint8 * len(session.saved)).from_buffer_copy(session.saved)
            if self._llama_cpp.llama_state_seq_set_data(self._context.ctx, data, len(session.saved), 0) == 0:
                raise BackendError("llama.cpp could not restore a request's KV state", self.info.name)
            session.saved = None
        self._resident = request_id
        self._activations += 1
        session.last_active = self._activations
        self._bound_saved_states()

    @property
    def saved_bytes(self) -> int:
        """Host memory held by the KV states of requests not resident in the engine."""
        # Forked sessions may share one bytes object: count it once.
        return sum(len(b) for b in {id(s.saved): s.saved for s in self._sessions.values()
                                    if s.saved is not None}.values())

    def _bound_saved_states(self) -> None:
        """Drop the saved states of the requests that ran longest ago until the rest fit."""
        if self.max_saved_bytes is None:
            return
        waiting = [s for s in self._sessions.values() if s.saved is not None]
        holders = Counter(id(s.saved) for s in waiting)  # forked sessions may share one state
        total = self.saved_bytes
        for session in sorted(waiting, key=lambda s: s.last_active):
            if total <= self.max_saved_bytes:
                break
            holders[id(session.saved)] -= 1
            if holders[id(session.saved)] == 0:  # its last holder: the memory goes
                total -= len(session.saved)
            session.saved, session.evicted = None, True
            self.states_evicted += 1

    def _recompute(self, session: _Session, keep: int) -> None:
        """Rebuild a resident session's KV for its first `keep` ids after its saved state was
        dropped: its pieces run again as they first ran, each cropped as it was."""
        pieces, logits, length = session.pieces, session.next_logits, len(session.ids)
        session.ids, session.pieces, session.evicted = [], [], False
        for ids, kept in pieces:
            if len(session.ids) >= keep:
                break
            start = len(session.ids)
            self._feed(session, list(ids))
            self.tokens_recomputed += len(ids)
            if kept < len(ids):
                self._crop(session, start + kept)
        if len(session.ids) == length:
            session.next_logits = logits  # as without the drop (the replay's last row, or stale after a crop)

    def _feed(self, session: _Session, ids: list[int], outputs: int = 1) -> np.ndarray:
        """Run `ids` through the engine after the session's tokens (the session must be
        resident); returns the float32 logits of the last `outputs` positions, shape
        (outputs, vocab), and keeps the last row as the session's next distribution."""
        llama_cpp = self._llama_cpp
        start = len(session.ids)
        if start + len(ids) > self.n_ctx:
            raise BackendError(f"the request needs {start + len(ids)} tokens of context, more than "
                               f"n_ctx={self.n_ctx}; construct LlamaCppBackend with a larger n_ctx",
                               self.info.name)
        first_output = len(ids) - outputs
        rows: list[np.ndarray] = []
        batch = self._batch
        for offset in range(0, len(ids), self._n_batch):
            chunk = ids[offset: offset + self._n_batch]
            batch.n_tokens = len(chunk)
            wanted = []
            for j, token in enumerate(chunk):
                batch.token[j] = token
                batch.pos[j] = start + offset + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                keep = offset + j >= first_output
                batch.logits[j] = keep
                if keep:
                    wanted.append(j)
            code = llama_cpp.llama_decode(self._context.ctx, batch)
            if code != 0:
                # The KV cache may hold part of this batch now: the caller drops the session.
                raise BackendError(f"llama_decode failed with code {code} after {start + offset} tokens "
                                   f"(n_ctx={self.n_ctx})", self.info.name)
            for j in wanted:
                pointer = llama_cpp.llama_get_logits_ith(self._context.ctx, j)
                rows.append(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())
        self.tokens_fed += len(ids)
        session.ids.extend(ids)
        session.pieces.append((tuple(ids), len(ids)))
        logits = np.stack(rows)
        session.next_logits = logits[-1]
        return logits

    def _crop(self, session: _Session, keep: int) -> None:
        """Drop the session's tokens after the first `keep` (it is resident)."""
        if not self._llama_cpp.llama_memory_seq_rm(self._memory, 0, keep, -1):
            raise BackendError(f"llama.cpp could not crop a request's KV cache to {keep} tokens",
                               self.info.name)
        del session.ids[keep:]
        pieces, start = [], 0
        for ids, kept in session.pieces:
            if start >= keep:
                break
            pieces.append((ids, min(kept, keep - start)))
            start += pieces[-1][1]
        session.pieces = pieces

    def _plan(self, session: _Session, target: str) -> tuple[int, int]:
        """The (tokens, characters) boundary the session keeps for `target` ((0, 0): start over)."""
        tokens, chars = crop_point(session.text, session.boundaries, target)
        if tokens < len(session.ids) and not self._croppable:
            return 0, 0
        return tokens, chars

    def _plan_catch_up(self, session: _Session | None, problem: str, context: str) -> _CatchUp:
        """How the request's session gets to prompt + context, without running anything: the
        one rule behind `_catch_up`, `prefill_bound` and `state_key`."""
        prompt, _ = self.render_prompt(problem)
        target = prompt + context
        tokens, chars = self._plan(session, target) if session is not None else (0, 0)
        if tokens == 0:  # fresh (or fully diverged) request: start over from the prompt
            feed = self._encode_prompt(prompt)
            if not feed:
                raise BackendError("the prompt encoded to no tokens", self.info.name)
            fresh, keep, tokens, chars = True, 0, len(feed), len(prompt)
            boundaries = [(0, 0), (tokens, chars)]
        else:
            # Diverged after a shared boundary: crop to one token before it and re-feed that
            # token, so the distribution at the boundary is known again.
            fresh, keep = False, tokens - 1 if tokens < len(session.ids) else tokens
            feed = session.ids[keep:tokens]
            boundaries = [b for b in session.boundaries if b[0] <= tokens]
        if target[chars:]:
            ids = self._encode_piece(target[chars:], False)
            feed = feed + ids
            boundaries.append((tokens + len(ids), len(target)))
        return _CatchUp(fresh, keep, feed, boundaries, target)

    def _catch_up(self, request_id: str, problem: str, context: str) -> tuple[_Session, list[int]]:
        """Bring the request's session to prompt + context (resident, cropped back to the last
        shared boundary when the context diverged); returns it and the ids still to feed."""
        session = self._sessions.get(request_id)
        fresh, keep, feed, boundaries, text = self._plan_catch_up(session, problem, context)
        if fresh:
            session = self._sessions[request_id] = _Session()
            if self._resident == request_id:
                self._llama_cpp.llama_memory_clear(self._memory, True)
        self._activate(request_id, session)
        if session.evicted:
            self._recompute(session, keep)  # only what the plan keeps
        if keep < len(session.ids):
            self._crop(session, keep)
        session.text, session.boundaries = text, boundaries
        return session, feed

    # ---- the protocol ------------------------------------------------------------------------

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        """Exactly the tokens the next call on this context will feed before its own text."""
        with self._lock:
            self._check_open()
            return len(self._plan_catch_up(self._sessions.get(request_id), problem, context).feed)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._sessions.pop(request_id, None)
            if self._resident == request_id:
                self._resident = None
                if self._context is not None:
                    self._llama_cpp.llama_memory_clear(self._memory, True)

    def fork(self, source_id: str, target_id: str) -> None:
        """Give `target_id` a copy of `source_id`'s state (KV included), so two branches of a
        calibration sweep each continue exactly as an independent run would."""
        with self._lock:
            self._check_open()
            if source_id == target_id:
                return
            source = self._sessions.get(source_id)
            if target_id == self._resident:
                self._resident = None  # its KV is about to be replaced by the copy
            if source is None:
                self._sessions[target_id] = _Session()
                return
            target = copy.copy(source)
            if self._resident == source_id:
                target.saved = self._copy_out()  # the source stays resident
            target.ids = list(source.ids)
            target.boundaries = list(source.boundaries)
            target.pieces = list(source.pieces)
            self._sessions[target_id] = target
            self._bound_saved_states()

    def _caught_up(self, session: _Session | None, problem: str, context: str
                   ) -> tuple[list[int], list[tuple[int, int]], tuple[int, int]]:
        """What `_catch_up` would leave in the session: its ids, its piece boundaries and
        where the context ends (tokens, characters)."""
        _, keep, feed, boundaries, text = self._plan_catch_up(session, problem, context)
        ids = (session.ids[:keep] if session is not None else []) + feed
        return ids, boundaries, (len(ids), len(text))

    def state_key(self, request: StepRequest | ScoreRequest) -> tuple[int, ...]:
        """The token ids the request will hold once caught up on its context (they alone
        decide a call's output here)."""
        with self._lock:
            self._check_open()
            session = self._sessions.get(request.request_id)
            return tuple(self._caught_up(session, request.problem, request.context)[0])

    def adopt(self, source_id: str, request: StepRequest | ScoreRequest) -> None:
        """Give `request.request_id` the state `request` would have left in it, copied from
        `source_id`, which just ran the same call from an equal `state_key`; the target keeps
        its own piece boundaries (where its later catch-ups cut back to)."""
        with self._lock:
            self._check_open()
            target = self._sessions.get(request.request_id)
            _, boundaries, end = self._caught_up(target, request.problem, request.context)
            self.fork(source_id, request.request_id)
            adopted = self._sessions[request.request_id]
            adopted.boundaries = boundaries + [b for b in adopted.boundaries if b > end]  # the call's own

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        """Generate one step per request, one request after another on this engine."""
        for request in requests:
            if request.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        with self._lock:
            self._check_open()
            return [self._guarded(request, self._next_step) for request in requests]

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        """Score each given text: catch-up and text in one pass through the engine."""
        with self._lock:
            self._check_open()
            return [self._guarded(request, self._score) for request in requests]

    def _guarded(self, request, run):
        try:
            return run(request)
        except BaseException as error:
            # A failure can leave the engine's KV half fed: this request starts over next time.
            self._sessions.pop(request.request_id, None)
            if self._resident == request.request_id:
                self._resident = None
                self._llama_cpp.llama_memory_clear(self._memory, True)
            if isinstance(error, (BackendError, KeyboardInterrupt, SystemExit)):
                raise
            raise BackendError(f"{type(error).__name__}: {error}", self.info.name) from error

    # ---- one step ----------------------------------------------------------------------------

    def _next_step(self, request: StepRequest) -> StepOutput:
        started = time.perf_counter()
        session, feed = self._catch_up(request.request_id, request.problem, request.context)
        anchor = feed[-1] if feed else (session.ids[-1] if session.ids else None)
        if feed:
            self._feed(session, feed)
        rng = None
        if request.temperature > 0:
            rng = np.random.default_rng(zlib.crc32(
                f"{self.seed}\x00{request.seed}\x00{request.problem}\x00{request.context}".encode()))
        delimiter = self.info.step_delimiter
        token_ids: list[int] = []
        logprobs: list[float] = []
        entropies: list[float] = []
        text = ""
        stop: StopReason | None = None
        logits = session.next_logits
        while stop is None:
            log_probs = _log_softmax(logits)
            if rng is None:
                token = int(np.argmax(log_probs))
            else:
                scaled = logits.astype(np.float64) / request.temperature
                probs = np.exp(scaled - scaled.max())
                cumulative = np.cumsum(probs)
                token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
                token = min(token, self._n_vocab - 1)
            token_ids.append(token)
            logprobs.append(float(log_probs[token]))
            entropies.append(float(_entropy(log_probs)))
            if token in self.eos_ids:
                stop = "eos"  # EOS is not fed: the cache ends before it
                break
            logits = self._feed(session, [token])[0]
            # Decoding the whole step each token is quadratic; only look when this token
            # could have completed the delimiter (decoded text is matched, not token ids).
            if self._may_end_delimiter(token):
                text = self._decode_after(anchor, token_ids)
                if delimiter in text:
                    stop = "delimiter"
                    break
            if len(token_ids) >= request.max_tokens:
                stop = "max_tokens"
        if stop == "eos":
            text = self._decode_after(anchor, token_ids[:-1]) if len(token_ids) > 1 else ""
        elif stop == "max_tokens":
            text = self._decode_after(anchor, token_ids)
        session.text += text
        session.boundaries.append((len(session.ids), len(session.text)))
        return StepOutput(text=text, token_ids=tuple(token_ids), logprobs=tuple(logprobs),
                          entropies=tuple(entropies), stop_reason=stop, prefill_tokens=len(feed),
                          seconds=time.perf_counter() - started)

    # ---- scoring -----------------------------------------------------------------------------

    def _score(self, request: ScoreRequest) -> ScoreOutput:
        started = time.perf_counter()
        session, feed = self._catch_up(request.request_id, request.problem, request.context)
        ids = self._encode(request.text)
        if not ids:
            if feed:
                self._feed(session, feed)
            return ScoreOutput((), (), len(feed), time.perf_counter() - started)
        anchor = feed[-1] if feed else (session.ids[-1] if session.ids else None)
        if feed:
            log_probs = _log_softmax(self._feed(session, feed + ids, outputs=len(ids) + 1))
        else:
            before = session.next_logits[None]
            log_probs = _log_softmax(np.concatenate([before, self._feed(session, ids, outputs=len(ids))]))
        predicting, after = log_probs[:-1], log_probs[-1]  # predicting[i] -> ids[i]
        logprobs = [float(predicting[i, token]) for i, token in enumerate(ids)]
        if not all(np.isfinite(logprobs)):
            raise BackendError("scoring produced non-finite log-probabilities", self.info.name)
        session.text += request.text
        session.boundaries.append((len(session.ids), len(session.text)))
        greedy = np.argmax(predicting, axis=-1)
        agreed = next((i for i, (g, t) in enumerate(zip(greedy.tolist(), ids, strict=False)) if g != t),
                      len(ids))
        next_token = int(greedy[agreed]) if agreed < len(ids) else int(np.argmax(after))
        prefix, prefix_tokens = greedy_prefix(
            ids, agreed, next_token, text=request.text, delimiter=self.info.step_delimiter,
            decode=functools.partial(self._decode_after, anchor), eos_ids=self.eos_ids,
            may_end=self._may_end_delimiter)
        return ScoreOutput(tuple(ids), tuple(logprobs), len(feed), time.perf_counter() - started,
                           prefix, prefix_tokens)


def _check_gguf_file(path: Path) -> None:
    """A ModelLoadError naming the problem when `path` is not a readable GGUF file."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise ModelLoadError(f"{str(path)!r} is a directory: LlamaCppBackend needs the .gguf file "
                             f"itself{hint}")
    if not path.is_file():
        raise ModelLoadError(f"no GGUF file at {str(path)!r}")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelLoadError(f"cannot read {str(path)!r}: {error}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}; "
                             "a GGUF file starts with b'GGUF')")
