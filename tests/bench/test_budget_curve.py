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
