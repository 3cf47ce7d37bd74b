"""The Backend protocol's four batch methods for backends whose per-request work is a
coroutine run on an event loop of their own, in a thread (OpenAIBackend, VLLMBackend):
sync and async callers then share one loop, so limits and engine state are never touched
from two loops. This module knows nothing about HTTP or engines."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from decoding.types import Backend, ScoreOutput, ScoreRequest, StepOutput, StepRequest

__all__ = ["OwnLoopBatches"]


class OwnLoopBatches(Backend):
    """Base: a subclass provides `_submit(coroutine) -> concurrent.futures.Future` (run it
    on its own loop) and the per-request coroutines `_next_step` and `_score`."""

    native_async = True  # its coroutines run on its own loop: several batches may be in flight

    def _submit(self, coroutine) -> concurrent.futures.Future:
        raise NotImplementedError

    def _check_open(self) -> None:
        """Raise when the backend can no longer run calls (checked before any coroutine
        is made, so a refused call leaves none un-awaited)."""

    async def _next_step(self, request: StepRequest) -> StepOutput:
        raise NotImplementedError

    async def _score(self, request: ScoreRequest) -> ScoreOutput:
        raise NotImplementedError

    @staticmethod
    async def _gather(coroutines):
        return await asyncio.gather(*coroutines)

    async def anext_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        self._check_open()
        future = self._submit(self._gather([self._next_step(r) for r in requests]))
        return list(await asyncio.wrap_future(future))

    async def ascore_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        self._check_open()
        future = self._submit(self._gather([self._score(r) for r in requests]))
        return list(await asyncio.wrap_future(future))

    def next_steps(self, requests: Sequence[StepRequest]) -> list[StepOutput]:
        self._check_open()
        return list(self._submit(self._gather([self._next_step(r) for r in requests])).result())

    def score_steps(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutput]:
        self._check_open()
        return list(self._submit(self._gather([self._score(r) for r in requests])).result())
