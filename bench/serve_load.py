"""Closed-loop load on `cascade serve` (embedded pair) over 127.0.0.1.

Starts `cascade serve` as a subprocess, then for each client count C runs C clients
that each send a completion request, wait for its answer, and send the next, until
the level's request count is done or its time bound passes. Per level: throughput
(completed requests / wall second), latency p50/p99, errors by status, lost requests
(sent, never answered: connection dropped or client timeout), and hard-cap violations
(a response whose reported cost exceeds its budget). Writes JSON + Markdown + PNG to
bench/results/serve/, with the exact command and the git commit.

    python -m bench.serve_load                      # 1/16/64 clients, 256 requests at 64
    python -m bench.serve_load --levels 1:16,16:64 --budget 300 -o runs/serve_try
    python -m bench.serve_load --curve bench/results/curve_cli/curve_file.json --pace 40.283 \
        --levels 1:150,16:150,64:300 -o bench/results/serve_paced   # the server paces its gate

With `--curve FILE --pace B` the server runs `cascade serve --curve FILE --pace B` and the
requests carry no budget: each level also reports its requests' mean cost and, from
`/health` after it, the pacer's count, mean cost and ceiling (every request since start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "serve"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 of 256 samples is the 254th)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _problems(limit: int) -> list[str]:
    path = ROOT / "bench" / "data" / "embedded_test.jsonl"
    with path.open() as handle:
        return [json.loads(line)["problem"] for line, _ in zip(handle, range(limit), strict=False)]


async def _run_level(url: str, clients: int, requests: int, time_limit: float, problems: list[str],
                     budget: float | None, client_timeout: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lost: list[str] = []
    cap_violations = 0
    costs: list[float] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, cap_violations
        while issued < requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            body = {"model": "stepcascade", "prompt": problems[index % len(problems)]}
            if budget is not None:
                body["budget"] = budget
            sent = time.perf_counter()
            try:
                response = await http.post(url + "/v1/completions", json=body, timeout=client_timeout)
            except httpx.HTTPError as error:
                lost.append(f"{type(error).__name__}: {error}"[:200])
                continue
            latencies.append(time.perf_counter() - sent)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                extension = response.json()["cascade"]
                costs.append(extension["cost"])
                if extension["budget"] is not None and extension["cost"] > extension["budget"] + 1e-9:
                    cap_violations += 1  # the cap each request ran under: its own or the pacer's

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    ok = statuses.get("200", 0)
    return {
        "clients": clients, "requests_planned": requests, "requests_sent": issued, "completed_200": ok,
        "statuses": statuses, "errors": issued - ok, "server_errors_5xx": sum(n for s, n in statuses.items()
                                                                              if s.startswith("5")),
        "lost": len(lost), "lost_examples": lost[:5], "hard_cap_violations": cap_violations,
        "wall_seconds": wall, "throughput_rps": ok / wall if wall > 0 else 0.0,
        "latency_p50_s": _percentile(latencies, 50), "latency_p99_s": _percentile(latencies, 99),
        "latency_max_s": max(latencies) if latencies else None,
        "time_limit_hit": issued < requests,
        "mean_cost": sum(costs) / len(costs) if costs else None,
        "pacing": (await _health(url)).get("pacing"),
    }


async def _health(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient() as http:
        return (await http.get(url + "/health", timeout=10)).json()


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("cascade serve exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("cascade serve did not become healthy")


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# `cascade serve` under closed-loop load (embedded pair, 127.0.0.1)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`  ",
        f"Machine: {report['machine']}  ",
        f"Server: `{report['server_command']}`  ",
        (f"Budget per request: {report['budget']} cost units" if report["budget"] is not None
         else "Requests carry no budget (the paced server's cap governs each)")
        + f"; client timeout {report['client_timeout_s']} s; time bound per level "
        f"{report['time_limit_s']} s.",
        "",
        "| clients | requests sent | 200 | errors | 5xx | lost | cap violations | throughput (req/s) "
        "| p50 (s) | p99 (s) | max (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        lines.append(
            f"| {level['clients']} | {level['requests_sent']} | {level['completed_200']} | {level['errors']} "
            f"| {level['server_errors_5xx']} | {level['lost']} | {level['hard_cap_violations']} "
            f"| {level['throughput_rps']:.2f} | {level['latency_p50_s']:.3f} | {level['latency_p99_s']:.3f} "
            f"| {level['latency_max_s']:.3f} | {level['wall_seconds']:.1f} |")
    if any(level.get("pacing") for level in report["levels"]):
        lines += ["", "Paced server: each level's requests' mean cost, and the pacer after the level (every "
                  "request since start, warm-up included): requests, mean cost, guaranteed ceiling.", "",
                  "| clients | level mean cost | pacer: requests | pacer: mean cost | pacer: ceiling "
                  "| budget B |",
                  "|---|---|---|---|---|---|"]
        for level in report["levels"]:
            pace = level["pacing"]
            lines.append(f"| {level['clients']} | {level['mean_cost']:.2f} | {pace['requests']} | "
                         f"{pace['mean_cost']:.2f} | {pace['ceiling']:.2f} | {pace['budget']:g} |")
    lines += ["", "Closed loop: each client sends its next request when the previous one is answered. "
              "Lost = sent but never answered (dropped connection or client timeout). Latency is "
              "per request, send to full response, nearest-rank percentiles.", ""]
    (out / "report.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [level["clients"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [level["throughput_rps"] for level in levels], "o-")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="completed requests / s",
             title="throughput")
    right.plot(xs, [level["latency_p50_s"] for level in levels], "o-", label="p50")
    right.plot(xs, [level["latency_p99_s"] for level in levels], "s-", label="p99")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    right.legend()
    fig.suptitle(f"cascade serve, embedded pair, closed loop ({report['commit'][:10]})")
    fig.tight_layout()
    fig.savefig(out / "serve_load.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1:32,16:128,64:256",
                        help="comma-separated CLIENTS:REQUESTS (default 1:32,16:128,64:256)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most")
    parser.add_argument("--budget", type=float, default=300.0, help="hard cap per request (cost units)")
    parser.add_argument("--client-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--isolate", action="store_true",
                        help="serve with `cascade serve --isolate` (the large model in a process of its own)")
    parser.add_argument("--curve", default=None, help="with --pace: serve this accuracy-budget curve paced")
    parser.add_argument("--pace", type=float, default=None, metavar="B",
                        help="serve with `--curve FILE --pace B`; requests then carry no budget")
    parser.add_argument("--pace-step", type=float, default=2.0, help="with --pace: the server's --pace-step")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if (args.curve is None) != (args.pace is None):
        parser.error("--curve and --pace go together")
    if args.pace is not None:
        args.budget = None  # the pacer's cap governs each request
    levels = []
    for item in args.levels.split(","):
        clients, _, requests = item.partition(":")
        levels.append((int(clients), int(requests)))

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)] + \
        (["--isolate"] if args.isolate else []) + \
        (["--curve", args.curve, "--pace", str(args.pace), "--pace-step", str(args.pace_step)]
         if args.pace is not None else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.server_threads))
    log_path = args.output / "server.log.tmp"
    args.output.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        server = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(server, url)
            problems = _problems(512)
            asyncio.run(_run_level(url, 2, 4, 60, problems, args.budget, args.client_timeout))  # warm-up
            results = []
            for clients, requests in levels:
                print(f"level: {clients} clients, {requests} requests ...", file=sys.stderr, flush=True)
                result = asyncio.run(_run_level(url, clients, requests, args.time_limit, problems,
                                                args.budget, args.client_timeout))
                print(json.dumps({k: result[k] for k in ("clients", "completed_200", "errors", "lost",
                                                         "throughput_rps", "latency_p50_s",
                                                         "latency_p99_s")}), file=sys.stderr, flush=True)
                results.append(result)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    log_path.unlink(missing_ok=True)
    report = {
        "command": "python -m bench.serve_load " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average "
                   f"{os.getloadavg()[0]:.1f} at the end, "
                   f"Python {platform.python_version()}",
        "server_command": "cascade serve --port <free port>" + (" --isolate" if args.isolate else "")
                          + (f" --curve {args.curve} --pace {args.pace:g} --pace-step {args.pace_step:g}"
                             if args.pace is not None else "")
                          + f"  (OMP_NUM_THREADS={args.server_threads})",
        "server_exit_code": server.returncode, "budget": args.budget, "client_timeout_s": args.client_timeout,
        "time_limit_s": args.time_limit, "levels": results,
    }
    _write(args.output, report)
    print((args.output / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
