"""The calibration record and its file: certified thresholds per budget, the gates they
belong to (as `cascade.specs.GateSpec` records), and the models they were made for.

Kept apart from `cascade.calibrate` (which runs sweeps on a `Cascade`) so that the
runtime can read a calibration (`Cascade.from_calibration`) without importing the code
that makes one: the runtime imports this module, `cascade.calibrate` imports the runtime.

Every value of a file is checked when it is read (types, ranges, the gate records
through the spec layer): a file with a recomputed checksum is still refused when a field
has the wrong type or a threshold lies outside [0, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cascade.errors import CascadeError, ConfigError
from cascade.gates import Gate
from cascade.router import RouterFileError, load_router
from cascade.specs import GateSpec, build_gate

__all__ = ["SCHEMA_VERSION", "Calibration", "CalibrationFileError"]

SCHEMA_VERSION = 1
METHODS = ("ltt", "conformal", "risk")
OBJECTIVES = ("agreement", "max_escalation", "min_cost")


class CalibrationFileError(CascadeError, ValueError):
    """A calibration file is corrupt, edited, of another schema, or for other models."""


@dataclass(frozen=True)
class Calibration:
    """Certified thresholds for a grid of budgets, and the curves they were chosen from.

    gate_specs: one `GateSpec.to_json()` record per gate (without its threshold).
    entries: one per budget, sorted by budget: {"budget", "index" (candidate index or None
        when infeasible), "thresholds", "statement", "reason", and for a certified one
        "agreement" (its answers' agreement with the top tier on the calibration problems:
        the label-free accuracy proxy) and "mean_cost"}. For the accuracy-budget curve
        across methods, with the budget-aware policy, see `cascade.budget.calibrate_budget_curve`.
    curves: per candidate (length K) — cost quantile at 1 - alpha, mean cost, escalation
        rate, agreement with the top tier, and accuracy when labels were given.
    """

    gate_specs: tuple[dict, ...]
    models: tuple[dict, ...]
    alpha: float
    delta: float
    n: int
    method: str
    objective: str
    candidates: tuple[tuple[float, ...], ...]
    entries: tuple[dict, ...]
    curves: dict = field(default_factory=dict)
    sweep_stats: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    _routers: dict = field(default_factory=dict, repr=False, compare=False)  # advantage gates' routers

    def entry_for(self, budget: float) -> dict | None:
        """The entry of the largest grid budget <= budget that has a certified threshold."""
        usable = [e for e in self.entries if e["budget"] <= budget and e["index"] is not None]
        return usable[-1] if usable else None

    def gates_for(self, budget: float) -> list[Gate]:
        """Gates at the thresholds certified for `budget` (see entry_for); below every
        certified grid budget, the cheapest candidate (the hard cap still holds)."""
        entry = self.entry_for(budget)
        thresholds = entry["thresholds"] if entry is not None else self.candidates[0]
        return [build_gate(GateSpec.from_json(spec).with_threshold(t), self._router)
                for spec, t in zip(self.gate_specs, thresholds, strict=False)]

    def _router(self, file: str):
        """A recorded router, loaded from its file once; refused if its weights changed."""
        if file not in self._routers:
            weights = next(s[key]["weights"] for s in self.gate_specs for key in ("router", "screen")
                           if isinstance(s.get(key), dict) and s[key]["router_file"] == file)
            try:
                router = load_router(file)
            except RouterFileError as error:
                raise CalibrationFileError(f"the calibration's gate needs its router: {error}") from error
            if repr(router) != weights:
                raise CalibrationFileError(f"the router at {file} is not the one this calibration was made "
                                           f"with ({weights}); calibrate again")
            self._routers[file] = router
        return self._routers[file]

    def check_models(self, cascade) -> None:
        """Refuse a cascade whose models are not the ones this calibration was made for."""
        have = [{"name": m.info.name, "fingerprint": m.info.fingerprint} for m in cascade.models]
        if have != list(self.models):
            raise CalibrationFileError(f"calibration was made for models {list(self.models)}, "
                                       f"not {have}")

    def summary(self) -> str:
        lines = [f"Calibration ({self.method}, alpha={self.alpha}, delta={self.delta}, n={self.n}, "
                 f"objective={self.objective}) for " + " -> ".join(m["name"] for m in self.models)]
        for entry in self.entries:
            if entry["index"] is None:
                lines.append(f"  budget {entry['budget']:g}: no certified threshold ({entry['reason']})")
            else:
                proxy = f" (agreement with the top tier {entry['agreement']:.3f}, mean cost " \
                    f"{entry['mean_cost']:.1f})" if "agreement" in entry else ""
                lines.append(f"  budget {entry['budget']:g}: thresholds {entry['thresholds']}{proxy} - "
                             f"{entry['statement']}")
        stats = self.sweep_stats
        if stats.get("independent_tokens"):
            lines.append(f"  sweep ran {stats['executed_tokens']} tokens for {len(self.candidates)} "
                         f"candidates ({stats['executed_tokens'] / stats['independent_tokens']:.3f} of "
                         f"independent runs)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        # loaded routers are not recorded
        payload = dataclasses.asdict(dataclasses.replace(self, _routers={}))
        del payload["_routers"]
        payload["candidates"] = [list(c) for c in self.candidates]
        return payload

    @classmethod
    def from_json(cls, payload: object) -> Calibration:
        """A calibration from its JSON form, every field checked; raises ConfigError naming
        the first bad field."""
        return cls(**_checked_payload(payload))

    def save(self, path: str | Path) -> Path:
        payload = self.to_json()
        body = json.dumps(payload, sort_keys=True)
        document = {"checksum": hashlib.sha256(body.encode()).hexdigest(), "calibration": payload}
        path = Path(path)
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write the calibration to {str(path)!r}: no directory "
                              f"{str(path.parent)!r}")
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if path.is_dir():
            raise CalibrationFileError(f"{str(path)!r} is a directory, not a calibration file")
        try:
            document = json.loads(path.read_text())
            payload = document["calibration"]
            checksum = document["checksum"]
        except FileNotFoundError:
            raise CalibrationFileError(f"no calibration file at {str(path)!r}") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise CalibrationFileError(f"{path} is not a calibration file: {error}") from None
        if hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest() != checksum:
            raise CalibrationFileError(f"{path} was edited or corrupted: its checksum does not match")
        if not isinstance(payload, dict) or payload.get("schema_version") != SCHEMA_VERSION:
            version = payload.get("schema_version") if isinstance(payload, dict) else None
            raise CalibrationFileError(f"{path} has schema version {version!r}; "
                                       f"this stepcascade reads version {SCHEMA_VERSION}")
        try:
            return cls.from_json(payload)
        except ConfigError as error:
            raise CalibrationFileError(f"{path} does not match the calibration schema: {error}") from None


# ---- checks of a file's payload --------------------------------------------------------------

def _number(value: object, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _list(value: object, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    return list(value)


def _thresholds(value: object, name: str, gates: Sequence[GateSpec]) -> tuple[float, ...]:
    """A threshold vector: one threshold per gate, each in its gate's range (the spec checks it)."""
    values = _list(value, name)
    if len(values) != len(gates):
        raise ConfigError(f"{name} must hold {len(gates)} threshold(s), one per gate, got {values!r}")
    try:
        return tuple(gate.with_threshold(v).threshold for gate, v in zip(gates, values, strict=False))
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None


def _checked_payload(payload: object) -> dict:
    if not isinstance(payload, dict):
        raise ConfigError(f"the calibration must be an object, got {payload!r}")
    fields = {f.name for f in dataclasses.fields(Calibration) if f.name != "_routers"}
    unknown = sorted(set(payload) - fields)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}")
    missing = sorted(f.name for f in dataclasses.fields(Calibration) if f.name != "_routers"
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                     and f.name not in payload)
    if missing:
        raise ConfigError(f"missing field(s) {missing}")
    out = dict(payload)
    specs = _list(payload["gate_specs"], "gate_specs")
    if not specs:
        raise ConfigError("gate_specs is empty")
    gates = []
    for k, spec in enumerate(specs):
        try:
            gates.append(GateSpec.from_json(spec))
        except ConfigError as error:
            raise ConfigError(f"gate_specs[{k}]: {error}") from None
    out["gate_specs"] = tuple(specs)
    models = _list(payload["models"], "models")
    if len(models) != len(specs) + 1 or not all(
            isinstance(m, dict) and set(m) == {"name", "fingerprint"}
            and all(isinstance(v, str) for v in m.values()) for m in models):
        raise ConfigError(f"models must be {len(specs) + 1} objects {{'name': str, 'fingerprint': str}} "
                          f"(one more than the gates), got {models!r}")
    out["models"] = tuple(models)
    out["alpha"] = _number(payload["alpha"], "alpha", 0.0, 1.0)
    out["delta"] = _number(payload["delta"], "delta", 0.0, 1.0)
    n = payload["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    for name, choices in (("method", METHODS), ("objective", OBJECTIVES)):
        if payload[name] not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {payload[name]!r}")
    candidates = _list(payload["candidates"], "candidates")
    if not candidates:
        raise ConfigError("candidates is empty")
    out["candidates"] = tuple(_thresholds(c, f"candidates[{j}]", gates) for j, c in enumerate(candidates))
    entries = []
    for k, entry in enumerate(_list(payload["entries"], "entries")):
        where = f"entries[{k}]"
        if not isinstance(entry, dict) or not {"budget", "index", "thresholds"} <= set(entry):
            raise ConfigError(f"{where} must be an object with budget, index and thresholds, got {entry!r}")
        _number(entry["budget"], f"{where}.budget", 0.0)
        index = entry["index"]
        if index is None:
            if entry["thresholds"] is not None:
                raise ConfigError(f"{where}: an entry without a certified index has no thresholds")
        else:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(candidates):
                raise ConfigError(f"{where}.index must be a candidate index in [0, {len(candidates) - 1}] "
                                  f"or null, got {index!r}")
            if _thresholds(entry["thresholds"], f"{where}.thresholds", gates) != out["candidates"][index]:
                raise ConfigError(f"{where}.thresholds are not candidate {index}'s")
        for text in ("statement", "reason"):
            if text in entry and not isinstance(entry[text], str):
                raise ConfigError(f"{where}.{text} must be a string, got {entry[text]!r}")
        entries.append(entry)
    if [e["budget"] for e in entries] != sorted(e["budget"] for e in entries):
        raise ConfigError("entries must be sorted by budget")
    out["entries"] = tuple(entries)
    for name in ("curves", "sweep_stats"):
        if name in payload and not isinstance(payload[name], dict):
            raise ConfigError(f"{name} must be an object, got {payload[name]!r}")
    return out
