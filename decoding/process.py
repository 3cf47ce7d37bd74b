"""An `HFBackend` in a process of its own.

Small models on a CPU (and any model driven by many short kernel launches) spend most
of a decode step in Python: module calls, cache bookkeeping, the per-token loop. Two
tiers in one process then take turns on one GIL, and a second core or GPU sits idle.
`ProcessBackend` runs the model in a child process (spawned, so nothing is inherited but
its arguments): the child batches the calls that queue up while its model is busy, and
the parent keeps only a tokenizer and a `PrefixLedger`, so `prefill_bound` (asked before
every call, for the hard cap) is answered locally with the same rule the child's KV
cache follows, never by a round trip.

Calls travel as pickled `StepRequest`/`ScoreRequest`s over a socket; outputs come back
as each batch ends, and the parent's async methods keep several batches in flight. A
call that fails in the child fails in the parent as a `BackendError` naming the model; a
child that dies fails every call in flight and every later one. This module knows
nothing about gates or budgets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from decoding.hf import check_model_path
from decoding.prompting import PrefixLedger, piece_encoder, render_prompt, step_piece
from decoding.types import (
    Backend,
    BackendError,
    ModelInfo,
    ModelLoadError,
    ScoreOutput,
    ScoreRequest,
    StepOutput,
    StepRequest,
)

__all__ = ["ProcessBackend"]


class ProcessBackend(Backend):
    """`HFBackend.from_pretrained(model, **kwargs)` run in a child process.

    threads: torch intra-op threads in the child. start_timeout: seconds to wait for the
    model to load. Use as a context manager or call `close()`; the child also ends when
    this process does (its socket closes).
    """

    native_async = True  # calls go over a pipe: several batches may be in flight
    supports_fork = True

    def __init__(self, model: str | Path, *, threads: int = 1, start_timeout: float = 300.0,
                 **kwargs) -> None:
        from transformers import AutoTokenizer

        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        check_model_path(str(model), kwargs.get("gguf_file"))  # before paying for a process
        self.prompt_template = kwargs.get("prompt_template")
        # A fresh interpreter (`python -m decoding._process_child FD`), not multiprocessing's spawn:
        # that re-imports the caller's main module, which breaks scripts without a
        # `__main__` guard. The socket carries pickled messages both ways.
        parent_end, child_end = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "decoding._process_child", str(child_end.fileno())]
        self._process = subprocess.Popen(command, pass_fds=[child_end.fileno()], env=env)
        child_end.close()
        self._conn = Connection(parent_end.detach())
        self._conn.send((str(model), kwargs, threads))
        if not self._conn.poll(start_timeout):
            self._process.kill()
            raise ModelLoadError(f"model {str(model)!r} did not load within {start_timeout:g} s "
                                 "in its process")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            raise ModelLoadError(f"the process loading {str(model)!r} exited "
                                 f"(exit code {self._process.wait()})") from None
        if kind != "ready":
            self._process.wait(10)
            raise ModelLoadError(payload)
        self.info: ModelInfo = payload
        gguf = kwargs.get("gguf_file")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model), **({"gguf_file": gguf} if gguf else {}))
        self._ledger = PrefixLedger()
        self._lock = threading.Lock()  # the ledger, the table of calls and the pipe's send end
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._dead: str | None = None  # why no call can succeed any more
        self._reader = threading.Thread(target=self._read, name=f"{self.info.name}-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> ProcessBackend:
        """Same arguments as `HFBackend.from_pretrained`, plus `threads` and `start_timeout`."""
        return cls(name_or_path, **kwargs)

    # ---- prompt accounting, in the parent ---------------------------------------------------

    def render_prompt(self, problem: str) -> tuple[str, bool]:
        return render_prompt(problem, tokenizer=self.tokenizer, step_delimiter=self.info.step_delimiter,
                             prompt_template=self.prompt_template)

    def _encoder(self, add_special: bool):
        """`PrefixLedger`'s encoder: the prompt with the specials its rendering asks for."""
        tokenizer = self.tokenizer
        return piece_encoder(lambda text, special: list(tokenizer.encode(text, add_special_tokens=special)),
                             tokenizer, add_special)

    def prefill_bound(self, request_id: str, problem: str, context: str) -> int:
        prompt, add_special = self.render_prompt(problem)
        with self._lock:
            return self._ledger.prefill(request_id, prompt, context, self._encoder(add_special))

    def _settled(self, request: StepRequest | ScoreRequest, future: concurrent.futures.Future) -> None:
        """Runs as each answer arrives (before any caller sees it). After an answer the
        child's cache holds the context and the output, and so does the ledger; after a
        failure the child dropped the request's cache, and the ledger forgets it too."""
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                self._ledger.release(request.request_id)
            return
        output = future.result()
        prompt, add_special = self.render_prompt(request.problem)
        if isinstance(output, StepOutput):
            pieces = [step_piece(output.text, output.token_ids, output.stop_reason)]
        else:
            pieces = [(request.text, list(output.token_ids))] if output.token_ids else []
        with self._lock:
            self._ledger.record(request.request_id, prompt, request.context, pieces,
                                self._encoder(add_special))

    # ---- the protocol -------------------------------------------------------------------------

    def _send_calls(self, kind: str, requests: Sequence) -> list[concurrent.futures.Future]:
        futures = []
        with self._lock:
            if self._dead is not None:
                raise BackendError(self._dead, self.info.name)
            for request in requests:
                call = next(self._ids)
                future: concurrent.futures.Future = concurrent.futures.Future()
                future.add_done_callback(functools.partial(self._settled, request))
                self._calls[call] = future
                futures.append(future)
                try:
                    self._conn.send((kind, call, request))
                except (OSError, ValueError) as error:  # the child is gone: the reader fails the rest
                    self._calls.pop(call, None)
                    raise BackendError(f"the model's process is unreachable ({error})",
                                       self.info.name) from None
        return futures

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        return [future.result() for future in self._send_calls("step", requests)]

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        return [future.result() for future in self._send_calls("score", requests)]

    async def anext_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        return list(await asyncio.gather(*map(asyncio.wrap_future, self._send_calls("step", requests))))

    async def ascore_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        return list(await asyncio.gather(*map(asyncio.wrap_future, self._send_calls("score", requests))))

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ledger.release(request_id)
            if self._dead is None:
                try:
                    self._conn.send(("release", request_id))
                except (OSError, ValueError):
                    pass  # a dead child holds no state to free

    def fork(self, source_id: str, target_id: str) -> None:
        with self._lock:
            if self._dead is not None:
                raise BackendError(self._dead, self.info.name)
            self._ledger.fork(source_id, target_id)
            try:
                self._conn.send(("fork", (source_id, target_id)))
            except (OSError, ValueError) as error:
                raise BackendError(f"the model's process is unreachable ({error})", self.info.name) from None

    def close(self) -> None:
        """Stop the child (waits up to 10 s for it to exit, then kills it)."""
        with self._lock:
            if self._dead is None:
                self._dead = "the backend was closed"
                try:
                    self._conn.send(("stop", None))
                except (OSError, ValueError):
                    pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> None:
        """The parent's reader thread: settle each call's future as its answer arrives."""
        while True:
            try:
                kind, call, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._calls.pop(call, None)
            if future is None:
                continue
            if kind == "ok":
                future.set_result(payload)
            else:
                future.set_exception(BackendError(payload, self.info.name))
        try:  # outside the lock: a caller meanwhile gets its answer from the closed socket
            code = self._process.wait(1)
        except subprocess.TimeoutExpired:
            code = "unknown: still running, its socket closed"
        with self._lock:
            if self._dead is None:
                self._dead = f"the model's process exited (exit code {code})"
            calls, self._calls = list(self._calls.values()), {}
            reason = self._dead
        for future in calls:
            future.set_exception(BackendError(reason, self.info.name))
