"""`cascade serve --curve FILE --pace B`: a server that paces its gate to a mean cost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.server import ServerConfig, _Job, create_app
from tests.app.test_server import start_server, stop, wait_healthy
from tests.cascade.test_budget import resolve_curve

ROOT = Path(__file__).resolve().parents[2]
# Calibrated on the embedded pair by `cascade calibrate --curve` (runs/curve_cli.sh).
CURVE = ROOT / "bench/results/curve_cli/curve_file.json"


def paced_app():
    runner, curve = resolve_curve()
    paced = curve.paced("resolve", 60.0, step=1.0)
    return create_app(runner, ServerConfig(paced=paced)), paced


async def post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=60) as client:
        return list(await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies)))


def test_concurrent_requests_are_paced_capped_and_told_the_ceiling():
    app, paced = paced_app()
    bodies = [{"model": "stepcascade", "prompt": f"q{i}"} for i in range(11)]
    bodies.append({"model": "stepcascade", "prompt": "q-low", "budget": 5.0})  # a budget only lowers the cap
    responses = asyncio.run(post_all(app, bodies))
    assert [r.status_code for r in responses] == [200] * 12
    extensions = [r.json()["cascade"] for r in responses]
    for e in extensions[:-1]:
        assert e["budget"] == 120.0 and e["cost"] <= 120.0  # the family's hard cap, 2 x 60
    assert extensions[-1]["budget"] == 5.0 and extensions[-1]["cost"] <= 5.0
    seen = sorted(e["pacing"]["requests"] for e in extensions)
    assert seen == list(range(1, 13))  # every finished request went back to the pacer, once
    assert paced.pacer.n == 12 and paced.pacer.running == {}  # every ticket ended
    assert paced.mean_cost == pytest.approx(sum(e["cost"] for e in extensions) / 12)
    assert paced.mean_cost <= paced.bound()
    last = max(extensions, key=lambda e: e["pacing"]["requests"])["pacing"]
    assert last["mean_cost"] == pytest.approx(paced.mean_cost)
    assert last["ceiling"] == pytest.approx(paced.bound())
    health = asyncio.run(_get(app, "/health"))
    assert health["pacing"]["requests"] == 12 and health["pacing"]["budget"] == 60.0
    assert health["pacing"]["running"] == 0


def hanging_solve(spent: float, at_most: float, reported: asyncio.Event):
    """An `asolve` that reports (spent, at_most) as it sends a call, then never returns."""

    async def hangs(problem, budget, *, gates, options, on_step, on_spend):
        on_spend(spent, at_most)
        reported.set()
        await asyncio.Event().wait()

    return hangs


def test_running_requests_move_the_pacer_and_a_cancelled_one_is_charged_its_most():
    # A request that has spent a lot and is still running makes the next request cheaper at
    # once; when its client goes away mid-call its spend, and the most its call in flight
    # could cost, still reach the pacer (no spent unit is lost).
    app, paced = paced_app()
    state = app.state.cascade_app
    reported = asyncio.Event()
    # 5 B spent so far, a call of at most 40 in flight, not done
    state.runner.asolve = hanging_solve(300.0, 340.0, reported)
    paced.pacer.position = float(len(paced.columns) - 1)  # the dearest threshold

    async def scenario() -> None:
        job = _Job("q", None, None, state.runner.options, False)
        task = asyncio.ensure_future(state.run(job, "r1"))
        await reported.wait()
        assert len(paced.pacer.running) == 1 and paced.pacer.n == 0
        assert paced.pacer.in_flight_shift() == pytest.approx(1.0 * (60 - 300) / 60)
        assert paced.column == paced.columns[0]  # the next request: the cheapest threshold
        health = await _get(app, "/health")
        assert health["pacing"]["running"] == 1 and health["pacing"]["next_threshold"] == 1.0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert paced.pacer.running == {} and paced.pacer.n == 1 and paced.mean_cost == 340.0


def test_a_server_that_dies_mid_request_leaves_its_spend_to_the_next_one(tmp_path):
    # The server reports a running request's spend to the pacer, the pacer keeps it in the
    # state file, and the process started after a crash charges it: no spent unit is lost.
    runner, curve = resolve_curve()
    state_file = tmp_path / "pacing.json"
    paced = curve.paced("resolve", 60.0, step=1.0, state_file=state_file)
    paced.spend_keep_interval = 0.0
    app = create_app(runner, ServerConfig(paced=paced))
    state = app.state.cascade_app
    reported = asyncio.Event()
    state.runner.asolve = hanging_solve(75.0, 110.0, reported)

    async def scenario() -> None:
        job = _Job("q", None, None, state.runner.options, False)
        task = asyncio.ensure_future(state.run(job, "r1"))
        await reported.wait()
        # The process dies here (nothing more runs in it); the next one reads the file.
        restarted = curve.paced("resolve", 60.0, step=1.0, state_file=state_file)
        assert restarted.pacer.n == 1 and restarted.mean_cost == 75.0 and restarted.pacer.running == {}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


async def _get(app, path: str) -> dict:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        return (await client.get(path)).json()


@pytest.mark.parametrize("extra, field", [({"gate": "confidence"}, "gate"), ({"threshold": 0.3}, "threshold"),
                                          ({"stream": True}, "stream")])
def test_a_paced_server_refuses_what_would_bypass_or_break_its_pacing(extra, field):
    app, paced = paced_app()
    (response,) = asyncio.run(post_all(app, [{"model": "stepcascade", "prompt": "q"} | extra]))
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert paced.pacer.n == 0


@pytest.mark.parametrize("flags, message", [
    (["--pace", "40"], "--curve and --pace go together"),
    (["--curve", str(CURVE)], "--curve and --pace go together"),
    (["--curve", str(CURVE), "--pace", "40", "--gate", "confidence"], "drop --gate"),
    (["--curve", str(CURVE), "--pace", "5"], "below every budget"),
    (["--pace-state", "pacing.json"], "--pace-state keeps a pacer's state"),
])
def test_serve_pace_flags_are_checked(capsys, flags, message):
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_serve_paces_the_embedded_pair_from_a_curve_file_and_resumes_after_a_restart(tmp_path):
    state = tmp_path / "pacing.json"
    curve = json.loads(CURVE.read_text())
    body = {"model": "stepcascade", "prompt": "a=17;b=a+38;c=b-25;?c"}
    served = []
    for requests in (3, 1):  # a restart between the two: the pacer goes on from its kept state
        process, url = start_server("--curve", str(CURVE), "--pace", "40.3", "--pace-state", str(state))
        try:
            wait_healthy(process, url)
            served += [httpx.post(url + "/v1/completions", json=body, timeout=120).json()["cascade"]
                       for _ in range(requests)]
        finally:
            stop(process)
    assert [e["pacing"]["requests"] for e in served] == [1, 2, 3, 4]
    assert all(e["budget"] == curve["cap_factor"] * 40.283 and e["cost"] <= e["budget"] for e in served)
    assert served[-1]["pacing"]["mean_cost"] == pytest.approx(sum(e["cost"] for e in served) / 4)
    assert served[-1]["pacing"]["mean_cost"] <= served[-1]["pacing"]["ceiling"]
    assert json.loads(state.read_text())["pacer"]["n"] == 4
