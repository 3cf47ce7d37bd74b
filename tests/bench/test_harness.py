"""The benchmark harness on tiny random models: outputs, summary figures, resume after a
kill, refusals, policy errors, and `cascade bench` end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.cli import main
from bench.harness import (
    PLOT_FILES,
    BenchError,
    load_results,
    parse_policies,
    run_benchmark,
    summarize_rows,
    unknown_characters,
)
from cascade import Cascade, SolveOptions, calibrate
from decoding import HFBackend

REPO = Path(__file__).resolve().parents[2]
OPTIONS = SolveOptions(max_steps=3, max_step_tokens=6)
PROBLEMS = [("p0", "a=1;b=a+2;?b", "3"), ("p1", "a=4;b=a*2;?b", "8"), ("p2", "a=9;b=a-5;?b", None)]
POLICIES = ["small", "large", "confidence@0.3", "verify", "calibrated"]
BUDGET = 400.0


def tiny_cascade(dirs) -> Cascade:
    models = [HFBackend.from_pretrained(d, step_delimiter="\n") for d in dirs]
    return Cascade(models=models, options=OPTIONS)


def write_dataset(path: Path, problems) -> Path:
    lines = []
    for pid, problem, answer in problems:
        record = {"id": pid, "problem": problem}
        if answer is not None:
            record["answer"] = answer
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pair(tiny_dirs) -> Cascade:
    return tiny_cascade([tiny_dirs[0], tiny_dirs[2]])


@pytest.fixture(scope="module")
def bench_run(pair, tmp_path_factory):
    """One full run (5 policies x 3 problems, calibrated included) shared by several tests."""
    root = tmp_path_factory.mktemp("bench_run")
    data = write_dataset(root / "data.jsonl", PROBLEMS)
    calib = calibrate(pair, [p for _, p, _ in PROBLEMS], budgets=[10.0, 300.0], alpha=0.5, delta=0.5,
                      thresholds=[0.9, 0.5, 0.1])
    calib_path = calib.save(root / "calib.json")
    out = root / "out"
    summary = run_benchmark(pair, "jsonl", path=data, out_dir=out, policies=POLICIES, budget=BUDGET,
                            calibration=calib_path, command="test-run", progress=False,
                            use_math_verify=False)
    return out, summary, calib


def read_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---- a whole run --------------------------------------------------------------------------

def test_run_writes_results_summaries_and_plots(bench_run):
    out, summary, calib = bench_run
    rows = read_lines(out / "results.jsonl")
    assert len(rows) == len(PROBLEMS) * len(POLICIES)
    # interleaved: each problem is solved by every policy in turn
    assert [(r["id"], r["policy"]) for r in rows] == [(pid, p) for pid, _, _ in PROBLEMS for p in POLICIES]
    for row in rows:
        for key in ("problem", "reference", "predicted", "correct", "steps", "per_tier", "tokens", "cost",
                    "escalation_rate", "wall_seconds", "stop_reason", "cap_intervened", "seconds_per_tier"):
            assert key in row, key
        assert row["tier_names"] == ["small", "large"]
        assert row["cost"] <= BUDGET + 1e-9 and row["budget"] == BUDGET
        assert row["cost"] == pytest.approx(sum(t["cost"] for t in row["per_tier"]))
        # wall time is measured around the whole solve: at least the models' own seconds
        assert row["wall_seconds"] >= sum(row["seconds_per_tier"]) * 0.999
        assert all(s["author"] == ["small", "large"][s["tier"]] for s in row["steps"])
        assert row["unknown_chars"] == 0  # the tiny tokenizer knows every character of PROBLEMS
        if row["reference"] is None:
            assert row["correct"] is None
        else:
            assert isinstance(row["correct"], bool)
            assert row["correct"] == (row["predicted"] is not None
                                      and row["predicted"].strip() == row["reference"])
        if row["policy"] == "small":
            assert all(s["tier"] == 0 for s in row["steps"]) and row["tokens"]["generated"][1] == 0
        if row["policy"] == "large":
            assert all(s["tier"] == 1 for s in row["steps"]) and row["tokens"]["generated"][0] == 0
    assert {r["id"] for r in rows if r["correct"] is None} == {"p2"}

    header = json.loads((out / "run.json").read_text())
    settings = header["settings"]
    assert header["command"] == "test-run" and header["sessions"][0]["commit"]
    assert [p["name"] for p in settings["policies"]] == POLICIES
    assert [m["fingerprint"] for m in settings["models"]] == [m["fingerprint"] for m in calib.models]
    gates = {p["name"]: p["gates"] for p in settings["policies"]}
    assert "threshold=0.3" in gates["confidence@0.3"][0] and "VerifyGate(threshold=0.5" in gates["verify"][0]
    expected = calib.gates_for(BUDGET)[0].threshold  # the threshold certified for the budget
    assert f"threshold={expected}" in gates["calibrated"][0]
    assert set(header["sessions"][0]["warmup_seconds"]) == set(POLICIES)
    assert settings["prompt_templates"] == [None, None] and settings["delimiter"] == "\n"

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(on_disk["policies"]) == POLICIES
    assert on_disk["command"] == "test-run" and on_disk["commit"]
    md = (out / "summary.md").read_text()
    assert "test-run" in md and all(f"| {p} |" in md for p in POLICIES)
    near_zero = max(s["accuracy"] for s in on_disk["policies"].values()) < 0.05
    assert on_disk["tiny_model_note"] == near_zero and ("near zero" in md) == near_zero
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_summary_agrees_with_figures_recomputed_from_the_jsonl(bench_run):
    out, _, _ = bench_run
    rows = read_lines(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == len(rows) and summary["n_problems"] == len(PROBLEMS)
    large = [r for r in rows if r["policy"] == "large"]
    for name in POLICIES:
        cells = [r for r in rows if r["policy"] == name]
        s = summary["policies"][name]
        graded = [r["correct"] for r in cells if r["correct"] is not None]
        assert s["n"] == len(cells) == len(PROBLEMS) and s["n_graded"] == len(graded) == 2
        assert s["accuracy"] == pytest.approx(sum(graded) / len(graded))
        assert s["accuracy_ci95"] == pytest.approx(list(wilson(sum(graded), len(graded))))
        walls = np.array([r["wall_seconds"] for r in cells])
        assert s["wall_seconds"]["mean"] == pytest.approx(walls.mean())
        assert s["wall_seconds"]["p50"] == pytest.approx(np.median(walls))
        assert s["wall_seconds"]["p95"] == pytest.approx(np.percentile(walls, 95))
        for k, tier in enumerate(["small", "large"]):
            assert s["mean_tokens"][tier]["generated"] == pytest.approx(
                np.mean([r["tokens"]["generated"][k] for r in cells]))
            assert s["mean_tokens"][tier]["prefill"] == pytest.approx(
                np.mean([r["tokens"]["prefill"][k] for r in cells]))
        assert s["mean_cost"] == pytest.approx(np.mean([r["cost"] for r in cells]))
        for k, tier in enumerate(["small", "large"]):
            assert s["mean_seconds_per_tier"][tier] == pytest.approx(
                np.mean([r["per_tier"][k]["seconds"] for r in cells]))
        assert s["mean_overhead_seconds"] == pytest.approx(
            np.mean([r["wall_seconds"] - sum(t["seconds"] for t in r["per_tier"]) for r in cells]))
        assert s["mean_overhead_seconds"] >= -1e-9
        assert s["escalation_rate"] == pytest.approx(np.mean([
            sum(st["tier"] > 0 for st in r["steps"]) / len(r["steps"]) if r["steps"] else 0.0
            for r in cells]))
        depth = max(len(r["steps"]) for r in cells)
        assert s["escalation_by_step"] == pytest.approx([
            np.mean([r["steps"][i]["tier"] > 0 for r in cells if len(r["steps"]) > i]) for i in range(depth)])
        assert s["speedup_vs_large"] == pytest.approx(
            np.mean([r["wall_seconds"] for r in large]) / walls.mean())
        assert s["cost_ratio_vs_large"] == pytest.approx(
            np.mean([r["cost"] for r in cells]) / np.mean([r["cost"] for r in large]))
    assert summary["policies"]["small"]["escalation_by_step"] == [0.0] * len(
        summary["policies"]["small"]["escalation_by_step"])
    assert summary["policies"]["large"]["escalation_rate"] == 1.0
    assert summary["policies"]["large"]["speedup_vs_large"] == pytest.approx(1.0)
    assert summary["problems_with_unknown_chars"] == 0 and summary["unknown_chars_known"] is True
    assert summary["policies"]["small"]["mean_seconds_per_tier"]["large"] == 0.0


def test_summary_of_hand_made_rows():
    """summarize_rows on rows written by hand: the figures are known without a model."""
    def row(pid, policy, correct, wall, tiers, seconds, cost):
        steps = [{"index": i, "text": "s\n", "author": ["small", "large"][t], "tier": t}
                 for i, t in enumerate(tiers)]
        return {"id": pid, "policy": policy, "correct": correct, "steps": steps,
                "tier_names": ["small", "large"], "tokens": {"prefill": [4, 2], "generated": [3, 1]},
                "seconds_per_tier": seconds, "cost": cost, "wall_seconds": wall,
                "escalation_rate": sum(tiers) / len(tiers), "stop_reason": "answer",
                "cap_intervened": False, "unknown_chars": {"p0": 2, "p1": 0}[pid]}
    rows = [row("p0", "large", True, 2.0, [1, 1], [0.0, 1.5], 10.0),
            row("p0", "cheap", False, 0.5, [0, 1], [0.1, 0.2], 4.0),
            row("p1", "large", True, 4.0, [1], [0.0, 3.0], 20.0),
            row("p1", "cheap", True, 1.5, [0, 0], [0.4, 0.0], 1.0),
            row("p1", "cheap", False, 9.0, [1], [9.0, 0.0], 99.0)]  # a duplicate: the first counts
    summary = summarize_rows(rows)
    cheap, large = summary["policies"]["cheap"], summary["policies"]["large"]
    assert summary["n_rows"] == 4 and summary["problems_with_unknown_chars"] == 1
    assert (cheap["n"], cheap["n_correct"], cheap["accuracy"]) == (2, 1, 0.5)
    assert cheap["wall_seconds"] == {"mean": 1.0, "p50": 1.0, "p95": pytest.approx(1.45)}
    assert cheap["speedup_vs_large"] == pytest.approx(3.0)  # 3.0 s / 1.0 s
    assert cheap["cost_ratio_vs_large"] == pytest.approx(2.5 / 15.0)
    assert cheap["escalation_rate"] == pytest.approx(0.25) and cheap["step_escalation_rate"] == 0.25
    assert cheap["escalation_by_step"] == [0.0, 0.5]
    assert cheap["mean_seconds_per_tier"] == {"small": pytest.approx(0.25), "large": pytest.approx(0.1)}
    assert cheap["mean_overhead_seconds"] == pytest.approx((0.2 + 1.1) / 2)
    assert large["mean_seconds_per_tier"] == {"small": 0.0, "large": 2.25}
    assert large["accuracy_ci95"][0] < 1.0 == large["accuracy"] == large["accuracy_ci95"][1]


def test_unknown_characters_are_counted_and_reported(pair, tmp_path):
    from tests.fakes import FakeBackend, counting_script

    assert unknown_characters(pair.models, "a=1;?a") == 0
    assert unknown_characters(pair.models, "Janet has 3 Apples. $\\frac{1}{2}$") == 10  # J A . $ \\ { } { } $
    assert unknown_characters([FakeBackend("f", 10, counting_script())], "Janet") is None  # no tokenizer
    problems = [("u0", "What is A+B? a=1;?a", "1"), ("u1", "a=2;?a", "2")]
    data = write_dataset(tmp_path / "d.jsonl", problems)
    summary = run_benchmark(pair, "jsonl", path=data, out_dir=tmp_path / "out", policies="small",
                            progress=False, plots=False, use_math_verify=False)
    rows = read_lines(tmp_path / "out" / "results.jsonl")
    assert {r["id"]: r["unknown_chars"] for r in rows} == {"u0": 3, "u1": 0}  # W A B
    assert summary["problems_with_unknown_chars"] == 1
    assert "1 of 2 problems contain characters" in (tmp_path / "out" / "summary.md").read_text()


def test_three_tiers_use_the_policy_gate_at_every_position(tiny_dirs, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", PROBLEMS[:1])
    summary = run_benchmark(tiny_cascade(tiny_dirs), "jsonl", path=data, out_dir=tmp_path / "out",
                            policies="large,small", progress=False, plots=False, use_math_verify=False)
    rows = read_lines(tmp_path / "out" / "results.jsonl")
    by_policy = {r["policy"]: r for r in rows}
    assert by_policy["large"]["steps"] and all(s["tier"] == 2 for s in by_policy["large"]["steps"])
    assert all(s["tier"] == 0 for s in by_policy["small"]["steps"])
    assert list(summary["policies"]["large"]["mean_tokens"]) == ["small", "medium", "large"]
    header = json.loads((tmp_path / "out" / "run.json").read_text())
    assert all(len(p["gates"]) == 2 for p in header["settings"]["policies"])


# ---- resume -------------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import sys, time
    from decoding import HFBackend
    from cascade import Cascade, SolveOptions
    from bench.harness import run_benchmark

    class Slow:
        # A backend that sleeps before each generation call, so the test can kill the run midway.
        def __init__(self, inner, delay):
            self.inner, self.delay, self.info = inner, delay, inner.info
        def next_steps(self, requests):
            time.sleep(self.delay)
            return self.inner.next_steps(requests)
        def __getattr__(self, name):
            return getattr(self.inner, name)

    if __name__ == "__main__":
        small, large, data, out = sys.argv[1:5]
        models = [Slow(HFBackend.from_pretrained(p, step_delimiter="\\n"), 0.04) for p in (small, large)]
        cascade = Cascade(models=models, options=SolveOptions(max_steps=3, max_step_tokens=6))
        run_benchmark(cascade, "jsonl", path=data, out_dir=out, policies="small,large,confidence",
                      progress=False, plots=False, use_math_verify=False)
""")


def test_resume_after_a_kill_loses_and_duplicates_nothing(tiny_dirs, tmp_path, capsys):
    problems = [(f"q{i}", f"a={i};b=a+{i + 1};?b", str(2 * i + 1)) for i in range(8)]
    data = write_dataset(tmp_path / "d.jsonl", problems)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, str(script), tiny_dirs[0], tiny_dirs[2], str(data), str(out)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # hang guard; the loop leaves as soon as 4 rows are in
        while time.monotonic() < deadline and process.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 4:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    before = results.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    killed_rows = [json.loads(line) for line in complete.decode().splitlines()]
    total = len(problems) * 3
    assert 4 <= len(killed_rows) < total
    # The kill may also land in the middle of a write: a half-written last line.
    last = complete.decode().splitlines()[-1]
    results.write_bytes(complete + last[: len(last) // 2].encode())
    assert len(load_results(results)) == len(killed_rows)  # the partial line is not a row

    pair = tiny_cascade([tiny_dirs[0], tiny_dirs[2]])
    summary = run_benchmark(pair, "jsonl", path=data, out_dir=out, policies="small,large,confidence",
                            progress=False, plots=False, use_math_verify=False)
    err = capsys.readouterr().err
    assert f"{len(killed_rows)} of {total}" in err and "trimmed a partial last line" in err
    after = results.read_bytes()
    assert after.startswith(complete)  # nothing written before the kill changed
    rows = read_lines(results)  # every line whole, valid JSON
    keys = [(r["id"], r["policy"]) for r in rows]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {(pid, p) for pid, _, _ in problems for p in ("small", "large", "confidence")}
    assert summary["n_rows"] == total
    header = json.loads((out / "run.json").read_text())
    assert len(header["sessions"]) == 2 and header["sessions"][1]["skipped"] == len(killed_rows)
    assert header["sessions"][1]["finished"] and not header["sessions"][0]["finished"]

    # A third run finds everything done: no solve, nothing appended.
    run_benchmark(pair, "jsonl", path=data, out_dir=out, policies="small,large,confidence",
                  progress=False, plots=False, use_math_verify=False)
    assert results.read_bytes() == after


def test_refuses_to_resume_with_other_settings(pair, tiny_dirs, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", PROBLEMS)
    out = tmp_path / "out"
    common = dict(path=data, out_dir=out, progress=False, plots=False, use_math_verify=False)
    run_benchmark(pair, "jsonl", policies="small", limit=1, **common)
    results, run_json = (out / "results.jsonl").read_bytes(), (out / "run.json").read_bytes()
    swapped = tiny_cascade([tiny_dirs[1], tiny_dirs[2]])
    for cascade, kwargs, key in [(pair, dict(policies="small,large", limit=1), "policies"),
                                 (pair, dict(policies="small", limit=2), "limit"),
                                 (pair, dict(policies="small", limit=1, budget=50.0), "budget"),
                                 (swapped, dict(policies="small", limit=1), "models")]:
        with pytest.raises(BenchError, match="other settings") as error:
            run_benchmark(cascade, "jsonl", **kwargs, **common)
        assert f"{key}:" in str(error.value)
        assert (out / "results.jsonl").read_bytes() == results and (out / "run.json").read_bytes() == run_json
    # a changed dataset file under the same name is another dataset
    write_dataset(data, [("p0", "a=2;b=a+2;?b", "4")] + PROBLEMS[1:])
    with pytest.raises(BenchError, match="examples_sha256"):
        run_benchmark(pair, "jsonl", policies="small", limit=1, **common)


def test_calibrated_at_several_budgets_in_one_run(pair, bench_run, tmp_path):
    """calibrated@B: each policy looks its threshold up for its own B and is capped at it,
    so one run holds a calibration at several budgets (no --budget for the others)."""
    _, _, calib = bench_run
    calib_path = calib.save(tmp_path / "calib.json")
    data = write_dataset(tmp_path / "data.jsonl", PROBLEMS[:2])
    policies = ["small", "calibrated@10", "calibrated@300"]
    run_benchmark(pair, "jsonl", path=data, out_dir=tmp_path / "out", policies=policies,
                  calibration=calib_path, command="test-run", progress=False, use_math_verify=False)
    rows = read_lines(tmp_path / "out" / "results.jsonl")
    assert {r["policy"] for r in rows} == set(policies)
    for row in rows:
        own = {"small": None, "calibrated@10": 10.0, "calibrated@300": 300.0}[row["policy"]]
        assert row["budget"] == own
        if own is not None:
            assert row["cost"] <= own + 1e-9
    gates = {p["name"]: p["gates"] for p in json.loads((tmp_path / "out" / "run.json").read_text())
             ["settings"]["policies"]}
    for budget in (10.0, 300.0):
        described = gates[f"calibrated@{budget:g}"]
        assert f"threshold={calib.gates_for(budget)[0].threshold}" in described[0]
        assert described[-1] == f"budget={budget:g}"


def test_policy_errors(pair, tmp_path):
    from bench.harness import POLICY_NAMES

    assert {"small", "large", "confidence", "verify", "oracle", "calibrated"} <= set(POLICY_NAMES)
    valid = ", ".join(POLICY_NAMES)
    with pytest.raises(BenchError, match=f"unknown policy 'fast'.*{valid}"):
        parse_policies("small,fast", dataset="gsm8k")
    with pytest.raises(BenchError, match="only with --dataset embedded"):
        parse_policies("small,oracle", dataset="jsonl")
    with pytest.raises(BenchError, match="--calibration"):
        parse_policies("calibrated", dataset="gsm8k", budget=10)
    with pytest.raises(BenchError, match="--budget"):
        parse_policies("calibrated", dataset="gsm8k", calibration="c.json")
    assert parse_policies("calibrated@60", dataset="gsm8k", calibration="c.json")[0].budget == 60.0
    for bad in ("calibrated@-1", "calibrated@x", "calibrated@inf"):
        with pytest.raises(BenchError, match="takes a budget"):
            parse_policies(bad, dataset="gsm8k", calibration="c.json")
    with pytest.raises(BenchError, match="takes no threshold"):
        parse_policies("small@0.3", dataset="gsm8k")
    with pytest.raises(BenchError, match="not a number"):
        parse_policies("confidence@x", dataset="gsm8k")
    with pytest.raises(BenchError, match="named twice"):
        parse_policies("confidence@0.50,confidence@0.5", dataset="gsm8k")
    specs = parse_policies(" small, confidence, confidence@0.30 ,verify@1", dataset="embedded", threshold=0.7)
    assert [(s.label, s.kind, s.threshold) for s in specs] == [
        ("small", "small", None), ("confidence", "confidence", 0.7), ("confidence@0.3", "confidence", 0.3),
        ("verify@1", "verify", 1.0)]
    assert [s.label for s in parse_policies("oracle", dataset="embedded")] == ["oracle"]
    # the harness checks before it writes anything
    data = write_dataset(tmp_path / "d.jsonl", PROBLEMS)
    for policies, message in [("small,bogus", "unknown policy"), ("oracle", "embedded")]:
        with pytest.raises(BenchError, match=message):
            run_benchmark(pair, "jsonl", path=data, out_dir=tmp_path / "out", policies=policies,
                          progress=False)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "policy": "small"}\nnot json\n{"id": "b", "policy": "small"}\n')
    with pytest.raises(BenchError, match="line 2"):
        load_results(path)
    path.write_text('{"id": "a", "policy": "small"}\n{"id": "b", "pol')
    assert [r["id"] for r in load_results(path, repair=True)] == ["a"]
    assert path.read_text() == '{"id": "a", "policy": "small"}\n'


# ---- the CLI ------------------------------------------------------------------------------

def test_cli_bench_end_to_end_and_resume(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["bench", "--dataset", "embedded", "--limit", "2",
            "--policies", "small,large,confidence@0.3,oracle",
            "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n", "--max-steps", "3",
            "--max-step-tokens", "6", "--budget", "300", "--backend", "hf", "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| oracle |" in captured.out and "wrote" in captured.out
    assert "bench: 8/8 solves" in captured.err and "eta" in captured.err  # progress on stderr
    assert "[####################] 100%" in captured.err and "[##------------------] 12%" in captured.err
    rows = read_lines(out / "results.jsonl")
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"embedded"}
    assert {r["policy"] for r in rows} == {"small", "large", "confidence@0.3", "oracle"}
    assert all(isinstance(r["correct"], bool) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("cascade bench --dataset embedded")
    assert "--budget 300" in summary["command"]
    assert "--delimiter $'\\n'" in summary["command"]  # one line, pasteable into bash
    assert summary["tiny_model_note"] is False
    assert all((out / name).stat().st_size > 0 for name in PLOT_FILES)
    assert main(argv) == 0  # the same command again: resumes, all done
    assert "8 of 8" in capsys.readouterr().err
    assert len(read_lines(out / "results.jsonl")) == 8


def test_cli_bench_start_runs_the_rest_of_a_range_into_its_own_directory(tiny_dirs, tmp_path, capsys):
    """--start K: a second process takes problems K.. of the first --limit; the two
    directories hold disjoint problems that together are the range, and resume on their own."""
    common = ["bench", "--dataset", "embedded", "--limit", "3", "--policies", "small,large",
              "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n", "--max-steps", "2",
              "--max-step-tokens", "4", "--backend", "hf"]
    assert main([*common, "-o", str(tmp_path / "all")]) == 0
    assert main([*common, "--start", "2", "-o", str(tmp_path / "rest")]) == 0
    whole = {(r["id"], r["policy"]): r["predicted"] for r in read_lines(tmp_path / "all" / "results.jsonl")}
    rest = {(r["id"], r["policy"]): r["predicted"] for r in read_lines(tmp_path / "rest" / "results.jsonl")}
    third = sorted({pid for pid, _ in whole})[2:]
    assert sorted({pid for pid, _ in rest}) == third and all(whole[key] == rest[key] for key in rest)
    assert "--start 2" in json.loads((tmp_path / "rest" / "summary.json").read_text())["command"]
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "rest")]) == 2  # the directory remembers its start
    assert "start" in capsys.readouterr().err
    assert main([*common, "--start", "3", "-o", str(tmp_path / "none")]) == 2
    assert "start must be an integer in [0, 3)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--backend", "openai"], "needs --endpoints"),
    (["--policies", "small,turbo"], "valid policies: small, large"),
    (["--dataset", "jsonl", "--policies", "oracle"], "only with --dataset embedded"),
    (["--gate", "confidence"], "--policies"),
])
def test_cli_bench_errors_are_one_clear_line(tiny_dirs, tmp_path, capsys, extra, message):
    argv = ["bench", "--small", "/no/such/model", "--large", "/no/such/model", "-o", str(tmp_path / "o"),
            *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("cascade bench: error:")


def test_cli_bench_template_sets_prompt_and_delimiter(tiny_dirs, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl", PROBLEMS[:1])
    out = tmp_path / "plain"
    argv = ["bench", "--dataset", "jsonl", "--path", str(data), "--policies", "small",
            "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--template", "plain", "--max-steps", "2",
            "--max-step-tokens", "4", "--no-math-verify", "-o", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    header = json.loads((out / "run.json").read_text())
    from bench.prompts import get_template

    plain = get_template("plain")
    assert header["settings"]["prompt_templates"] == [plain.format, plain.format]
    assert header["settings"]["delimiter"] == plain.delimiter == "\n\n"  # the template's delimiter
    assert "--template plain" in header["command"]
    # --delimiter given explicitly wins over the template's
    argv_nl = [*argv[:-1], str(tmp_path / "nl"), "--delimiter", "\n"]
    assert main(argv_nl) == 0
    assert json.loads((tmp_path / "nl" / "run.json").read_text())["settings"]["delimiter"] == "\n"


@pytest.mark.parametrize("argv,message", [
    (["--template", "qwen25-math-cot"], "needs --small/--large"),
    (["--template", "embedded", "--small", "/no/such/a", "--large", "/no/such/b"],
     "leave out --small/--large"),
    (["--template", "qwen", "--small", "/no/such/a", "--large", "/no/such/b"],
     "valid templates: qwen25-math-cot, plain, chat, embedded"),
])
def test_cli_bench_template_errors(tmp_path, capsys, argv, message):
    assert main(["bench", "-o", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_bench_openai_backend_against_fake_servers(tmp_path, capsys):
    """--backend openai end to end: the embedded pair's directories give tokenizers, sizes and
    fingerprints; two fake OpenAI-compatible servers (one per model) write the steps."""
    from tests.fake_openai import FakeState, running_fake

    data = write_dataset(tmp_path / "d.jsonl", [("o0", "a=1;b=a+2;?b", "7"), ("o1", "a=2;?a", "8")])
    out = tmp_path / "openai"
    # (the fakes see token ids, not text: each answers at once, small "7", large "8")
    with running_fake(FakeState(step="#### 7")) as (small_url, small_state), \
            running_fake(FakeState(step="#### 8")) as (large_url, large_state):
        argv = ["bench", "--dataset", "jsonl", "--path", str(data), "--policies", "small,large,verify@0.5",
                "--backend", "openai", "--endpoints", small_url, "--endpoints", large_url,
                "--served-models", "s,l", "--no-math-verify", "-o", str(out)]
        assert main(argv) == 0
    capsys.readouterr()
    rows = read_lines(out / "results.jsonl")
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    by = {(r["id"], r["policy"]): r for r in rows}
    assert by["o0", "small"]["predicted"] == "7" and by["o0", "small"]["correct"] is True
    assert by["o1", "small"]["correct"] is False
    assert by["o1", "large"]["predicted"] == "8" and by["o1", "large"]["correct"] is True
    assert [(s["text"], s["tier"]) for s in by["o0", "large"]["steps"]] == [("#### 8", 1)]
    assert {b["model"] for b in small_state.bodies} == {"s"}
    assert {b["model"] for b in large_state.bodies} == {"l"}
    assert any(b.get("echo") for b in large_state.bodies)  # verify scored the drafts on the large server
    header = json.loads((out / "run.json").read_text())
    assert [m["name"] for m in header["settings"]["models"]] == ["embedded:small", "embedded:large"]
    assert f"--endpoints {small_url} --endpoints {large_url}" in header["command"]
    assert all(r["unknown_chars"] == 0 for r in rows)  # the local tokenizers are used
    # the embedded pair off its own task: the note says accuracy is not informative, though 50 % here
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["small"]["accuracy"] == 0.5 and summary["tiny_model_note"] is True
    assert "proves the path end to end" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--backend", "tgi"], "unknown backend 'tgi'; valid backends: hf, vllm, openai"),
    (["--backend", "openai"], "needs --endpoints"),
    (["--backend", "openai", "--endpoints", "http://127.0.0.1:9"], "given 1 time(s) for 2 models"),
    (["--endpoints", "http://127.0.0.1:9"], "are for --backend openai"),
])
def test_cli_bench_backend_errors(tmp_path, capsys, argv, message):
    assert main(["bench", "--policies", "small", "--limit", "1", "-o", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bench_vllm_backend_wiring(tmp_path, capsys, monkeypatch):
    """--backend vllm builds one VLLMBackend per model with the paths, names, delimiter,
    template, dtype, memory shares and length asked for (vLLM itself stood in for by the
    HF backend: starting engines is test_vllm.py's job)."""
    import decoding
    from cascade import embedded_path

    calls = []

    def fake_from_pretrained(path, *, name, dtype, gpu_memory_utilization, max_model_len, step_delimiter,
                             prompt_template):
        calls.append((str(path), name, dtype, gpu_memory_utilization, max_model_len, step_delimiter,
                      prompt_template))
        return HFBackend.from_pretrained(path, step_delimiter=step_delimiter, name=name)

    monkeypatch.setattr(decoding, "VLLMBackend", SimpleNamespace(from_pretrained=fake_from_pretrained),
                        raising=False)
    argv = ["bench", "--limit", "1", "--policies", "small", "--backend", "vllm", "--gpu-memory", "0.2,0.7",
            "--dtype", "bfloat16", "--max-model-len", "1024", "-o", str(tmp_path / "v")]
    assert main(argv) == 0
    capsys.readouterr()
    assert calls == [(str(embedded_path("small")), "embedded:small", "bfloat16", 0.2, 1024, "\n", None),
                     (str(embedded_path("large")), "embedded:large", "bfloat16", 0.7, 1024, "\n", None)]
    header = json.loads((tmp_path / "v" / "run.json").read_text())
    assert "--backend vllm" in header["command"] and "--gpu-memory 0.2,0.7" in header["command"]
    assert header["settings"]["options"]["max_steps"] == 16  # the embedded pair's own step limits
    assert main([*argv[:-2], "--gpu-memory", "0.5", "-o", str(tmp_path / "w")]) == 2
    assert "--gpu-memory gives 1 fractions for 2 models" in capsys.readouterr().err


def test_recorded_bench_command_keeps_switches():
    """run.json's command must rerun the benchmark as it ran: switch flags included."""
    from app.cli import bench_command, build_parser

    argv = ["bench", "--dataset", "embedded", "--policies", "small,verify-fix@0.3", "--isolate",
            "--draft-ahead", "--no-math-verify", "-o", "out"]
    command = bench_command(build_parser().parse_args(argv))
    assert command.split()[1:] and all(flag in command.split() for flag in
                                       ("--isolate", "--draft-ahead", "--no-math-verify"))
    assert "--isolate" not in bench_command(build_parser().parse_args(argv[:5] + ["-o", "out"]))


def test_recorded_bench_command_does_not_name_a_backend_that_did_not_run():
    """A .gguf run under the default backend runs on llama.cpp: the recorded command must
    not say "--backend hf" (it once did), and an explicit other backend is kept."""
    from app.cli import bench_command, build_parser

    argv = ["bench", "--dataset", "gsm8k", "--small", "s.gguf", "--large", "l.gguf", "-o", "out"]
    assert "--backend" not in bench_command(build_parser().parse_args(argv))
    assert "--backend llamacpp" in bench_command(build_parser().parse_args([*argv, "--backend", "llamacpp"]))


def test_a_resolve_policy_row_keeps_the_steps_its_re_solve_replaced(pair, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", [("r0", "a=2;b=a+3;?b", "5")])
    run_benchmark(pair, "jsonl", path=data, out_dir=tmp_path / "out", progress=False, plots=False,
                  policies="small,confidence:mean_prob:resolve@0.0", use_math_verify=False)
    rows = {r["policy"]: r for r in read_lines(tmp_path / "out" / "results.jsonl")}
    resolved = rows["confidence:mean_prob:resolve@0"]  # threshold 0: the first draft is doubted
    assert [s["author"] for s in resolved["set_aside"]] == ["small"]
    assert resolved["set_aside"][0]["text"] == rows["small"]["steps"][0]["text"]
    assert {s["author"] for s in resolved["steps"]} == {"large"} and rows["small"]["set_aside"] == []
