"""OpenAIBackend against a local fake OpenAI-compatible server that fails on purpose
(tests/fake_openai.py): request bodies, prefill accounting, retries, backoff, timeouts,
round robin, limits, clear errors. The real-vLLM round trip is in test_vllm.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from cascade.embedded import EMBEDDED_DELIMITER, embedded_path
from decoding import BackendError, HFBackend, OpenAIBackend, ScoreRequest, StepRequest
from decoding.openai_backend import count_parameters
from tests.fake_openai import FakeState, free_port, running_fake

PROBLEM = "a=17;b=a+38;?b"


@pytest.fixture(scope="module")
def small_hf():
    return HFBackend.from_pretrained(embedded_path("small"), step_delimiter=EMBEDDED_DELIMITER)


def backend(urls, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("backoff", 0.01)
    return OpenAIBackend.from_model_dir(embedded_path("small"), urls, "small",
                                        step_delimiter=EMBEDDED_DELIMITER, **kwargs)


def step(request_id="r", context="", max_tokens=24) -> StepRequest:
    return StepRequest(request_id, PROBLEM, context, max_tokens)


def test_step_round_trip_sends_hf_token_ids_and_puts_the_delimiter_back(small_hf):
    with running_fake() as (url, state):
        b = backend(url)
        out = b.next_steps([step()])[0]
        body = state.bodies[-1]
        prompt, add_special = small_hf.render_prompt(PROBLEM)
        assert body["prompt"] == small_hf._encode(prompt, add_special)
        assert body["stop"] == [EMBEDDED_DELIMITER] and body["model"] == "small" and body["logprobs"] == 1
        assert out.text == "x=1\n" and out.stop_reason == "delimiter"
        assert len(out.logprobs) == len(out.entropies) == out.generated_tokens == 4
        # entropy of {p=e^-0.05, q=e^-3, rest}: a positive lower bound, below log(3)
        assert 0 < out.entropies[0] < 1.0986
        assert out.prefill_tokens == len(small_hf._encode(prompt, add_special))
        # the next step sends the whole prompt again but only its new tokens count as prefill
        out2 = b.next_steps([step(context=out.text)])[0]
        assert state.bodies[-1]["prompt"] == small_hf._encode(prompt, add_special) + small_hf._encode("x=1\n")
        assert out2.prefill_tokens == 0
        cut = b.next_steps([step(context="x=", max_tokens=2)])[0]
        assert cut.stop_reason == "max_tokens" and cut.text == "x=" and cut.generated_tokens == 2
        b.close()


def test_prefill_accounting_matches_hf_kv_cache(small_hf):
    """The ledger counts with HFBackend's crop rule: same calls, same prefill counts."""
    with running_fake() as (url, _):
        b = backend(url)
        calls = [("", "b=55\n"), ("b=55\n", "c=1\n"), ("b=9\n", "c=2\n"), ("b=9\nc=2\n", "#### 2\n")]
        for request_id in ("r1", "r2"):
            for context, text in calls:
                assert b.prefill_bound(request_id, PROBLEM, context) == \
                    small_hf.prefill_bound(request_id, PROBLEM, context), (context, text)
                ours = b.score_steps([ScoreRequest(request_id, PROBLEM, context, text)])[0]
                theirs = small_hf.score_steps([ScoreRequest(request_id, PROBLEM, context, text)])[0]
                assert ours.prefill_tokens == theirs.prefill_tokens
                assert ours.token_ids == theirs.token_ids
                assert ours.scored_tokens == len(text)
            b.release(request_id)
            small_hf.release(request_id)
        b.close()


def test_retries_on_429_and_5xx_with_backoff():
    with running_fake(FakeState(plan=["429", "500", "503"])) as (url, state):
        b = backend(url, max_retries=3, backoff=0.1)
        started = time.monotonic()
        out = b.next_steps([step()])[0]
        assert out.text == "x=1\n"
        assert len(state.arrivals) == 4
        gaps = [later - earlier for earlier, later in zip(state.arrivals, state.arrivals[1:], strict=False)]
        assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39  # 0.1 * 2**attempt
        assert time.monotonic() - started >= 0.7
        b.close()


def test_gives_up_with_every_failure_named():
    with running_fake(FakeState(plan=["500"] * 5)) as (url, state):
        b = backend(url, max_retries=2)
        with pytest.raises(BackendError) as info:
            b.next_steps([step()])
        message = str(info.value)
        assert f"{url}/v1/completions" in message and "HTTP 500" in message and "3 attempts" in message
        assert info.value.backend == b.info.name
        assert len(state.arrivals) == 3
        b.close()


def test_client_error_is_not_retried():
    with running_fake(FakeState(plan=["400"])) as (url, state):
        b = backend(url, max_retries=3)
        with pytest.raises(BackendError, match="HTTP 400: injected 400"):
            b.next_steps([step()])
        assert len(state.arrivals) == 1
        b.close()


def test_timeout_is_a_backend_error_naming_the_endpoint():
    stall = 6.0
    with running_fake(FakeState(plan=[f"sleep:{stall}"])) as (url, _):
        b = backend(url, timeout=0.3, max_retries=0)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"timed out after 0.3s") as info:
            b.next_steps([step()])
        assert url in str(info.value)
        # Gave up before the server would have answered: a client that ignored its timeout
        # takes at least `stall`; load on the machine only adds to a correct client's 0.3 s.
        assert time.monotonic() - started < stall
        b.close()


def test_connection_refused_then_failover_to_the_next_url():
    dead = f"http://127.0.0.1:{free_port()}"
    b = backend(dead, max_retries=1)
    with pytest.raises(BackendError, match="connection failed") as info:
        b.next_steps([step()])
    assert dead in str(info.value)
    b.close()
    with running_fake() as (url, state):
        b = backend([dead, url], max_retries=1)
        outs = b.next_steps([step(f"r{i}") for i in range(4)])
        assert all(o.text == "x=1\n" for o in outs)
        assert len(state.arrivals) == 4  # the dead URL's share was retried on the live one
        b.close()


def test_round_robin_spreads_requests_over_base_urls():
    with running_fake() as (url1, state1), running_fake() as (url2, state2):
        b = backend([url1, url2 + "/v1"])
        b.next_steps([step(f"r{i}") for i in range(6)])
        assert len(state1.arrivals) == 3 and len(state2.arrivals) == 3
        b.close()


def test_malformed_responses_are_clear_errors():
    with running_fake(FakeState(plan=["garbage"])) as (url, _):
        b = backend(url)
        with pytest.raises(BackendError, match="malformed JSON"):
            b.next_steps([step()])
        b.close()


def test_scoring_needs_prompt_logprobs():
    with running_fake(FakeState(plan=["noecho"])) as (url, _):
        b = backend(url)
        with pytest.raises(BackendError, match=r"did not return the prompt's logprobs") as info:
            b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])
        assert f"{url}/v1/completions" in str(info.value)
        b.close()
    b = backend("http://127.0.0.1:1", supports_echo=False)
    with pytest.raises(BackendError, match="supports_echo=False"):
        b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])


@pytest.mark.parametrize("prompt_format", ["token_ids", "text"])
def test_scoring_sends_max_tokens_1_and_refuses_a_run_on_echo(prompt_format):
    """max_tokens=0 is "no limit" to llama-cpp-python's server: its continuation came back
    with the echo and was scored as the step's tokens (36 logprobs for an 8-token step)."""
    with running_fake(FakeState(plan=["runon"])) as (url, state):
        b = backend(url, prompt_format=prompt_format, max_retries=0)
        with pytest.raises(BackendError, match="generated 28 tokens for a score request with max_tokens=1"):
            b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])
        assert state.bodies[-1]["max_tokens"] == 1 and state.bodies[-1]["echo"] is True
        scored = b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])[0]
        assert scored.scored_tokens == len("b=55\n")  # the generated token is not among them
        assert scored.logprobs[-1] != -0.05
        b.close()


@pytest.mark.parametrize("prompt_format", ["token_ids", "text"])
def test_a_shifted_echo_is_refused_not_scored(prompt_format):
    with running_fake(FakeState(plan=["shifted"])) as (url, state):
        b = backend(url, prompt_format=prompt_format, max_retries=0)
        with pytest.raises(BackendError, match="echoes wrong prompt logprobs"):
            b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])
        assert [body["echo"] for body in state.bodies] == [True, False]  # the check: one plain completion
        # a correct echo passes the check once per endpoint, then is not checked again
        b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])
        b.score_steps([ScoreRequest("r", PROBLEM, "b=55\n", "c=1\n")])
        assert [body["echo"] for body in state.bodies] == [True, False, True, False, True]
        b.close()


def test_token_prompts_refused_with_500_name_the_text_option():
    with running_fake(FakeState(plan=["500"])) as (url, _):
        b = backend(url, max_retries=0)
        with pytest.raises(BackendError, match="prompt_format='text'"):
            b.score_steps([ScoreRequest("r", PROBLEM, "", "b=55\n")])
        b.close()
    with pytest.raises(ValueError, match="prompt_format='token_ids' needs the model's tokenizer"):
        OpenAIBackend("http://127.0.0.1:1", "m", num_parameters=10, prompt_format="token_ids")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        OpenAIBackend("http://127.0.0.1:1", "m", num_parameters=10, prompt_format="ids")


def test_text_mode_without_tokenizer_uses_offsets_and_a_conservative_bound():
    with running_fake() as (url, state):
        b = OpenAIBackend(url, "m", num_parameters=1000, step_delimiter="\n", backoff=0.01)
        assert b.info.entropy == "top-1"  # estimated from the server's top alternatives
        prompt = PROBLEM + "\n"
        assert b.prefill_bound("r", PROBLEM, "") == len(prompt.encode()) + 16
        out = b.next_steps([step()])[0]
        assert state.bodies[-1]["prompt"] == prompt
        assert out.prefill_tokens == len(prompt)  # the server's usage.prompt_tokens is smaller
        scored = b.score_steps([ScoreRequest("r", PROBLEM, "x=1\n", "y=2\n")])[0]
        assert scored.scored_tokens == 4 and scored.prefill_tokens == 0
        b.close()


def test_per_endpoint_concurrency_limit():
    with running_fake(FakeState(delay=0.25)) as (url, state):
        b = backend(url, max_concurrency=2)
        b.next_steps([step(f"r{i}") for i in range(6)])
        arrivals = sorted(state.arrivals)
        # waves of two: the third request starts only after the first two answered
        assert arrivals[2] - arrivals[0] >= 0.2 and arrivals[4] - arrivals[2] >= 0.2
        b.close()


def test_per_endpoint_rate_limit():
    with running_fake() as (url, state):
        b = backend(url, rate_limit=4.0)
        b.next_steps([step(f"r{i}") for i in range(5)])
        arrivals = sorted(state.arrivals)
        # 4 per second: the fifth request waits until a second after the first
        assert arrivals[4] - arrivals[0] >= 0.95
        b.close()


def test_async_and_sync_calls_share_one_backend():
    with running_fake(FakeState(delay=0.05)) as (url, state):
        b = backend(url)

        async def main():
            first = asyncio.create_task(b.anext_steps([step("a1"), step("a2")]))
            second = await asyncio.to_thread(b.next_steps, [step("s1")])
            return await first, second

        (async_out, sync_out) = asyncio.run(main())
        assert [o.text for o in async_out + sync_out] == ["x=1\n"] * 3
        # a second loop works too: the HTTP runs on the backend's own loop
        assert asyncio.run(b.ascore_steps([ScoreRequest("a1", PROBLEM, "", "x=1\n")]))[0].scored_tokens == 4
        b.close()


def test_api_key_is_sent():
    with running_fake(FakeState(api_key="sekrit")) as (url, _):
        with pytest.raises(BackendError, match="HTTP 401"):
            backend(url).next_steps([step()])
        assert backend(url, api_key="sekrit").next_steps([step()])[0].text == "x=1\n"


def test_model_dir_identity_matches_hf(small_hf):
    b = backend("http://127.0.0.1:1")
    assert b.info.num_parameters == small_hf.info.num_parameters == count_parameters(embedded_path("small"))
    assert b.info.fingerprint == small_hf.info.fingerprint
    assert b.render_prompt(PROBLEM) == small_hf.render_prompt(PROBLEM)


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_urls="localhost:8000"), "base_urls"),
    (dict(base_urls=[]), "base_urls"),
    (dict(model=""), "model"),
    (dict(num_parameters=0), "num_parameters"),
    (dict(timeout=0), "timeout"),
    (dict(max_retries=-1), "max_retries"),
    (dict(max_concurrency=0), "max_concurrency"),
    (dict(rate_limit=-2.0), "rate_limit"),
    (dict(step_delimiter=""), "step_delimiter"),
    (dict(prompt_template="no placeholder"), "prompt_template"),
])
def test_bad_settings_name_the_parameter(kwargs, message):
    settings = dict(base_urls="http://127.0.0.1:1", model="m", num_parameters=10)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        OpenAIBackend(settings.pop("base_urls"), settings.pop("model"), **settings)
