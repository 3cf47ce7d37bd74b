"""The edge bugs of issues 18 and 20, from outside: each of these failed before the spec
layer and the application layer (a flag dropped, a wrong loader, a raw traceback)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.cli import build_parser, main
from app.server import ServerConfig, ServerLimits, build_served_cascade, create_app
from bench import harness
from bench.prompts import get_template
from bench.provenance import PACKAGE_ROOT, package_commit
from cascade import AlwaysLarge, AlwaysSmall, Cascade, CascadeError, SolveOptions
from tests.fakes import FakeBackend, counting_script

PROBLEM = "a=17;b=a*3;c=b-25;?c"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_solve_honours_the_step_limits_on_the_embedded_pair(capsys):
    code, out, _ = run(capsys, "solve", PROBLEM, "--json", "--max-steps", "2", "--max-step-tokens", "3")
    assert code == 0
    steps = json.loads(out)["steps"]
    assert len(steps) == 2 and all(len(s["text"]) <= 3 for s in steps)  # one token per character


def test_solve_refuses_zero_steps():
    with pytest.raises(SystemExit) as stop:
        main(["solve", PROBLEM, "--max-steps", "0"])
    assert stop.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "0.3"], "--threshold is a setting of --gate"),
    (["--signal", "vibes"], "--signal is a setting of --gate"),
    (["--mode", "route"], "--mode is a setting of --gate"),
    (["--gate", "confidence", "--signal", "vibes"], "signal must be one of"),
    (["--gate", "verify", "--signal", "entropy"], "settings of --gate confidence"),
    (["--gate", "confidence", "--threshold", "1.5"], "threshold"),
])
def test_gate_settings_without_their_gate_are_refused_not_dropped(capsys, flags, message):
    code, _, err = run(capsys, "solve", PROBLEM, *flags)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--models", "embedded:small,embedded:large"], ["--gate", "verify"],
                                   ["--small", "a", "--large", "b"], ["--threshold", "0.2"]])
def test_calibration_is_not_silently_overridden(capsys, tmp_path, flags):
    code, _, err = run(capsys, "solve", PROBLEM, "--calibration", str(tmp_path / "c.json"), *flags)
    assert code == 2 and "--calibration names the models and gates itself" in err


def test_a_calibration_directory_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "solve", PROBLEM, "--calibration", str(tmp_path))
    assert code == 2 and "is a directory" in err and "Traceback" not in err


def test_calibrate_into_a_missing_directory_fails_before_any_work(capsys, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": PROBLEM}) + "\n")
    code, _, err = run(capsys, "calibrate", "--problems", str(problems), "--budget", "100",
                       "-o", str(tmp_path / "missing" / "c.json"))
    assert code == 2 and "no directory" in err and not (tmp_path / "missing").exists()


def test_serve_loads_embedded_models_by_name():
    served = build_served_cascade(build_parser().parse_args(
        ["serve", "--models", "embedded:small,embedded:large", "--max-steps", "3"]))
    assert [m.info.name for m in served.models] == ["embedded:small", "embedded:large"]
    assert served.delimiter == "\n" and served.options.max_steps == 3
    assert served.solve(PROBLEM).steps


@pytest.mark.parametrize("command, flag", [("train-router", "--gate"), ("train-router", "--threshold"),
                                           ("train-router", "--rewrite"), ("bench", "--gates"),
                                           ("bench", "--rewrite"), ("serve", "--gates")])
def test_a_flag_a_command_cannot_honour_is_not_offered(capsys, tmp_path, command, flag):
    required = {"train-router": ["--problems", "p", "--scorer", "exact", "-o", "r.pt"],
                "bench": ["-o", str(tmp_path / "o")], "serve": []}[command]
    code, _, err = run(capsys, command, *required, flag, "0.3")
    assert code == 2 and f"unrecognized arguments: {flag}" in err


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_bench_applies_draft_ahead_on_every_backend(monkeypatch, tmp_path, backend, capsys):
    """--draft-ahead reaches the solve options of the cascade bench runs, whatever the
    backend (engines stood in for by the HF backend; starting them is not this test's job)."""
    from decoding import HFBackend

    def fake_vllm(path, **settings):
        return HFBackend.from_pretrained(path, step_delimiter=settings["step_delimiter"],
                                         name=settings["name"])

    def fake_openai(path, urls, served, *, name, api_key, step_delimiter, prompt_template):
        return HFBackend.from_pretrained(path, step_delimiter=step_delimiter, name=name)

    import decoding
    from cascade import specs

    monkeypatch.setattr(decoding, "VLLMBackend", type("V", (), {"from_pretrained": staticmethod(fake_vllm)}),
                        raising=False)
    monkeypatch.setattr(specs.OpenAIBackend, "from_model_dir", staticmethod(fake_openai))
    seen = []

    def fake_run(runner, *args, **kwargs):
        seen.append(runner.options)
        raise CascadeError("stopped after building the cascade")

    monkeypatch.setattr(harness, "run_benchmark", fake_run)
    extra = ["--endpoints", "http://127.0.0.1:9", "--endpoints", "http://127.0.0.1:10"] \
        if backend == "openai" else []
    code, _, _ = run(capsys, "bench", "--limit", "1", "--policies", "verify", "--backend", backend, *extra,
                     "--draft-ahead", "-o", str(tmp_path / "o"))
    assert code == 2 and len(seen) == 1 and seen[0].draft_ahead is True


def test_solve_takes_a_backend_endpoints_and_a_template_per_tier(monkeypatch, capsys, tiny_dirs):
    """solve --backend openai --endpoints ... --template plain,chat: each model gets its own
    servers and its own prompt (a base model and a chat model)."""
    from cascade import specs
    from decoding import HFBackend

    calls = []

    def fake_openai(path, urls, served, *, name, api_key, step_delimiter, prompt_template):
        calls.append((path, urls, served, step_delimiter, prompt_template))
        return HFBackend.from_pretrained(path, step_delimiter=step_delimiter, prompt_template=prompt_template,
                                         name=name)

    monkeypatch.setattr(specs.OpenAIBackend, "from_model_dir", staticmethod(fake_openai))
    code, out, err = run(capsys, "solve", "a=1;?a", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                         "--backend", "openai", "--endpoints", "http://a:1", "--endpoints", "http://b:2,http://c:3",
                         "--template", "plain,chat", "--delimiter", "\n", "--max-steps", "2",
                         "--max-step-tokens", "4", "--json")
    assert code == 0, err
    assert calls == [(tiny_dirs[0], ["http://a:1"], tiny_dirs[0], "\n", get_template("plain").format),
                     (tiny_dirs[2], ["http://b:2", "http://c:3"], tiny_dirs[2], "\n", None)]
    assert json.loads(out)["tier_names"] == ["small", "large"]


def test_templates_with_different_delimiters_need_one_given(capsys, tiny_dirs):
    code, _, err = run(capsys, "solve", "a=1;?a", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                       "--template", "plain,chat,chat")
    assert code == 2 and "--template names 3 templates for 2 models" in err


def test_serve_takes_a_template(tiny_dirs):
    served = build_served_cascade(build_parser().parse_args(
        ["serve", "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--template", "plain",
         "--delimiter", "\n"]))
    assert [m.prompt_template for m in served.models] == [get_template("plain").format] * 2


def test_degrade_says_why_and_does_not_retry_a_dead_tier_every_request(caplog):
    """serve --on-large-failure degrade: the response and the log say which tier was dropped
    and why; the next requests do not call it again until the retry time has passed."""
    small = FakeBackend("small", 100, counting_script(3))
    large = FakeBackend("large", 1000, counting_script(3), fail_at=set(range(1, 10_000)))  # a dead tier
    runner = Cascade(small, large, AlwaysLarge(), options=SolveOptions(max_steps=6, max_step_tokens=12),
                     on_large_failure="degrade")

    async def ask(app, n):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            body = {"model": "stepcascade", "prompt": "q"}
            return [(await client.post("/v1/completions", json=body)).json() for _ in range(n)]

    with caplog.at_level(logging.INFO, logger="cascade.server"):
        first, second, third = asyncio.run(ask(create_app(runner, ServerConfig(tier_retry_seconds=600)), 3))
    calls_after_first = 1  # the first request tried the large model once, then dropped it
    assert large.calls == calls_after_first
    for body in (first, second, third):
        extension = body["cascade"]
        assert extension["degraded"] is True
        assert set(extension["authors"]) == {"small"}
        assert extension["dropped_tiers"][0]["tier"] == "large"
        assert "injected failure" in extension["dropped_tiers"][0]["reason"]
    assert any("injected failure" in r for r in first["cascade"]["degraded_reasons"])
    assert second["cascade"]["degraded_reasons"] == []  # not tried: nothing failed in this request
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "injected failure" in warnings[0].getMessage()
    # retry time 0: every request tries the tier again
    retried = FakeBackend("large", 1000, counting_script(3), fail_at=set(range(1, 10_000)))
    runner = Cascade(small, retried, AlwaysLarge(), options=SolveOptions(max_steps=6, max_step_tokens=12),
                     on_large_failure="degrade")
    asyncio.run(ask(create_app(runner, ServerConfig(tier_retry_seconds=0)), 2))
    assert retried.calls == 2


def test_provenance_is_the_package_commit_not_the_current_directory(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(other)]
    subprocess.run(git[:-2] + ["init", "-q", str(other)], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "other"], check=True)
    other_commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    ours = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.chdir(other)
    assert package_commit() == ours != other_commit
    # a package directory that is no checkout of its own: said in words
    inside = other / "stepcascade"
    inside.mkdir()
    assert package_commit(inside).startswith("unknown (") and "inside" in package_commit(inside)
    assert "not a git checkout" in package_commit(Path("/"))


class _SlowBackend(FakeBackend):
    """A tier whose every call takes a while (in the driver's worker thread), so that
    concurrent requests overlap for sure."""

    def next_steps(self, requests):
        time.sleep(0.2)
        return super().next_steps(requests)


def _slow_runner() -> Cascade:
    small = _SlowBackend("small", 100, counting_script(2))
    large = FakeBackend("large", 1000, counting_script(2))
    return Cascade(small, large, AlwaysSmall(), options=SolveOptions(max_steps=4, max_step_tokens=12))


async def _post_together(app, n: int) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=60) as client:
        body = {"model": "stepcascade", "prompt": "q"}
        return list(await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(n))))


def test_serve_runs_at_most_max_running_and_turns_away_past_max_waiting():
    app = create_app(_slow_runner(), ServerConfig(limits=ServerLimits(max_running=1, max_waiting=1)))
    responses = asyncio.run(_post_together(app, 4))
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "server_overloaded" and "max_running 1, max_waiting 1" in error["message"]
    state = app.state.cascade_app
    assert (state.running, state.waiting, state.inflight) == (0, 0, 0)  # every slot given back
    # Within running + waiting, every request is answered, never more than max_running at once.
    app = create_app(_slow_runner(), ServerConfig(limits=ServerLimits(max_running=2, max_waiting=8)))
    state, peak = app.state.cascade_app, []
    solve = state._solve

    async def counted(*args, **kwargs):
        peak.append(state.running)
        return await solve(*args, **kwargs)

    state._solve = counted
    responses = asyncio.run(_post_together(app, 6))
    assert [r.status_code for r in responses] == [200] * 6
    assert len(peak) == 6 and max(peak) == 2
    with pytest.raises(CascadeError, match="max_running"):
        ServerLimits(max_running=0)
    with pytest.raises(CascadeError, match="max_waiting"):
        ServerLimits(max_waiting=-1)
