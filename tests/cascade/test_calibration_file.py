"""Calibration files are checked field by field when read: an edited file whose checksum was
recomputed is still refused when a value has the wrong type or lies out of range, with a
clear `CalibrationFileError`, never a raw traceback later on."""

from __future__ import annotations

import hashlib
import json

import pytest

from cascade import Calibration, CalibrationFileError, ConfidenceGate, ConfigError


def _calibration() -> Calibration:
    return Calibration(
        gate_specs=({"type": "confidence", "signal": "min_prob", "mode": "speculate", "probe_tokens": 4},),
        models=({"name": "s", "fingerprint": "a"}, {"name": "l", "fingerprint": "b"}),
        alpha=0.1, delta=0.05, n=30, method="ltt", objective="agreement",
        candidates=((0.9,), (0.5,)),
        entries=({"budget": 10.0, "index": 1, "thresholds": [0.5], "certified": [0, 1], "statement": "ok",
                  "reason": ""},))


def _rewrite(path, edit) -> None:
    """Edit a saved file's payload and recompute its checksum (a deliberate edit)."""
    document = json.loads(path.read_text())
    edit(document["calibration"])
    body = json.dumps(document["calibration"], sort_keys=True)
    document["checksum"] = hashlib.sha256(body.encode()).hexdigest()
    path.write_text(json.dumps(document))


def test_a_saved_calibration_loads_back(tmp_path):
    path = _calibration().save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert loaded.entries == _calibration().entries
    gate = loaded.gates_for(10.0)[0]
    assert isinstance(gate, ConfidenceGate) and gate.threshold == 0.5


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["candidates"].__setitem__(0, [5.0]), r"candidates\[0\]"),
    (lambda p: p["entries"][0].__setitem__("thresholds", [5.0]), "thresholds"),
    (lambda p: p["gate_specs"][0].__setitem__("probe_tokens", "4"), "probe_tokens"),
    (lambda p: p["gate_specs"][0].__setitem__("type", "psychic"), "unknown gate"),
    (lambda p: p["entries"][0].__setitem__("budget", "10"), "budget"),
    (lambda p: p["entries"][0].__setitem__("index", 7), "index"),
    (lambda p: p.__setitem__("alpha", "0.1"), "alpha"),
    (lambda p: p.__setitem__("n", 2.5), "n must be"),
    (lambda p: p.__setitem__("method", "magic"), "method"),
    (lambda p: p.__setitem__("models", [{"name": "s"}]), "models"),
    (lambda p: p.__setitem__("entries", 5), "entries must be a list"),
    (lambda p: p.__setitem__("extra", 1), "unknown field"),
])
def test_an_edited_file_with_a_recomputed_checksum_is_refused_clearly(tmp_path, edit, message):
    path = _calibration().save(tmp_path / "c.json")
    _rewrite(path, edit)
    with pytest.raises(CalibrationFileError, match=message):
        Calibration.load(path)


def test_a_directory_or_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationFileError, match="is a directory"):
        Calibration.load(tmp_path)
    with pytest.raises(ConfigError, match="no directory"):
        _calibration().save(tmp_path / "missing" / "c.json")
