"""bench.budget_curve: the gate whose score the curve's policies use is recorded in the plan,
and a later stage run with another gate is refused (its sweeps would mix two gates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.budget_curve import main

ROUTER = Path(__file__).resolve().parents[2] / "bench" / "results" / "gates" / "router.pt"


def test_the_plan_records_its_gate_and_refuses_another(tmp_path):
    out = tmp_path / "curve"
    small = ["--n-fit", "2", "--n-pilot", "2", "--budgets", "3", "--thresholds", "3", "--out", str(out)]
    main(["--stage", "prepare", *small, "--router", str(ROUTER)])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inner"].startswith("AdvantageGate(router=Router(models=['embedded:small', 'embedded:large']")
    assert len(plan["gate"]["score_quantiles"]) == 101 and len(plan["budgets"]) == 3
    with pytest.raises(SystemExit, match="was prepared for the gate AdvantageGate"):
        main(["--stage", "sweep", "--split", "test", "--n-test", "2", *small])  # no --router: ConfidenceGate


RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_overlay_adds_the_resolve_family_and_refuses_other_budgets(tmp_path):
    out = tmp_path / "curve"
    out.mkdir()
    (out / "report.json").write_text((RESULTS / "budget_curve" / "report.json").read_text())
    probe = RESULTS / "resolve_probe_cap6" / "report.json"
    report = main(["--stage", "overlay", "--out", str(out), "--resolve-report", str(probe)])
    family = report["resolve"][0]
    assert family["cap_factor"] == 6.0 and len(family["rows"]) == len(report["budgets"])
    expected = json.loads(probe.read_text())["splits"]["test"]["rows"]
    certified = [r for r in family["rows"] if "test_accuracy" in r]
    assert certified and [r["test_accuracy"] for r in certified] == [
        r["certified"]["test_accuracy"] for r in expected if "certified" in r]
    # The label-using bars of the re-solve family (same columns, same cap) come along.
    assert [r["bars"] for r in family["rows"]] == [r["bars"] for r in expected]
    assert expected[3]["bars"]["labelled_certified"]["test_accuracy"] > 0
    text = (out / "report.md").read_text()
    assert "Problem-level re-solve" in text and "hard cap 6 x B" in text
    assert "re-solve columns: labelled choice on cal., same guarantee" in text
    assert report["overlay_command"] == f"python -m bench.budget_curve --stage overlay --out {out} " \
        f"--resolve-report {probe}"  # the call's own arguments, not the test runner's
    assert (out / "budget_curve.png").stat().st_size > 10_000
    shifted = json.loads(probe.read_text())
    shifted["splits"]["test"]["rows"][1]["budget"] += 1.0
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    with pytest.raises(SystemExit, match="was certified at the budgets"):
        main(["--stage", "overlay", "--out", str(out), "--resolve-report", str(tmp_path / "shifted.json")])
    with pytest.raises(SystemExit, match="needs at least one --resolve-report"):
        main(["--stage", "overlay", "--out", str(out)])
