"""The step loop's behaviour is pinned: traces of the embedded models under every mechanism
(tests/step_traces.py) match the committed record, call by call."""

from __future__ import annotations

import json
import math
from pathlib import Path

import step_traces

GOLDEN = Path(__file__).parent / "data" / "step_traces.json"
N = 3  # problems per policy checked here; `python -m tests.step_traces` records 30


def _same(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        # The floats (probabilities, entropies, scores and costs derived from them) come out of
        # float32 kernels whose summation order differs with the CPU's vector unit and library
        # build: a re-install on another machine moved an entropy by 4e-6 and a verify score of
        # 1.08e-4 by 1.1e-3 relative (1e-3 nats). 2e-3 relative stays far below the spacing of
        # any gate threshold; texts, token ids, authors and decisions are compared exactly.
        assert math.isclose(a, b, rel_tol=2e-3, abs_tol=1e-6), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for k, (x, y) in enumerate(zip(a, b, strict=False)):
            _same(x, y, f"{where}[{k}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_every_policy_traces_as_recorded():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(step_traces.policies())
    now = step_traces.record(N)
    for name, rows in now.items():
        _same(rows, golden[name][:N], name)


def test_the_record_takes_every_path():
    golden = json.loads(GOLDEN.read_text())
    results = {name: [r["result"] for r in rows if "result" in r] for name, rows in golden.items()}
    steps = {name: [s for r in rs for s in r["steps"]] for name, rs in results.items()}
    assert any(r["cap_intervened"] for r in results["confidence-capped"])
    assert any(r["degraded"] for r in results["degrade-verify-fix-ahead"])
    assert all("error" in r for r in golden["fail-verify"][:N])
    # the middle tier's route gate judged a probe, and the medium model finished it (probe + rest)
    assert any(d["tier"] == 1 for s in steps["three-tier-route"] for d in s["decisions"])
    assert any(len(row["calls"]["medium"]) >= 2 for row in golden["three-tier-route"])
    assert any(s["drafts"] for s in steps["verify-fix-ahead"])
    # A token fix: the small model drafts again from within a step (a context not ending in
    # the delimiter), after the large model's correction.
    calls = [c for row in golden["verify-fix-ahead"] for c in row["calls"]["small"]]
    assert any(c[0] == "step" and c[1] and not c[1].endswith("\n") for c in calls)
    assert any(0 < r["escalation_rate"] < 1 for r in results["advantage"])
