"""The `cascade` command line on tiny models: trace printing, JSON, errors, calibrate."""

from __future__ import annotations

import json

import pytest

from app.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_solve_prints_a_trace(capsys, tiny_dirs):
    code, out, _ = run(capsys, "solve", "a=1;b=a+2;?b", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                       "--delimiter", "\n", "--max-steps", "3", "--max-step-tokens", "6", "--budget", "50")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[-2].startswith("answer:") and lines[-1].startswith("cost:")
    assert all(line.split()[0] in ("small", "large") for line in lines[:-2])
    assert "of budget 50" in lines[-1]


def test_solve_in_resolve_mode_prints_what_the_re_solve_replaced(capsys, tiny_dirs):
    code, out, _ = run(capsys, "solve", "a=1;b=a+2;?b", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
                       "--delimiter", "\n", "--max-steps", "3", "--max-step-tokens", "6",
                       # threshold 0: the first draft is doubted
                       "--gate", "confidence", "--mode", "resolve", "--threshold", "0")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "set aside (1 steps, re-solved by large):" and lines[1].split()[0] == "small"
    assert all(line.split()[0] == "large" for line in lines[2:-2])


def test_solve_json_is_the_result(capsys, tiny_dirs):
    code, out, _ = run(capsys, "solve", "a=1;?a", "--models", f"{tiny_dirs[0]},{tiny_dirs[1]},{tiny_dirs[2]}",
                       "--delimiter", "\n", "--max-steps", "2", "--max-step-tokens", "4", "--json",
                       "--gate", "confidence", "--threshold", "0.5")
    assert code == 0
    result = json.loads(out)
    assert result["tier_names"] == ["small", "medium", "large"]
    assert result["cost"]["total"] == pytest.approx(sum(s["cost"] for s in result["steps"]))


def test_isolate_runs_upper_tiers_in_processes_with_the_same_result(capsys, tiny_dirs):
    argv = ["solve", "a=1;b=a+2;?b", "--models", f"{tiny_dirs[0]},{tiny_dirs[1]},{tiny_dirs[2]}",
            "--delimiter", "\n", "--max-steps", "3", "--max-step-tokens", "6", "--json",
            "--gate", "confidence", "--threshold", "0.5"]
    code, alone, _ = run(capsys, *argv)
    code_isolated, isolated, _ = run(capsys, *argv, "--isolate")
    assert code == code_isolated == 0

    def steps(out):  # timings differ between runs and are not compared
        return [(s["text"], s["author"], s["cost"]) for s in json.loads(out)["steps"]]
    assert steps(alone) == steps(isolated) and any(a != "small" for _, a, _ in steps(alone))


@pytest.mark.parametrize("argv,message", [
    (["--budget", "-5"], "budget"),
    (["--small", "/no/such/model", "--large", "/no/such/model"], "no model at"),
    (["--small", "x"], "go together"),
    (["--gate", "confidence", "--signal", "vibes", "--small", "S", "--large", "S"], "signal"),
    (["--gate", "confidence", "--rewrite", "token", "--small", "S", "--large", "S"], "--rewrite"),
])
def test_solve_errors_are_one_clear_line(capsys, tiny_dirs, argv, message):
    argv = [tiny_dirs[0] if a == "S" else a for a in argv]
    code, out, err = run(capsys, "solve", "a=1;?a", "--delimiter", "\n", *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_empty_problem_is_rejected(capsys, tiny_dirs):
    code, _, err = run(capsys, "solve", "  ", "--small", tiny_dirs[0], "--large", tiny_dirs[2])
    assert code == 2 and "problem is empty" in err


def test_calibrate_writes_a_loadable_file_and_resumes(capsys, tiny_dirs, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"a={i};?a"}) + "\n" for i in range(25)))
    argv = ["calibrate", "--problems", str(problems), "--budgets", "5,50,500", "--alpha", "0.3",
            "--delta", "0.3", "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n",
            "--max-steps", "2", "--max-step-tokens", "4", "--thresholds", "0.9,0.5,0.1",
            "-o", str(tmp_path / "c.json")]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "wrote" in out
    from cascade import Calibration
    first = Calibration.load(tmp_path / "c.json")
    code, _, err = run(capsys, *argv)
    assert code == 0 and "resuming: 25 problems" in err
    assert Calibration.load(tmp_path / "c.json").entries == first.entries
    # The sweep forks sessions; with the large model in a process of its own it certifies
    # the same thresholds.
    isolated = [a if a != str(tmp_path / "c.json") else str(tmp_path / "i.json") for a in argv]
    code, _, _ = run(capsys, *isolated, "--isolate")
    assert code == 0 and Calibration.load(tmp_path / "i.json").entries == first.entries


def test_verify_with_token_rewrite_and_draft_ahead_from_the_command_line(capsys, tiny_dirs):
    """--rewrite token --draft-ahead reach the gate and the solve options: threshold 0 rejects
    every draft, so the steps are the large model's own (as with --gate always-large)."""
    common = ["solve", "a=1;b=a+2;?b", "--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n",
              "--max-steps", "3", "--max-step-tokens", "6", "--json"]
    code, fixed, _ = run(capsys, *common, "--gate", "verify", "--threshold", "0", "--rewrite", "token",
                         "--draft-ahead")
    code_large, large, _ = run(capsys, *common, "--gate", "always-large")
    assert code == code_large == 0
    fixed, large = json.loads(fixed), json.loads(large)
    assert [s["text"] for s in fixed["steps"]] == [s["text"] for s in large["steps"]]
    assert any(len(s["decisions"]) > 1 for s in fixed["steps"])  # corrected, then drafted on


def test_calibrate_curve_reports_every_method_at_every_budget(capsys, tiny_dirs, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"a={i};b=a+{i % 3};?b"}) + "\n" for i in range(14)))
    argv = ["calibrate", "--curve", "--problems", str(problems), "--fit-problems", "4", "--budgets", "5,60",
            "--alpha", "0.3", "--delta", "0.3", "--small", tiny_dirs[0], "--large", tiny_dirs[2],
            "--delimiter", "\n", "--max-steps", "3", "--max-step-tokens", "4", "--thresholds", "1,0.5,0",
            "-o", str(tmp_path / "curve.json")]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "Accuracy-budget curve" in out
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["n_problems"] == 10 and curve["fit_problems"] == 4 and curve["budgets"] == [5.0, 60.0]
    points = {(p["method"], p["budget"]) for p in curve["points"]}
    assert points == {(m, b) for m in ("budget", "resolve", "risk", "conformal", "ltt") for b in (5.0, 60.0)}
    for p in curve["points"]:
        if p["index"] is not None:  # a certified point names its policy and what it promises
            family, threshold, cap = curve["candidates"][p["index"]]
            assert p["threshold"] == threshold and p["cap"] == cap and p["statement"]
            assert 0.0 <= p["agreement"] <= 1.0
            if p["method"] in ("budget", "resolve"):
                assert family == p["method"] and cap == pytest.approx(3.0 * p["budget"])
        else:
            assert p["reason"]


@pytest.mark.parametrize("extra,message", [
    (["--method", "conformal"], "--curve calibrates every method"),
    (["--fit-problems", "13"], "needs more than --fit-problems 13"),
    (["--budgets", "5,-1"], "budget"),
])
def test_calibrate_curve_errors_are_one_clear_line(capsys, tiny_dirs, tmp_path, extra, message):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"a={i};?a"}) + "\n" for i in range(14)))
    code, _, err = run(capsys, "calibrate", "--curve", "--problems", str(problems), "--small", tiny_dirs[0],
                       "--large", tiny_dirs[2], "--delimiter", "\n", *extra, "-o", str(tmp_path / "c.json"))
    assert code == 2 and message in err and "Traceback" not in err


def _curve_file(capsys, tiny_dirs, tmp_path, model_flags):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"a={i};b=a+{i % 3};?b"}) + "\n" for i in range(12)))
    code, _, err = run(capsys, "calibrate", "--curve", "--problems", str(problems), "--fit-problems", "4",
                       "--budgets", "5,60", "--alpha", "0.3", "--delta", "0.3", *model_flags,
                       "--thresholds", "1,0.5,0", "-o", str(tmp_path / "curve.json"))
    assert code == 0, err
    return tmp_path / "curve.json"


def test_bench_curve_measures_every_certified_point_as_an_independent_run(capsys, tiny_dirs, tmp_path):
    """bench --curve reads each point off one sweep of the test problems; each certified policy,
    run on its own under its cap, costs and answers the same."""
    from app.cli import build_parser
    from app.options import build_runner
    from cascade.budget import load_budget_curve

    model_flags = ["--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n", "--max-steps", "3",
                   "--max-step-tokens", "4"]
    curve_path = _curve_file(capsys, tiny_dirs, tmp_path, model_flags)
    labelled = tmp_path / "test.jsonl"
    labelled.write_text("".join(json.dumps({"problem": f"a={i};b=a+1;?b", "answer": str(i + 1)}) + "\n"
                                for i in range(5)))
    argv = ["bench", "--curve", str(curve_path), "--dataset", "jsonl", "--path", str(labelled), *model_flags,
            "-o", str(tmp_path / "out")]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert "Accuracy vs budget" in out and (tmp_path / "out" / "budget_curve.png").stat().st_size > 10_000
    curve = json.loads(curve_path.read_text())
    assert [(p["method"], p["budget"]) for p in report["points"]] == [
        (p["method"], p["budget"]) for p in curve["points"]]
    assert report["command"].startswith("cascade bench --dataset jsonl") and "--curve" in report["command"]
    assert "--policies" not in report["command"]  # the curve's policies ran, not the default list
    runner = build_runner(build_parser().parse_args(argv), gates=False)
    loaded = load_budget_curve(curve_path, models=runner.models)
    problems = [f"a={i};b=a+1;?b" for i in range(5)]
    certified = [p for p in report["points"] if p["index"] is not None]
    assert {p["method"] for p in certified} >= {"budget", "resolve"}
    for point in certified:
        gates, cap = loaded.policy(point["method"], point["budget"])
        results = runner.solve_many(problems, cap, gates=gates)
        assert point["test_mean_cost"] == pytest.approx(sum(r.cost.total for r in results) / 5, rel=1e-9)
        if cap is not None:
            assert all(r.cost.total <= cap + 1e-9 for r in results)
    # Each family paced online: the report's row is what a PacedPolicy serving the problems in
    # order through the runtime does (same mean cost, accuracy and ceiling).
    assert {(p["method"], p["budget"]) for p in report["paced"]} == {
        (m, b) for m in ("budget", "resolve") for b in curve["budgets"]}
    for row in report["paced"]:
        live = loaded.paced(row["method"], row["budget"])
        right = 0
        for i, problem in enumerate(problems):
            gates, cap = live.policy()
            result = runner.solve(problem, cap, gates=gates)
            assert result.cost.total <= cap + 1e-9
            right += result.answer == str(i + 1)
            live.observe(result)
        assert row["test_mean_cost"] == pytest.approx(live.mean_cost, rel=1e-9)
        assert row["ceiling"] == pytest.approx(live.bound(), rel=1e-9)
        assert live.mean_cost <= live.bound() + 1e-9
        assert row["test_accuracy"] == pytest.approx(right / 5)
    # Resumable: the sweep's rows are in -o; a run cut short (rows lost) picks up where it stopped
    # and reports the same points.
    rows = {f: tmp_path / "out" / f"curve.sweep.{f}.jsonl" for f in ("budget", "resolve")}
    assert all(len(path.read_text().splitlines()) == 1 + 5 for path in rows.values())
    rows["budget"].write_text("".join(rows["budget"].read_text().splitlines(keepends=True)[:3]))
    rows["resolve"].unlink()
    assert run(capsys, *argv)[0] == 0
    again = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert again["points"] == report["points"] and again["oracle"] == report["oracle"]
    assert again["paced"] == report["paced"]
    for entry in report["oracle"]:  # the oracle is the upper line of every certified point within B
        within = [p["test_accuracy"] for p in certified
                  if p["budget"] == entry["budget"] and p["test_mean_cost"] <= entry["budget"]]
        if within:
            assert entry["oracle"]["test_accuracy"] >= max(within)


def test_bench_curve_errors_are_one_clear_line(capsys, tiny_dirs, tmp_path):
    model_flags = ["--small", tiny_dirs[0], "--large", tiny_dirs[2], "--delimiter", "\n", "--max-steps", "3",
                   "--max-step-tokens", "4"]
    curve_path = _curve_file(capsys, tiny_dirs, tmp_path, model_flags)
    common = ["bench", "--dataset", "embedded", "--limit", "2", "-o", str(tmp_path / "out")]
    broken = tmp_path / "broken.json"
    broken.write_text(curve_path.read_text()[:50])
    cases = [([*common, "--curve", str(curve_path), "--policies", "small", *model_flags], "drop --policies"),
             ([*common, "--curve", str(tmp_path / "none.json"), *model_flags], "no accuracy-budget curve at"),
             ([*common, "--curve", str(broken), *model_flags], "cannot read the accuracy-budget curve"),
             # other models than the curve was calibrated for
             ([*common, "--curve", str(curve_path), "--small", tiny_dirs[1], "--large", tiny_dirs[2],
               "--delimiter", "\n"], "was calibrated for models")]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
