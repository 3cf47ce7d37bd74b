"""ProcessBackend: an HFBackend in a child process gives what the in-process one gives,
its ledger predicts the child's prefill exactly, and failures are clean errors."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from cascade import Cascade, ConfidenceGate, SolveOptions
from decoding import (
    Backend,
    BackendError,
    HFBackend,
    ModelLoadError,
    ProcessBackend,
    ScoreRequest,
    StepRequest,
)

PROBLEM = "a=12;b=a+3;?b"


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    local = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    with ProcessBackend(tiny_dirs[0], step_delimiter="\n") as remote:
        yield local, remote


def _steps(backend, contexts, request_id, max_tokens=12):
    return backend.next_steps([StepRequest(f"{request_id}{k}", PROBLEM, c, max_tokens)
                               for k, c in enumerate(contexts)])


def test_same_outputs_and_prefill_as_in_process(pair):
    local, remote = pair
    assert isinstance(remote, Backend)
    assert remote.info == local.info
    context = ""
    for k in range(4):  # accepted steps and rejected drafts (the cache must crop back)
        bound = remote.prefill_bound("p0", PROBLEM, context)
        assert bound == local.prefill_bound("p0", PROBLEM, context)
        a, b = _steps(local, [context], "p")[0], _steps(remote, [context], "p")[0]
        assert (a.text, a.token_ids, a.stop_reason, a.prefill_tokens) == \
               (b.text, b.token_ids, b.stop_reason, b.prefill_tokens)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=False)) < 1e-5
        assert b.prefill_tokens == bound  # the parent's ledger saw what the child's cache did
        context += a.text if k % 2 == 0 else "9\n"
    score = ScoreRequest("p0", PROBLEM, context, "b=15\n")
    (sa,), (sb,) = local.score_steps([score]), remote.score_steps([score])
    assert sa.token_ids == sb.token_ids and sa.prefill_tokens == sb.prefill_tokens
    assert max(abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs, strict=False)) < 1e-5


def test_batches_fork_and_async(pair):
    local, remote = pair
    contexts = ["", "b=1\n", "b=15\n"]
    assert [o.token_ids for o in _steps(remote, contexts, "batch")] == \
           [o.token_ids for o in _steps(local, contexts, "batch")]
    for backend in (local, remote):
        backend.fork("batch1", "branch")
    bound = remote.prefill_bound("branch", PROBLEM, "b=1\n" + "x")
    assert bound == local.prefill_bound("branch", PROBLEM, "b=1\n" + "x")
    branch = remote.next_steps([StepRequest("branch", PROBLEM, "b=1\nx", 12)])[0]
    assert branch.prefill_tokens == bound

    async def both():
        return await asyncio.gather(remote.anext_steps([StepRequest("as0", PROBLEM, "", 6)]),
                                    remote.ascore_steps([ScoreRequest("as1", PROBLEM, "", "b=15\n")]))
    steps, scores = asyncio.run(both())
    assert steps[0].token_ids == _steps(local, [""], "as", 6)[0].token_ids
    assert scores[0].token_ids
    remote.release("branch")
    assert remote.prefill_bound("branch", PROBLEM, "") == local.prefill_bound("never-seen", PROBLEM, "")


def test_cascade_on_a_process_backend_gives_the_same_traces(tiny_dirs, pair):
    local_small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    local_large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    gate = ConfidenceGate(threshold=0.5, mode="speculate")
    options = SolveOptions(max_steps=10, max_step_tokens=12)
    problems = [f"a={k};b=a+{k + 1};?b" for k in range(6)]
    with ProcessBackend(tiny_dirs[2], step_delimiter="\n") as remote_large:
        for budget in (None, 40.0):
            expected = [Cascade(small=local_small, large=local_large, gate=gate,
                                options=options).solve(p, budget) for p in problems]
            got = Cascade(small=local_small, large=remote_large, gate=gate,
                          options=options).solve_many(problems, budget, concurrency=3)
            for e, g in zip(expected, got, strict=False):
                assert [(s.text, s.author) for s in e.steps] == [(s.text, s.author) for s in g.steps]
                assert e.cost.total == pytest.approx(g.cost.total)
                assert budget is None or g.cost.total <= budget + 1e-9
            assert any(s.author == "large" for r in got for s in r.steps)  # the child did write steps


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        ProcessBackend(tmp_path / "missing")


def test_bad_request_fails_that_call_only(pair):
    _, remote = pair
    with pytest.raises(BackendError, match="max_tokens must be >= 1"):
        remote.next_steps([StepRequest("bad", PROBLEM, "", 0)])
    assert _steps(remote, [""], "after-bad")[0].token_ids  # the child is still serving


def test_dead_child_fails_calls_instead_of_hanging(tiny_dirs):
    remote = ProcessBackend(tiny_dirs[0], step_delimiter="\n")
    assert _steps(remote, [""], "x")[0].token_ids
    os.kill(remote._process.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(BackendError, match="process exited"):
        for _ in range(50):  # the reader notices the closed socket within a moment
            _steps(remote, [""], "y")
            time.sleep(0.05)
    # Slow, not hung: a call that blocked on the dead child would never return, so this bound
    # only has to separate "noticed" from "waited on something"; 60 s holds on a busy machine.
    assert time.monotonic() - started < 60
    remote.close()
