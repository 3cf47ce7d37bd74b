"""`cascade serve` for real: subprocesses on 127.0.0.1 with the embedded pair, driven by
the official `openai` client (and httpx for what the client will not send): round trips,
streaming, bad requests, an upstream killed mid-run, graceful shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import cascade
from tests.fake_openai import free_port

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "a=17;b=a+38;c=b-25;?c"
KEY = "test-key-0123456789"


def start_server(*flags: str, env_key: bool = False) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if env_key:
        env["CASCADE_TEST_KEY"] = KEY
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), *flags],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read().decode()


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--api-key-env", "CASCADE_TEST_KEY", "--max-prompt-chars", "2000",
                                "--max-budget", "100000", env_key=True)
    try:
        wait_healthy(process, url)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_completion_round_trip_matches_the_library(client):
    response = client.completions.create(model="stepcascade", prompt=PROBLEM, extra_body={"budget": 300})
    expected = cascade.embedded_cascade().solve(PROBLEM, budget=300)
    extension = response.model_extra["cascade"]
    assert response.choices[0].text == "\n".join(step.text for step in expected.steps)
    assert response.choices[0].finish_reason == "stop"
    assert extension["answer"] == expected.answer
    assert extension["authors"] == [step.author for step in expected.steps]
    assert extension["cost"] == pytest.approx(expected.cost.total, rel=1e-12)
    assert extension["escalation_rate"] == expected.escalation_rate
    assert extension["budget"] == 300 and extension["cap_intervened"] == expected.cap_intervened
    assert extension["degraded"] is False
    assert response.usage.completion_tokens == sum(u.generated_tokens for u in expected.cost.per_tier)
    assert response.usage.prompt_tokens == sum(u.prefill_tokens for u in expected.cost.per_tier)


def test_chat_round_trip_and_models(client):
    response = client.chat.completions.create(
        model="stepcascade", messages=[{"role": "system", "content": "ignored"},
                                       {"role": "user", "content": PROBLEM}],
        extra_body={"budget": 300, "gate": "always-small"})
    extension = response.model_extra["cascade"]
    assert set(extension["authors"]) == {"small"}
    assert response.choices[0].message.content.split("\n")[-1] == [
        s for s in extension["steps"]][-1]["text"]
    assert [m.id for m in client.models.list().data] == ["stepcascade"]


def test_streaming_sends_each_step_then_the_summary(client):
    chunks = list(client.completions.create(model="stepcascade", prompt=PROBLEM, stream=True,
                                            extra_body={"budget": 300}))
    plain = client.completions.create(model="stepcascade", prompt=PROBLEM, extra_body={"budget": 300})
    step_chunks = [c for c in chunks if c.choices[0].finish_reason is None]
    final = chunks[-1]
    assert len(step_chunks) == len(plain.model_extra["cascade"]["steps"])
    assert [c.model_extra["cascade"]["step"]["author"] for c in step_chunks] == \
        plain.model_extra["cascade"]["authors"]
    assert "".join(c.choices[0].text for c in chunks).rstrip("\n") == plain.choices[0].text
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.total_tokens == plain.usage.total_tokens
    assert final.model_extra["cascade"]["cost"] == pytest.approx(plain.model_extra["cascade"]["cost"])


def test_a_resolve_mode_request_reports_the_steps_its_re_solve_replaced(client):
    # threshold 0: the small model's first step is always doubted, so the large one re-solves
    response = client.completions.create(model="stepcascade", prompt=PROBLEM, extra_body={
        "budget": 300, "gate": "confidence", "mode": "resolve", "threshold": 0.0})
    extension = response.model_extra["cascade"]
    assert [s["author"] for s in extension["set_aside"]] == ["small"]
    assert set(extension["authors"]) == {"large"} and extension["answer"] == "30"
    every_step = extension["steps"] + extension["set_aside"]
    assert extension["cost"] == pytest.approx(sum(s["cost"] for s in every_step))


def test_chat_streaming(client):
    chunks = list(client.chat.completions.create(model="stepcascade", stream=True, extra_body={"budget": 300},
                                                 messages=[{"role": "user", "content": PROBLEM}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "####" in text and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, message", [
    ({"model": "stepcascade"}, 400, "prompt is required"),
    ({"model": "stepcascade", "prompt": "   "}, 400, "prompt is empty"),
    ({"model": "stepcascade", "prompt": PROBLEM, "budget": -1}, 400, "budget must be >= 0"),
    ({"model": "stepcascade", "prompt": PROBLEM, "budget": "lots"}, 400, "budget must be a number"),
    ({"model": "stepcascade", "prompt": PROBLEM, "budget": 1e12}, 400, "budget must be <="),
    ({"model": "stepcascade", "prompt": "a=1;" * 600}, 400, "over the limit of 2000"),
    ({"model": "gpt-9", "prompt": PROBLEM}, 404, "unknown model 'gpt-9'"),
    ({"prompt": PROBLEM}, 400, "model is required"),
    ({"model": "stepcascade", "prompt": PROBLEM, "budjet": 5}, 400, "unknown field(s) ['budjet']"),
    ({"model": "stepcascade", "prompt": PROBLEM, "max_tokens": 10 ** 6}, 400, "max_tokens must be <="),
    ({"model": "stepcascade", "prompt": PROBLEM, "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ({"model": "stepcascade", "prompt": PROBLEM, "gate": "magic"}, 400, "unknown gate 'magic'"),
    ({"model": "stepcascade", "prompt": PROBLEM, "gate": "advantage"}, 400, "needs the server's router"),
    ({"model": "stepcascade", "prompt": PROBLEM, "threshold": "high"}, 400, "threshold must be a number"),
    ({"model": "stepcascade", "prompt": PROBLEM, "signal": "vibes"}, 400, "signal and mode need gate"),
    ({"model": "stepcascade", "prompt": PROBLEM, "gate": "confidence", "signal": "vibes"}, 400, "signal"),
    ({"model": "stepcascade", "prompt": PROBLEM, "n": 3}, 400, "n must be 1"),
    ({"model": "stepcascade", "prompt": [1, 2, 3]}, 400, "token-id prompts"),
    ({"model": "stepcascade", "prompt": PROBLEM, "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": "stepcascade", "prompt": PROBLEM, "stream": "yes"}, 400, "stream must be true or false"),
    ({"model": "stepcascade", "prompt": PROBLEM, "stream": True, "gate": "confidence", "mode": "resolve"},
     400,
     "stream is not supported with a resolve-mode gate"),
])
def test_bad_requests_get_4xx_with_a_message(server, body, status, message):
    response = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]


def test_bad_chat_requests(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for messages, message in (([], "messages is required"),
                              ([{"role": "system", "content": "x"}], "no user message"),
                              ([{"role": "robot", "content": "x"}], "role")):
        response = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=30,
                              json={"model": "stepcascade", "messages": messages})
        assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_the_client_sees_clear_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="budget must be >= 0"):
        client.completions.create(model="stepcascade", prompt=PROBLEM, extra_body={"budget": -5})
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="nope", prompt=PROBLEM)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong-key-0000", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.completions.create(model="stepcascade", prompt=PROBLEM)
    assert httpx.get(server + "/v1/models").status_code == 401
    huge = httpx.post(server + "/v1/completions", content=b"x" * (2 << 20), timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert huge.status_code == 413 and "over the limit" in huge.json()["error"]["message"]
    garbage = httpx.post(server + "/v1/completions", content=b"{not json", timeout=30,
                         headers={"Authorization": f"Bearer {KEY}"})
    assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]["message"]
    assert httpx.get(server + "/v1/nothing-here").status_code == 404


def _post_all(url: str, n: int, body: dict, timeout: float = 90) -> list:
    def one(_):
        try:
            return httpx.post(url + "/v1/completions", json=body, timeout=timeout)
        except httpx.HTTPError as error:  # a lost request: the test fails on it
            return error

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _stream_events(url: str, body: dict) -> list[str]:
    """The data of each server-sent event of one streamed completion."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=90) as response:
        assert response.status_code == 200
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_upstream_killed_mid_run_every_request_ends_defined():
    upstream_port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    upstream = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port",
                                 str(upstream_port), "--delay", "0.15"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remote = f"large=large@http://127.0.0.1:{upstream_port}"
    degrade, degrade_url = start_server("--remote", remote, "--gate", "always-large",
                                        "--on-large-failure", "degrade")
    fail, fail_url = start_server("--remote", remote, "--gate", "always-large")
    try:
        wait_healthy(degrade, degrade_url)
        wait_healthy(fail, fail_url)
        body = {"model": "stepcascade", "prompt": PROBLEM, "max_steps": 16}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(_post_all, degrade_url, 6, body),
                       pool.submit(_post_all, fail_url, 6, body),
                       pool.submit(_stream_events, fail_url, dict(body, stream=True))]
            time.sleep(1.5)  # both servers are now mid-run on the upstream
            upstream.kill()
            degraded, failed, events = (future.result() for future in futures)
        for response in degraded + failed:
            assert isinstance(response, httpx.Response), f"request lost: {response!r}"
        assert all(r.status_code == 200 for r in degraded), [r.text for r in degraded]
        summaries = [r.json()["cascade"] for r in degraded]
        assert any(s["degraded"] and s["degraded_steps"] for s in summaries)
        for s in summaries:  # degraded steps were written by the small model
            assert all(s["steps"][i]["author"] == "small" for i in s["degraded_steps"])
        assert {r.status_code for r in failed} <= {200, 502}
        errors = [r.json()["error"] for r in failed if r.status_code == 502]
        assert errors, "the fail policy should have failed the requests still running"
        for error in errors:
            assert "embedded:large" in error["message"] and "step" in error["message"]
            assert error["type"] == "upstream_error" and "steps" in error["partial"]
        # a stream cut by the failure ends with an error event, then [DONE]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last.get("error", {}).get("type") == "upstream_error" or \
            last["choices"][0]["finish_reason"] is not None
    finally:
        upstream.kill()
        stop(degrade)
        stop(fail)


def test_graceful_shutdown_finishes_or_cleanly_fails_in_flight_requests():
    # Requests in flight when SIGTERM arrives get the grace period (30 s, minus 1 s of
    # margin) to finish; any still running then get a 503. Always-large requests are slow
    # enough that all 12 are in flight at the signal, and fast enough that some finish
    # within the grace; a grace of 30 s (not 8) keeps that true on a busy 2-core machine
    # where a request takes several times as long as on a quiet one.
    process, url = start_server("--shutdown-grace", "30")
    try:
        wait_healthy(process, url)
        body = {"model": "stepcascade", "prompt": PROBLEM, "gate": "always-large"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_post_all, url, 12, body)
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health", timeout=5).json()["inflight"] < 12:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            responses = future.result()
        process.wait(timeout=60)
        assert process.returncode == 0
        for response in responses:
            assert isinstance(response, httpx.Response), f"request lost: {response!r}"
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                assert "shutting down" in response.json()["error"]["message"]
        assert any(r.status_code == 200 for r in responses)
    finally:
        log = stop(process)
    assert PROBLEM not in log  # no prompt bodies in the logs without --log-prompts
    assert "request" in log and json.dumps(PROBLEM) not in log


def test_server_settings_are_checked():
    from app.server import ServerConfig, ServerLimits, _parse_remote

    with pytest.raises(cascade.ConfigError, match="max_prompt_chars"):
        ServerLimits(max_prompt_chars=0)
    with pytest.raises(cascade.ConfigError, match="shutdown_grace"):
        ServerLimits(shutdown_grace=float("nan"))
    with pytest.raises(cascade.ConfigError, match="api_key"):
        ServerConfig(api_key="short")
    assert _parse_remote(["large=big@http://a:1,http://b:2"], ("small", "large")) == \
        {1: ("big", ["http://a:1", "http://b:2"])}
    assert _parse_remote(["large=http://a:1"], ("small", "large")) == {1: ("large", ["http://a:1"])}
    with pytest.raises(cascade.ConfigError, match="unknown tier 'huge'"):
        _parse_remote(["huge=http://a:1"], ("small", "large"))
    with pytest.raises(cascade.ConfigError, match="expected TIER="):
        _parse_remote(["large"], ("small", "large"))


def test_serve_cli_rejects_bad_flags_before_loading_models():
    from app.cli import main

    assert main(["serve", "--remote", "huge=http://127.0.0.1:1"]) == 2
    assert "NO_SUCH_KEY_VAR" not in os.environ
    assert main(["serve", "--api-key-env", "NO_SUCH_KEY_VAR"]) == 2


def test_serve_isolate_puts_upper_tiers_in_processes(tiny_dirs):
    from app.cli import build_parser
    from app.server import build_served_cascade
    from cascade.errors import ConfigError
    from decoding import HFBackend, ProcessBackend

    args = build_parser().parse_args(["serve", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                                      "--delimiter", "\n", "--max-steps", "2", "--max-step-tokens", "4",
                                      "--isolate"])
    served = build_served_cascade(args)
    try:
        assert type(served.models[0]) is HFBackend and isinstance(served.models[1], ProcessBackend)
        assert served.solve("a=1;?a").steps
    finally:
        served.models[1].close()
    vllm = build_parser().parse_args(["serve", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                                      "--backend", "vllm", "--isolate"])
    with pytest.raises(ConfigError, match="--isolate"):
        build_served_cascade(vllm)
