"""vLLM for real, in ONE module so each engine starts once per test session:
`VLLMBackend` (an in-process AsyncLLM) on the embedded small model, and
`OpenAIBackend` against a real `python -m vllm.entrypoints.openai.api_server` of the
embedded large model on 127.0.0.1; both checked against `HFBackend`, then a whole
cascade over the two checked against the same cascade on HFBackend.

Tolerance on log-probabilities: 1e-3 absolute. Both engines run the same fp32 weights;
they differ only in kernels (vLLM's CPU attention and fused ops vs PyTorch SDPA), which
reorders fp32 sums: a relative error of ~1e-6 per logit, logits of magnitude <= ~30,
so differences of ~1e-5 (1e-6 to 1e-5 measured). 1e-3 leaves two orders of margin and
still catches any real fault (an off-by-one position or a wrong token moves a
log-probability by whole nats). Greedy tokens must be identical.

vllm is an optional extra. Without it this module is skipped with the reason printed;
`.ci/run` installs the extra and sets STEPCASCADE_REQUIRE_VLLM=1, which turns a missing
or broken vllm into a failure instead of a skip.
"""

from __future__ import annotations

import os

# vLLM reads these at import: offline, small KV cache, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import asyncio  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

import cascade  # noqa: E402
from cascade.embedded import EMBEDDED_DELIMITER, embedded_path  # noqa: E402
from decoding import HFBackend, OpenAIBackend, ScoreRequest, StepRequest  # noqa: E402
from tests.fake_openai import free_port  # noqa: E402

try:
    import vllm  # noqa: F401
except Exception as error:  # noqa: BLE001 - any import failure is reported the same way
    if os.environ.get("STEPCASCADE_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"STEPCASCADE_REQUIRE_VLLM=1 but vllm does not import: {error}") from error
    pytest.skip(f"vllm is not installed (pip install -e '.[vllm]', see README): {error}",
                allow_module_level=True)

ATOL = 1e-3
VOCAB = 49  # the embedded tokenizer's size: asking for that many alternatives makes entropies exact
PROBLEMS = ["a=17;b=a+38;c=b-25;?c", "a=42;b=a-17;c=b+a;?c", "a=5;b=a*7;c=b-9;d=c+a;?d", "a=90;b=a-45;?b"]


@pytest.fixture(scope="module")
def large_server():
    """A real vLLM OpenAI-compatible server of the embedded large model (started first:
    it boots while the in-process engine loads)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_path("large")),
         "--served-model-name", "large", "--dtype", "float32", "--max-model-len", "512", "--host",
         "127.0.0.1", "--port", str(port), "--enforce-eager", "--enable-prefix-caching", "--seed", "0",
         "--max-logprobs", str(VOCAB)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    yield process, url
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def small_engine(large_server):
    from decoding import VLLMBackend

    backend = VLLMBackend.from_pretrained(embedded_path("small"), step_delimiter=EMBEDDED_DELIMITER,
                                          name="embedded:small", max_model_len=512, top_logprobs=VOCAB,
                                          enforce_eager=True)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def large_remote(large_server):
    process, url = large_server
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError("vLLM server exited:\n" + process.stdout.read().decode()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM server did not become healthy in 600 s")
        time.sleep(1)
    backend = OpenAIBackend.from_model_dir(embedded_path("large"), url, "large", name="embedded:large",
                                           step_delimiter=EMBEDDED_DELIMITER, top_logprobs=VOCAB,
                                           vllm_extensions=True, timeout=120)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf():
    return {tier: HFBackend.from_pretrained(embedded_path(tier), step_delimiter=EMBEDDED_DELIMITER,
                                            name=f"embedded:{tier}") for tier in ("small", "large")}


def _chain(backend, tag: str, steps: int = 3):
    """Greedy steps for every problem, as one batch per round (the engines batch them)."""
    contexts = {p: "" for p in PROBLEMS}
    rounds = []
    for _ in range(steps):
        outs = backend.next_steps([StepRequest(f"{tag}{i}", p, contexts[p], 24)
                                   for i, p in enumerate(PROBLEMS)])
        for p, out in zip(PROBLEMS, outs, strict=False):
            contexts[p] += out.text
        rounds.append(outs)
    return rounds


def _agree(ours, theirs, check_ids: bool = True) -> None:
    assert ours.text == theirs.text
    assert ours.stop_reason == theirs.stop_reason
    if check_ids:
        assert ours.token_ids == theirs.token_ids
    assert ours.prefill_tokens == theirs.prefill_tokens
    assert ours.logprobs == pytest.approx(theirs.logprobs, abs=ATOL)
    # alternatives over the whole (49-token) vocabulary: the entropy estimate is exact
    assert ours.entropies == pytest.approx(theirs.entropies, abs=ATOL)


def test_in_process_engine_agrees_with_hf(small_engine, hf):
    assert small_engine.info.entropy == "exact"  # top_logprobs covers the vocabulary
    for ours, theirs in zip(_chain(small_engine, "v"), _chain(hf["small"], "h"), strict=False):
        for a, b in zip(ours, theirs, strict=False):
            _agree(a, b)
    cut = small_engine.next_steps([StepRequest("cut", PROBLEMS[0], "", 3)])[0]
    assert cut.stop_reason == "max_tokens" and cut.generated_tokens == 3


def test_in_process_engine_scores_like_hf(small_engine, hf):
    text = "b=17+38=55\n"
    for backend in (small_engine, hf["small"]):
        backend.release("s")
    ours = small_engine.score_steps([ScoreRequest("s", PROBLEMS[0], "", text)])[0]
    theirs = hf["small"].score_steps([ScoreRequest("s", PROBLEMS[0], "", text)])[0]
    assert ours.token_ids == theirs.token_ids and ours.prefill_tokens == theirs.prefill_tokens
    assert ours.logprobs == pytest.approx(theirs.logprobs, abs=ATOL)
    # the async twin, from an event loop of the caller's own
    again = asyncio.run(small_engine.ascore_steps([ScoreRequest("s2", PROBLEMS[0], "", text)]))[0]
    assert again.logprobs == pytest.approx(theirs.logprobs, abs=ATOL)


def test_openai_backend_on_a_real_vllm_server_agrees_with_hf(large_remote, hf):
    for ours, theirs in zip(_chain(large_remote, "o"), _chain(hf["large"], "h"), strict=False):
        for a, b in zip(ours, theirs, strict=False):
            _agree(a, b)
    text = "c=55-25=30\n"
    ours = large_remote.score_steps([ScoreRequest("o0", PROBLEMS[0], "b=17+38=55\n", text)])[0]
    hf["large"].release("x")
    hf["large"].next_steps([StepRequest("x", PROBLEMS[0], "", 24)])
    theirs = hf["large"].score_steps([ScoreRequest("x", PROBLEMS[0], "b=17+38=55\n", text)])[0]
    assert ours.token_ids == theirs.token_ids
    assert ours.logprobs == pytest.approx(theirs.logprobs, abs=ATOL)


def test_a_cascade_over_vllm_matches_the_cascade_over_hf(small_engine, large_remote, hf):
    options = cascade.SolveOptions(max_steps=cascade.EMBEDDED_MAX_STEPS,
                                   max_step_tokens=cascade.EMBEDDED_MAX_STEP_TOKENS)
    gate = cascade.ConfidenceGate(threshold=0.001)  # escalate often: both tiers write steps
    served = cascade.Cascade(models=[small_engine, large_remote], gate=gate, options=options)
    local = cascade.Cascade(models=[hf["small"], hf["large"]], gate=gate, options=options)
    ours = served.solve_many(PROBLEMS, budget=400, concurrency=4)
    theirs = local.solve_many(PROBLEMS, budget=400, concurrency=4)
    assert any(step.tier == 1 for result in ours for step in result.steps)
    for a, b in zip(ours, theirs, strict=False):
        assert [(s.text, s.author) for s in a.steps] == [(s.text, s.author) for s in b.steps]
        assert a.answer == b.answer and a.stop_reason == b.stop_reason
        assert a.cost.total == pytest.approx(b.cost.total, rel=1e-9)  # token counts agree exactly
    # the same through the async entry point (anext_steps / ascore_steps)
    one = asyncio.run(served.asolve(PROBLEMS[0], budget=400))
    assert [(s.text, s.author) for s in one.steps] == [(s.text, s.author) for s in theirs[0].steps]


def _other_digit(c: str) -> str:
    return "8" if c == "9" else "9"


def test_greedy_prefix_of_a_score_matches_hf(small_engine, large_remote, hf):
    """ScoreOutput.greedy_prefix (VerifyGate(rewrite="token")) from vLLM's prompt logprobs
    (in process) and from a vLLM server's echo top-1 alternatives is HFBackend's, draft by
    draft (the server's score generates one token, max_tokens=1, which shows the greedy
    token after a text it agrees with throughout, delimiter or not)."""
    context = "b=17+38=55\n"
    for backend, reference in ((small_engine, hf["small"]), (large_remote, hf["large"])):
        own = reference.next_steps([StepRequest("own", PROBLEMS[0], context, 24)])[0]
        reference.release("own")
        drafts = [own.text, own.text[:2] + _other_digit(own.text[2]) + own.text[3:],
                  own.text[:-2] + _other_digit(own.text[-2]) + "\n", "c=1\n", own.text[:3]]
        shapes = set()
        for k, draft in enumerate(drafts):
            ours = backend.score_steps([ScoreRequest(f"gp{k}", PROBLEMS[0], context, draft)])[0]
            theirs = reference.score_steps([ScoreRequest(f"gp{k}", PROBLEMS[0], context, draft)])[0]
            backend.release(f"gp{k}")
            reference.release(f"gp{k}")
            assert theirs.greedy_prefix, draft
            assert (ours.greedy_prefix, ours.greedy_prefix_tokens) == \
                (theirs.greedy_prefix, theirs.greedy_prefix_tokens), (backend.info.name, draft)
            shapes.add(ours.greedy_prefix == draft)
        assert shapes == {True, False}  # both the whole draft and a correction were seen


def test_token_rewrite_over_vllm_matches_hf(small_engine, large_remote, hf):
    """The fastest gate of issue 6 (verify, token rewrite) over vLLM backends writes the same
    steps, with the same decisions and costs, as over HFBackend."""
    options = cascade.SolveOptions(max_steps=cascade.EMBEDDED_MAX_STEPS,
                                   max_step_tokens=cascade.EMBEDDED_MAX_STEP_TOKENS)
    gate = cascade.VerifyGate(threshold=0.6, rewrite="token")
    served = cascade.Cascade(models=[small_engine, large_remote], gate=gate, options=options)
    local = cascade.Cascade(models=[hf["small"], hf["large"]], gate=gate, options=options)
    ours = served.solve_many(PROBLEMS, budget=400, concurrency=2)
    theirs = local.solve_many(PROBLEMS, budget=400, concurrency=2)
    for a, b in zip(ours, theirs, strict=False):
        assert [(s.text, s.author, len(s.decisions)) for s in a.steps] == \
            [(s.text, s.author, len(s.decisions)) for s in b.steps]
        assert a.answer == b.answer
        assert a.cost.total == pytest.approx(b.cost.total, rel=1e-9)
    assert any(len(s.decisions) > 1 for r in ours for s in r.steps)  # a correction was drafted on


def test_cascade_serve_app_over_vllm_backends(small_engine, large_remote, hf):
    """The server's app over the vLLM-backed cascade (in process, ASGI transport): the
    async backends are awaited on the server's loop and the answer matches HFBackend's."""
    from app.server import ServerConfig, create_app

    options = cascade.SolveOptions(max_steps=cascade.EMBEDDED_MAX_STEPS,
                                   max_step_tokens=cascade.EMBEDDED_MAX_STEP_TOKENS)
    gate = cascade.ConfidenceGate(threshold=0.001)
    served = cascade.Cascade(models=[small_engine, large_remote], gate=gate, options=options)
    expected = cascade.Cascade(models=[hf["small"], hf["large"]], gate=gate, options=options).solve(
        PROBLEMS[1], budget=400)
    app = create_app(served, ServerConfig())

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            response = await client.post("/v1/completions", timeout=120,
                                         json={"model": "stepcascade", "prompt": PROBLEMS[1], "budget": 400})
            return response.status_code, response.json()

    status, body = asyncio.run(ask())
    assert status == 200, body
    assert body["cascade"]["authors"] == [s.author for s in expected.steps]
    assert body["choices"][0]["text"] == "\n".join(s.text for s in expected.steps)
    assert body["cascade"]["cost"] == pytest.approx(expected.cost.total, rel=1e-9)
