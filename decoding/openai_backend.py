"""A backend over any OpenAI-compatible `/v1/completions` server (vLLM, SGLang, others).

Owns: HTTP (httpx, async), round robin over several base URLs, per-endpoint concurrency
and rate limits, timeouts, retries with backoff, and turning completions into
`StepOutput`/`ScoreOutput`. Knows nothing about gates, costs or budgets.

- A step is one completion with `stop=[delimiter]` and `logprobs`; the server drops
  the stop string from the text, this backend puts the delimiter back so a step reads
  exactly as `HFBackend`'s does.
- Scoring a given text asks for the prompt's own log-probabilities (`echo=true`) with
  `max_tokens=1`: `max_tokens=0` is "no limit" to some servers (llama-cpp-python
  generates to the end of its context), so one token is generated and dropped. The
  echoed entries are checked against what was sent (the token count with token-id
  prompts; with text prompts, the token texts must spell the scored text and end where
  the prompt ends), and the first score on each endpoint also checks that the echoed
  log-probability of the generated token equals the one a plain completion reports (a
  server whose echo is shifted by a position, as llama-cpp-python's is for a model
  without BOS, fails it): entries that do not line up are a `BackendError`, never a
  score. A server that does not return them gets a `BackendError` naming the endpoint.
  With a local tokenizer and `vllm_extensions` (token ids come back), the top-1
  alternative at each scored position is the model's greedy choice there, which gives
  `ScoreOutput.greedy_prefix` (for `VerifyGate(rewrite="token")`) up to the first
  disagreement, or through the text and its generated token when it agrees throughout.
- The client re-sends the whole prompt each step; keeping the shared prefix cached
  between steps is the server's job (vLLM: automatic prefix caching). `prefill_tokens`
  counts what a prefix-caching engine computes, with the same rule as `HFBackend`'s KV
  cache (see `decoding.prompting.PrefixLedger`), so costs compare across backends.
- Prompts (`prompt_format`, explicit): "token_ids" (the default with a local tokenizer,
  the model's own, loaded with transformers) sends token ids by the rule every backend
  shares (`decoding.prompting.plan_catch_up`): the prompt, the model's own ids for the
  steps it generated (when the server returns ids: `vllm_extensions`), and other text
  encoded piece by piece, so the server sees exactly what `HFBackend` would feed and
  writes the same greedy steps; `prefill_bound` is exact. "text" (the only choice
  without a tokenizer; needed for servers that refuse token-id prompts, such as
  llama-cpp-python's, which answers HTTP 500 to them when echoing) sends the text and
  the server tokenizes it whole: on a BPE tokenizer its tokens can differ from
  `HFBackend`'s where steps meet, so greedy steps can differ too. Without a tokenizer
  `prefill_bound` is the UTF-8 byte count plus `special_tokens_bound` (a token is at
  least one byte for byte-level and byte-fallback tokenizers), a conservative bound,
  and the prefill charged is the smaller of that bound and the server's
  `usage.prompt_tokens`.
- Entropies are estimated from the top-`top_logprobs` alternatives the server returns
  (`decoding.prompting.entropy_from_top`: a lower bound).

Threads and loops: all HTTP runs on one private event loop in a daemon thread owned by
the backend; `anext_steps`/`ascore_steps` await it from any loop, `next_steps`/
`score_steps` block on it, so limits hold across sync and async callers and no event
loop is ever nested.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import math
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decoding._own_loop import OwnLoopBatches
from decoding.prompting import (
    PrefixLedger,
    check_prompt_settings,
    decode_after,
    entropy_from_top,
    greedy_prefix,
    piece_encoder,
    render_prompt,
    step_piece,
)
from decoding.types import (
    BackendError,
    ModelInfo,
    ModelLoadError,
    ScoreOutput,
    ScoreRequest,
    StepOutput,
    StepRequest,
)

__all__ = ["OpenAIBackend", "count_parameters"]

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_PROMPT_FORMATS = ("token_ids", "text")
# How far a score's echoed log-probability of its generated token may be from the one a
# plain completion of the same prompt reports. The same engine computes both; what
# differs is batching (prompt vs one token), a ~1e-5 effect in fp32, ~1e-3 with
# quantized kernels. A shifted echo is off by whole nats.
_ECHO_CHECK_TOLERANCE = 0.02


def count_parameters(model_dir: str | Path) -> int:
    """Parameters stored in a model directory's safetensors files, read from their headers
    (no weights loaded). Tied weights are stored once, as `model.parameters()` counts them."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {str(model_dir)!r} to count parameters from")
    total = 0
    for path in files:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for key, value in header.items():
            if key != "__metadata__":
                total += math.prod(value["shape"])
    return total


class _EndpointLimiter:
    """At most `concurrency` requests in flight and (optionally) `rate` per second for one
    base URL. The rate side is asyncio-throttle's Throttler (a sliding window)."""

    def __init__(self, concurrency: int, rate: float | None) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._throttler = None
        if rate is not None:
            from asyncio_throttle import Throttler

            # Throttler counts whole requests per period: express `rate` per second as
            # ceil(rate) requests per ceil(rate)/rate seconds.
            count = max(1, math.ceil(rate))
            self._throttler = Throttler(rate_limit=count, period=count / rate)

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        if self._throttler is not None:
            try:
                await self._throttler.acquire()
            except BaseException:
                self._slots.release()
                raise

    async def __aexit__(self, *exc) -> None:
        self._slots.release()


class OpenAIBackend(OwnLoopBatches):
    """A model served behind one or more OpenAI-compatible base URLs (round robin).

    base_urls: e.g. "http://127.0.0.1:8000" (with or without "/v1"); several = replicas.
    model: the served model name sent in each request.
    num_parameters: for the FLOPs cost model (use `from_model_dir` to read it from the
        checkpoint). tokenizer: a local path (loaded with transformers AutoTokenizer) or a
        tokenizer object; see the module docstring for what it changes.
    timeout: seconds per HTTP attempt. max_retries: extra attempts after a 429, 5xx,
        timeout or connection error, each on the next base URL, after
        backoff * 2**attempt seconds (capped at max_backoff; a 429's Retry-After is
        honoured up to max_backoff). Deterministic: no jitter.
    max_concurrency / rate_limit: per base URL, requests in flight / requests per second.
    top_logprobs: alternatives asked per token (entropy estimate). supports_echo: False
        for servers known not to return prompt logprobs (scoring then fails fast).
    vllm_extensions: also send vLLM's `return_tokens_as_token_ids` (token ids come back,
        and alternatives are keyed by id, so tokens with the same text do not collide).
    prompt_format: "token_ids" or "text" (see the module docstring); None = "token_ids"
        with a tokenizer, else "text".
    """

    def __init__(self, base_urls: str | Sequence[str], model: str, *, num_parameters: int,
                 step_delimiter: str = "\n\n", prompt_template: str | None = None,
                 tokenizer: Any = None, name: str | None = None, fingerprint: str = "",
                 api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 backoff: float = 0.25, max_backoff: float = 8.0, max_concurrency: int = 64,
                 rate_limit: float | None = None, top_logprobs: int = 1,
                 supports_echo: bool = True, special_tokens_bound: int = 16,
                 vllm_extensions: bool = False, prompt_format: str | None = None) -> None:
        check_prompt_settings(step_delimiter, prompt_template)
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"base_urls must be one or more http(s):// URLs, got {base_urls!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, got {model!r}")
        if not isinstance(num_parameters, int) or num_parameters < 1:
            raise ValueError(f"num_parameters must be an integer >= 1, got {num_parameters!r}")
        for label, value, low in (("timeout", timeout, 0.0), ("backoff", backoff, 0.0),
                                  ("max_backoff", max_backoff, 0.0)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low \
                    or (label == "timeout" and value == 0):
                raise ValueError(f"{label} must be a finite number > 0 seconds, got {value!r}")
        for label, value, low in (("max_retries", max_retries, 0), ("max_concurrency", max_concurrency, 1),
                                  ("top_logprobs", top_logprobs, 1), ("special_tokens_bound",
                                                                      special_tokens_bound, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if rate_limit is not None and not (isinstance(rate_limit, (int, float)) and rate_limit > 0
                                           and math.isfinite(rate_limit)):
            raise ValueError("rate_limit must be a positive number of requests per second, "
                             f"got {rate_limit!r}")
        self.base_urls = tuple(u.rstrip("/").removesuffix("/v1") for u in urls)
        self.model = model
        self.prompt_template = prompt_template
        self.tokenizer = _load_tokenizer(tokenizer)
        if prompt_format is None:
            prompt_format = "token_ids" if self.tokenizer is not None else "text"
        if prompt_format not in _PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(_PROMPT_FORMATS)}, "
                             f"got {prompt_format!r}")
        if prompt_format == "token_ids" and self.tokenizer is None:
            raise ValueError("prompt_format='token_ids' needs the model's tokenizer (tokenizer=...); "
                             "without one use prompt_format='text'")
        self.prompt_format = prompt_format
        exact = self.tokenizer is not None and top_logprobs >= len(self.tokenizer)
        self.info = ModelInfo(name=name or f"openai:{model}", fingerprint=fingerprint or "unknown",
                              num_parameters=num_parameters, step_delimiter=step_delimiter,
                              entropy="exact" if exact else f"top-{top_logprobs}")
        self._api_key = api_key
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._max_concurrency = max_concurrency
        self._rate_limit = rate_limit
        self._top_logprobs = top_logprobs
        self._supports_echo = supports_echo
        self._special_bound = special_tokens_bound
        self._vllm_extensions = bool(vllm_extensions)
        self._ledger = PrefixLedger()
        self._lock = threading.Lock()  # the ledger is touched from callers' threads and the loop
        self._round_robin = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._limiters: dict[str, _EndpointLimiter] = {}
        self._echo_checked: set[str] = set()  # endpoints whose echo logprobs were checked

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, base_urls: str | Sequence[str], model: str,
                       *, name: str | None = None, **kwargs) -> OpenAIBackend:
        """A server of a checkpoint you also have locally: tokenizer, parameter count and
        weight fingerprint come from the directory, so costs and calibration files match
        `HFBackend.from_pretrained(model_dir)`."""
        from decoding.hf import weights_fingerprint

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise ModelLoadError(f"no model at {str(model_dir)!r}: expected a directory with config.json")
        return cls(base_urls, model, num_parameters=count_parameters(model_dir), tokenizer=str(model_dir),
                   fingerprint=weights_fingerprint(model_dir), name=name or str(model_dir), **kwargs)

    # ---- the loop the HTTP runs on ----------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"openai-backend:{self.model}",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _submit(self, coroutine) -> concurrent.futures.Future:
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("OpenAIBackend: a blocking call from inside its own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    def close(self) -> None:
        """Close the HTTP client and stop the private loop (the backend can be used again)."""
        loop, thread = self._loop, self._thread
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            self._limiters.clear()

        if thread is not threading.current_thread():
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def __del__(self) -> None:  # best effort: a daemon thread would also die with the process
        try:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- prompts and counting ------------------------------------------------------------

    def render_prompt(self, problem: str) -> tuple[str, bool]:
        return render_prompt(problem, tokenizer=self.tokenizer, step_delimiter=self.info.step_delimiter,
                             prompt_template=self.prompt_template)

    def _encode(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def _encoder(self, add_special: bool):
        """`PrefixLedger`'s encoder: the model's tokens, or without a tokenizer one
        placeholder id (-1) per token of the conservative byte bound."""
        if self.tokenizer is not None:
            return piece_encoder(self._encode, self.tokenizer, add_special)

        def encode(text: str, is_prompt: bool) -> list[int]:
            return [-1] * (len(text.encode("utf-8")) + (self._special_bound if is_prompt else 0))
        return encode

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        prompt, add_special = self.render_prompt(problem)
        with self._lock:
            return self._ledger.prefill(request_id, prompt, context, self._encoder(add_special))

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ledger.release(request_id)

    # ---- HTTP ----------------------------------------------------------------------------

    async def _post(self, body: dict, endpoint: str | None = None) -> tuple[dict, str]:
        """POST /v1/completions with retries; returns (response JSON, the endpoint that
        answered). endpoint: send every attempt there (default: round robin)."""
        import httpx

        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=headers,
                                             limits=httpx.Limits(max_connections=None))
        failures: list[str] = []
        # Round robin picks where a request starts; each retry moves on to the next URL
        # after the one that failed (so a dead replica is not tried twice in a row).
        start = next(self._round_robin)
        for attempt in range(self._max_retries + 1):
            target = endpoint or self.base_urls[(start + attempt) % len(self.base_urls)]
            url = f"{target}/v1/completions"
            limiter = self._limiters.get(target)
            if limiter is None:
                limiter = self._limiters[target] = _EndpointLimiter(self._max_concurrency, self._rate_limit)
            retry_after = None
            async with limiter:
                try:
                    response = await self._client.post(url, json=body)
                except httpx.TimeoutException as error:
                    failures.append(f"{url}: timed out after {self._timeout:g}s ({type(error).__name__})")
                    response = None
                except httpx.TransportError as error:
                    failures.append(f"{url}: connection failed ({type(error).__name__}: {error})")
                    response = None
            if response is not None:
                if response.status_code == 200:
                    try:
                        return response.json(), target
                    except ValueError as error:
                        raise BackendError(f"{url}: malformed JSON in the response ({error})",
                                           self.info.name) from error
                message = _error_message(response)
                if response.status_code not in _RETRY_STATUS:
                    raise BackendError(f"{url}: HTTP {response.status_code}: {message}", self.info.name)
                failures.append(f"{url}: HTTP {response.status_code}: {message}")
                retry_after = _retry_after(response)
            if attempt < self._max_retries:
                delay = min(self._max_backoff, self._backoff * 2 ** attempt)
                if retry_after is not None:
                    delay = min(self._max_backoff, max(delay, retry_after))
                await asyncio.sleep(delay)
        hint = ""
        if isinstance(body.get("prompt"), list) and any("HTTP 500" in failure for failure in failures):
            hint = (" (a server that cannot take token-id prompts, such as llama-cpp-python's, answers "
                    "500 to them: use prompt_format='text')")
        raise BackendError(f"gave up after {len(failures)} attempts: " + "; ".join(failures) + hint,
                           self.info.name)

    # ---- steps -------------------------------------------------------------------------------

    async def _next_step(self, request: StepRequest) -> StepOutput:
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        started = time.perf_counter()
        prompt, add_special = self.render_prompt(request.problem)
        encode = self._encoder(add_special)
        with self._lock:
            sent, fed = self._ledger.plan(request.request_id, prompt, request.context, encode)
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "stop": [self.info.step_delimiter], "logprobs": self._top_logprobs, "echo": False, "n": 1,
        }
        if self._vllm_extensions:
            body["return_tokens_as_token_ids"] = True
        if request.temperature > 0:
            body["seed"] = _request_seed(request.seed, request.problem, request.context)
        body["prompt"] = sent if self.prompt_format == "token_ids" else prompt + request.context
        data, endpoint = await self._post(body)
        choice = _first_choice(data, endpoint, self.info.name)
        text = choice.get("text")
        logprobs = choice.get("logprobs") or {}
        token_lps = logprobs.get("token_logprobs")
        if not isinstance(text, str) or not isinstance(token_lps, list):
            raise BackendError(f"{endpoint}/v1/completions: a choice without text or "
                               "logprobs.token_logprobs", self.info.name)
        if any(lp is None for lp in token_lps):
            raise BackendError(f"{endpoint}/v1/completions: null token logprobs in a completion",
                               self.info.name)
        tokens = logprobs.get("tokens") or []
        tops = logprobs.get("top_logprobs") or [None] * len(token_lps)
        entropies = tuple(entropy_from_top((top or {}).values()) if top else
                          entropy_from_top([lp]) for top, lp in zip(tops, token_lps, strict=False))
        finish = choice.get("finish_reason")
        if finish == "length":
            stop_reason = "max_tokens"
        else:
            stop_reason = _stop_kind(choice, self.info.step_delimiter, tokens)
        if stop_reason == "eos" and not token_lps:
            raise BackendError(f"{endpoint}/v1/completions: stopped with no tokens", self.info.name)
        reported = _prompt_tokens(data)
        if self.tokenizer is None and reported is not None:
            # Text prompts: both the byte bound and the server's count of the whole prompt
            # bound the tokens a prefix-caching server computed; keep the smaller.
            fed = min(fed, reported)
        token_ids = tuple(_token_id(t) for t in tokens) if len(tokens) == len(token_lps) \
            else (-1,) * len(token_lps)
        known = self.tokenizer is not None and bool(token_ids) and min(token_ids) >= 0
        if known and self.prompt_format == "token_ids":
            # The step is what its tokens read after the prompt (as HFBackend decodes it,
            # every character of the token that completes the delimiter included), and
            # those very ids go back to the server next time (the shared rule).
            kept = list(token_ids[:-1] if stop_reason == "eos" else token_ids)
            text = decode_after(self.tokenizer, sent[-1] if sent else None, kept)
            piece = step_piece(text, token_ids, stop_reason)
        else:
            spelled = "".join(tokens) if tokens and all(isinstance(t, str) for t in tokens) else ""
            if (stop_reason == "delimiter" and spelled.startswith(text)
                    and self.info.step_delimiter in spelled):
                # The server cut its text at the stop string; its tokens' texts keep every
                # character of the token that completed it, as HFBackend's step does.
                text = spelled
            elif stop_reason == "delimiter" and not text.endswith(self.info.step_delimiter):
                text += self.info.step_delimiter
            # ids unknown (or the server tokenizes text itself): the step is a new piece
            piece = (text, encode(text, False))
        if stop_reason == "delimiter" and self.info.step_delimiter not in text:
            raise BackendError(f"{endpoint}/v1/completions: stopped at the delimiter but the step reads "
                               f"{text!r}", self.info.name)
        with self._lock:
            self._ledger.record(request.request_id, prompt, request.context, [piece], encode)
        return StepOutput(text=text, token_ids=token_ids, logprobs=tuple(float(x) for x in token_lps),
                          entropies=entropies, stop_reason=stop_reason, prefill_tokens=fed,
                          seconds=time.perf_counter() - started)

    async def _score(self, request: ScoreRequest) -> ScoreOutput:
        started = time.perf_counter()
        if not self._supports_echo:
            raise BackendError(f"{self.base_urls[0]}/v1/completions: this server is configured as not "
                               "returning prompt logprobs (supports_echo=False); scoring a step (VerifyGate) "
                               "needs echo=true, as vLLM serves", self.info.name)
        prompt, add_special = self.render_prompt(request.problem)
        encode = self._encoder(add_special)
        with self._lock:
            sent, fed = self._ledger.plan(request.request_id, prompt, request.context, encode)
        if not request.text:
            return ScoreOutput((), (), fed, time.perf_counter() - started)
        prefix = prompt + request.context
        text_ids = self._encode(request.text, False) if self.tokenizer is not None else None
        if self.prompt_format == "token_ids":
            body_prompt: Any = sent + text_ids
        else:
            body_prompt = prefix + request.text
        # max_tokens=1, not 0: some servers read 0 as "no limit". The generated token is
        # dropped (it also gives the greedy token after a text agreed throughout).
        body = {"model": self.model, "prompt": body_prompt, "max_tokens": 1, "echo": True,
                "logprobs": 1, "temperature": 0.0}
        if self._vllm_extensions:
            body["return_tokens_as_token_ids"] = True
        data, endpoint = await self._post(body)
        choice = _first_choice(data, endpoint, self.info.name)
        logprobs = choice.get("logprobs") or {}
        token_lps = logprobs.get("token_logprobs")
        where = f"{endpoint}/v1/completions"
        no_echo = (f"{where} did not return the prompt's logprobs (echo=true); scoring a step "
                   "(VerifyGate) needs a server that does, e.g. vLLM")
        if not isinstance(token_lps, list) or not token_lps:
            raise BackendError(no_echo, self.info.name)
        tokens = logprobs.get("tokens") or []
        generated = _completion_tokens(data)
        if generated is None or generated > 1:
            raise BackendError(f"{where} generated "
                               f"{generated if generated is not None else 'an unknown number of'} "
                               "tokens for a score request with max_tokens=1 (usage.completion_tokens): its "
                               "echoed logprobs cannot be told apart from the prompt's; refusing to score",
                               self.info.name)
        prompt_entries = len(token_lps) - generated
        if self.prompt_format == "token_ids":
            n = len(text_ids)
            if prompt_entries != len(body_prompt):
                raise BackendError(f"{where} echoed {prompt_entries} prompt logprobs for a prompt of "
                                   f"{len(body_prompt)} tokens; refusing to score with them", self.info.name)
            first = prompt_entries - n
            ids = tuple(text_ids)
        else:
            first = self._scored_start(logprobs, tokens, prompt_entries, request.text, where)
            ids = tuple(text_ids) if text_ids is not None else (-1,) * (prompt_entries - first)
            if self.tokenizer is not None and len(ids) != prompt_entries - first:
                raise BackendError(f"{where} tokenized the scored text into {prompt_entries - first} tokens, "
                                   f"the local tokenizer into {len(ids)}: the server and the tokenizer given "
                                   "disagree; refusing to score", self.info.name)
        scored = token_lps[first:prompt_entries]
        if not scored or any(lp is None or not math.isfinite(lp) for lp in scored):
            raise BackendError(no_echo + " (null or non-finite logprobs for the scored text)", self.info.name)
        if endpoint not in self._echo_checked:
            if generated:
                await self._check_echo(body, endpoint, token_lps[-1], tokens[-1] if tokens else None)
            elif self.prompt_format == "text":
                # The check needs a generated token; with text prompts nothing else shows a
                # shifted echo, so an unchecked server's scores are not taken.
                raise BackendError(f"{where}: cannot check this server's echoed logprobs yet (the model "
                                   "ended the scored text with EOS, so no token was generated to compare); "
                                   "refusing to score with unchecked logprobs", self.info.name)
        prefix_text, prefix_tokens = None, 0
        top = logprobs.get("top_logprobs")
        if (text_ids is not None and self._vllm_extensions and isinstance(top, list)
                and len(top) == len(token_lps)):
            after = _token_id(tokens[-1]) if generated and len(tokens) == len(token_lps) else None
            prefix_text, prefix_tokens = self._greedy_prefix(text_ids, top[first:prompt_entries], after,
                                                             body_prompt[first - 1], request.text)
        with self._lock:
            self._ledger.record(request.request_id, prompt, request.context,
                                [(request.text, text_ids if text_ids is not None else [-1] * len(ids))],
                                encode)
        return ScoreOutput(ids, tuple(float(x) for x in scored), fed, time.perf_counter() - started,
                           prefix_text, prefix_tokens)

    def _scored_start(self, logprobs: dict, tokens: list, prompt_entries: int, text: str, where: str) -> int:
        """With a text prompt: the first echoed entry of the scored text. The token texts
        from there to the end of the prompt must spell the text exactly (so none of them
        crosses into the context, and none is a generated token); else a BackendError."""
        if len(tokens) < prompt_entries or not all(isinstance(t, str) for t in tokens[:prompt_entries]):
            raise BackendError(f"{where} returned no token texts with its echoed logprobs; cannot find "
                               "the scored text among them", self.info.name)
        spelled = ""
        first = prompt_entries
        while first > 0 and len(spelled) < len(text):
            first -= 1
            spelled = tokens[first] + spelled
        if spelled != text:
            raise BackendError(f"{where}: the echoed tokens ending the prompt read {spelled!r}, "
                               "not the scored "
                               f"text {text!r} (a token crosses from the context into it, "
                               "or the echo does not "
                               "line up with the prompt); refusing to score", self.info.name)
        return first

    async def _check_echo(self, body: dict, endpoint: str, echoed: float | None, echoed_token: Any) -> None:
        """Once per endpoint: the echoed log-probability of the generated token must be the
        one a plain completion of the same prompt reports (a shifted echo fails this)."""
        plain = dict(body, echo=False)
        data, _ = await self._post(plain, endpoint=endpoint)
        choice = _first_choice(data, endpoint, self.info.name)
        lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if not lps or lps[0] is None or echoed is None:
            return  # nothing to compare (EOS): check on a later score
        same_token = not tokens or echoed_token is None or tokens[0] == echoed_token
        if not same_token or abs(float(lps[0]) - float(echoed)) > _ECHO_CHECK_TOLERANCE:
            raise BackendError(
                f"{endpoint}/v1/completions echoes wrong prompt logprobs: with echo=true the generated token "
                f"{echoed_token!r} has logprob {echoed}, without echo {tokens[0] if tokens else '?'!r} has "
                f"{lps[0]} (off by more than {_ECHO_CHECK_TOLERANCE}); its scores would be wrong, so scoring "
                "(VerifyGate) is refused on this server", self.info.name)
        self._echo_checked.add(endpoint)

    def _greedy_prefix(self, text_ids: list[int], top: list, after: int | None, anchor: int, text: str
                       ) -> tuple[str | None, int]:
        """`ScoreOutput.greedy_prefix` from the top-1 alternatives the server returned at the
        scored positions (`top`, token-id keys) and the greedy token it generated after the
        text (`after`); (None, 0) when they are malformed."""
        agreed, next_token = 0, None
        for token, alternatives in zip(text_ids, top, strict=False):
            if not isinstance(alternatives, dict) or not alternatives:
                return None, 0
            best = max(alternatives.items(), key=lambda item: item[1] if isinstance(item[1], (int, float))
                       else -math.inf)
            if _token_id(best[0]) == token or alternatives.get(f"token_id:{token}") == best[1]:
                agreed += 1  # the model's own greedy choice (a tie counts as agreeing)
                continue
            next_token = _token_id(best[0])
            if next_token < 0:
                return None, 0
            break
        else:
            next_token = after if after is not None and after >= 0 else None
        return greedy_prefix(text_ids, agreed, next_token, text=text, delimiter=self.info.step_delimiter,
                             decode=functools.partial(decode_after, self.tokenizer, anchor),
                             eos_ids={self.tokenizer.eos_token_id})

    # ---- the protocol: next_steps/score_steps and their async twins come from OwnLoopBatches


# ---- helpers -------------------------------------------------------------------------------


def _load_tokenizer(tokenizer: Any):
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as error:
        message = f"could not load tokenizer {str(tokenizer)!r}: {error}".split("\n")[0]
        raise ModelLoadError(message) from error


def _request_seed(seed: int, problem: str, context: str) -> int:
    import zlib

    return zlib.crc32(f"{seed}\x00{problem}\x00{context}".encode())


def _error_message(response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(data)[:300]


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _first_choice(data: Any, endpoint: str, backend: str) -> dict:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError(f"{endpoint}/v1/completions: malformed response (no choices)", backend)
    return choices[0]


def _stop_kind(choice: dict, delimiter: str, tokens: list) -> str:
    """finish_reason "stop" covers both the stop string and EOS; vLLM says which in
    `stop_reason` (the matched string, or None/a token id for EOS), SGLang in
    `matched_stop`. A server that says neither (llama-cpp-python) stopped at the
    delimiter when its tokens' texts contain it, else at EOS; with no token texts either,
    it is taken to have stopped at the delimiter."""
    for key in ("stop_reason", "matched_stop"):
        if key in choice:
            return "delimiter" if choice[key] == delimiter else "eos"
    if tokens and all(isinstance(t, str) and not t.startswith("token_id:") for t in tokens):
        return "delimiter" if delimiter in "".join(tokens) else "eos"
    return "delimiter"


def _completion_tokens(data: Any) -> int | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def _prompt_tokens(data: Any) -> int | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    value = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def _token_id(token: Any) -> int:
    """vLLM with return_tokens_as_token_ids writes tokens as "token_id:123"."""
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.split(":", 1)[1])
        except ValueError:
            return -1
    return -1
