"""The spec layer: where names and values from outside become gates and models.

Every entry point (Python, the command line, the server's request fields, calibration
files, bench policies) describes what it wants as a frozen spec, checked once here, and
the spec is built into objects here: gates by `build_gate`, models by `load_model`.

One grammar for gates and policies (the bench policy grammar)::

    KIND[:QUALIFIER]...[@T[/T...]]

- KIND: ``small`` (never escalate), ``large`` (always escalate), ``confidence``,
  ``verify``, ``verify-ahead`` (verify, and the small model drafts the next step while
  the large one verifies), ``verify-fix`` (verify, a rejected draft corrected at its first
  wrong token, with draft-ahead), ``advantage`` (a learned router); the benchmark adds
  ``oracle`` and ``calibrated`` (`BENCH_KINDS`), which only it builds.
- QUALIFIER: of ``confidence``: a signal (``min_prob``, ``mean_prob``, ``entropy``,
  ``first_k``) and/or a mode (``route``, ``speculate``, ``resolve``), e.g. ``confidence:entropy@0.3``;
  of ``advantage``: NAME, the router given as NAME (``advantage:seq@0.5``); of the verify
  kinds: NAME=S, verify only the drafts router NAME gives P(large better) >= S
  (``verify-fix:seq=0.02@0.3``).
- T: the threshold, in [0, 1]; T1/T2/... gives one per gate of an N-tier cascade. For
  ``calibrated`` it is a budget instead (``calibrated@60``, cost units): the policy runs
  the threshold its calibration file certified for that budget, capped at it, so that one
  benchmark runs a calibration at several budgets side by side.

One vocabulary: ``small`` and ``large``. The registry's older names ``always-small`` and
``always-large`` are read as those (`GATE_ALIASES`, the one place that maps them).

Models: `ModelSpec` names a model (a path, a hub id, ``embedded:<tier>`` for a shipped
model, or a ``.gguf`` file) and the backend that runs it (`BACKEND_KINDS`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decoding
from cascade.checks import check_budget, check_threshold
from cascade.embedded import EMBEDDED_DELIMITER, EMBEDDED_MAX_STEP_TOKENS, EMBEDDED_MAX_STEPS, embedded_path
from cascade.errors import ConfigError
from cascade.gates import (
    GATES,
    SIGNALS,
    AdvantageGate,
    ConfidenceGate,
    Gate,
    VerifyGate,
)
from decoding import Backend, HFBackend, OpenAIBackend, ProcessBackend

__all__ = [
    "BACKEND_KINDS",
    "BENCH_KINDS",
    "GATE_ALIASES",
    "GATE_KINDS",
    "MODES",
    "POLICY_KINDS",
    "THRESHOLD_KINDS",
    "GateSpec",
    "ModelSpec",
    "PolicySpec",
    "build_gate",
    "build_gates",
    "canonical_gate_name",
    "gate_spec_of",
    "load_model",
    "load_models",
    "make_gate",
    "parse_gate",
    "parse_policy",
    "step_limits",
    "warn_on_tier_order",
]

GATE_KINDS: tuple[str, ...] = tuple(GATES)  # small, large, confidence, verify, advantage
GATE_ALIASES: dict[str, str] = {"always-small": "small", "always-large": "large"}
# Policy kinds the library builds (each is one gate kind, plus solve options).
POLICY_KINDS: tuple[str, ...] = ("small", "large", "confidence", "verify", "verify-ahead", "verify-fix",
                                 "advantage")
BENCH_KINDS: tuple[str, ...] = ("oracle", "calibrated")  # parsed here, built by bench
THRESHOLD_KINDS: tuple[str, ...] = ("confidence", "verify", "verify-ahead", "verify-fix", "advantage")
_VERIFY_KINDS = ("verify", "verify-ahead", "verify-fix")
MODES: tuple[str, ...] = ("route", "speculate", "resolve")
BACKEND_KINDS: tuple[str, ...] = ("hf", "process", "vllm", "openai", "llamacpp")


# ---- values ---------------------------------------------------------------------------------

def _check_int(value: object, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def canonical_gate_name(name: object) -> str:
    """A gate kind by name; the older ``always-small``/``always-large`` read as ``small``/``large``."""
    if not isinstance(name, str):
        raise ConfigError(f"a gate name must be a string, got {name!r}")
    kind = GATE_ALIASES.get(name, name)
    if kind not in GATES:
        raise ConfigError(f"unknown gate {name!r}; choose one of {', '.join(GATE_KINDS)}")
    return kind


# ---- gates ----------------------------------------------------------------------------------

# The settings each gate kind has besides its threshold (its dataclass fields), and what a
# value must be. Fixed fields (requires_verification, requires_hidden) are not settings.
_SETTINGS: dict[str, tuple[str, ...]] = {
    "small": ("mode", "probe_tokens"),
    "large": ("mode", "probe_tokens"),
    "confidence": ("signal", "mode", "probe_tokens"),
    "verify": ("reduce", "mode", "probe_tokens", "rewrite", "max_corrections", "router", "screen_threshold"),
    "advantage": ("router", "mode", "probe_tokens"),
}


@dataclass(frozen=True)
class GateSpec:
    """One gate, by kind and settings; None = the gate's own default.

    kind: one of `GATE_KINDS` (an alias in `GATE_ALIASES` is read as its kind).
    threshold: in [0, 1]. signal: confidence signal. mode: "route", "speculate" or "resolve".
    probe_tokens: tokens the route mode sees. reduce: "mean" or "min" (verify).
    rewrite: "step" or "token" (verify). max_corrections: verify's token fixes.
    router: advantage: its router; verify: the screen (with screen_threshold). A
        reference resolved when the gate is built: a router name (the CLI's and bench's
        --router NAME=FILE; "" = the unnamed one) or a router file (calibration files).
    router_weights: the router's weights digest a calibration file recorded (checked).
    """

    kind: str
    threshold: float | None = None
    signal: str | None = None
    mode: str | None = None
    probe_tokens: int | None = None
    reduce: str | None = None
    rewrite: str | None = None
    max_corrections: int | None = None
    router: str | None = None
    screen_threshold: float | None = None
    router_weights: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", canonical_gate_name(self.kind))
        if self.threshold is not None:
            # AlwaysSmall scores 0 (any threshold above 0 never escalates); the others score in [0, 1]
            high = math.inf if self.kind == "small" else 1.0
            object.__setattr__(self, "threshold", check_threshold(self.threshold, high=high))
        allowed = _SETTINGS[self.kind]
        for name in ("signal", "mode", "probe_tokens", "reduce", "rewrite", "max_corrections", "router",
                     "screen_threshold"):
            if getattr(self, name) is not None and name not in allowed:
                raise ConfigError(f"{name} is a setting of gate "
                                  f"{' or '.join(k for k, v in _SETTINGS.items() if name in v)}, "
                                  f"not of gate {self.kind!r}")
        if self.signal is not None:
            _check_choice(self.signal, "signal", SIGNALS)
        if self.mode is not None:
            _check_choice(self.mode, "mode", MODES)
        if self.probe_tokens is not None:
            _check_int(self.probe_tokens, "probe_tokens")
        if self.reduce is not None:
            _check_choice(self.reduce, "reduce", ("mean", "min"))
        if self.rewrite is not None:
            _check_choice(self.rewrite, "rewrite", ("step", "token"))
        if self.max_corrections is not None:
            _check_int(self.max_corrections, "max_corrections")
        if self.router is not None and not isinstance(self.router, str):
            raise ConfigError(f"router must be a router name or file, got {self.router!r}")
        if self.screen_threshold is not None:
            object.__setattr__(self, "screen_threshold",
                               check_threshold(self.screen_threshold, "screen_threshold"))
        if self.kind == "verify" and (self.router is None) != (self.screen_threshold is None):
            raise ConfigError("a screened verify gate needs both a router (the screen) and a screen "
                              "threshold S (verify only drafts the router gives P(large better) >= S)")
        if self.kind == "advantage" and self.router is None:
            raise ConfigError("gate 'advantage' needs a router (a file made by cascade train-router)")
        if self.router_weights is not None and not isinstance(self.router_weights, str):
            raise ConfigError(f"router_weights must be a string, got {self.router_weights!r}")

    def with_threshold(self, threshold: float) -> GateSpec:
        return dataclasses.replace(self, threshold=threshold)

    # -- the calibration file's form ------------------------------------------------------

    def to_json(self) -> dict:
        """The calibration file's record: {"type": kind, setting: value, ...}; the threshold
        is recorded per budget, not here; a router as {"router_file", "weights"}."""
        out: dict[str, Any] = {"type": self.kind}
        for name in _SETTINGS[self.kind]:
            value = getattr(self, name)
            if name == "router":
                key = "screen" if self.kind == "verify" else "router"
                out[key] = None if value is None else {"router_file": value, "weights": self.router_weights}
            elif value is not None:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, record: object) -> GateSpec:
        """A gate record of a calibration file; every field is checked (type and range)."""
        if not isinstance(record, dict):
            raise ConfigError(f"a gate record must be an object, got {record!r}")
        record = dict(record)
        kind = canonical_gate_name(record.pop("type", None))
        # Fields older files record that are fixed by the gate's kind.
        for fixed in ("requires_verification", "requires_hidden"):
            if fixed in record:
                value = record.pop(fixed)
                expected = getattr(GATES[kind], fixed, None)
                if value is not expected:
                    raise ConfigError(f"gate {kind!r}: {fixed} must be {expected!r}, got {value!r}")
        router_key = "screen" if kind == "verify" else "router"
        settings: dict[str, Any] = {}
        for key, value in record.items():
            if key == router_key and "router" in _SETTINGS[kind]:
                if value is None:
                    continue
                if not (isinstance(value, dict) and isinstance(value.get("router_file"), str)
                        and isinstance(value.get("weights"), str)
                        and set(value) == {"router_file", "weights"}):
                    raise ConfigError(f"gate {kind!r}: {key} must be {{'router_file': str, 'weights': str}}, "
                                      f"got {value!r}")
                settings.update(router=value["router_file"], router_weights=value["weights"])
            elif key in _SETTINGS[kind] and key != "router":
                settings[key] = value
            else:
                raise ConfigError(f"gate {kind!r} has no setting {key!r}; its settings: "
                                  f"{', '.join(_SETTINGS[kind])}")
        return cls(kind, **settings)


def gate_spec_of(gate: Gate) -> GateSpec:
    """The spec of a built gate (what a calibration file records of it). A router must have
    been loaded from a file (`cascade.load_router`) so that the file can name it."""
    names = {cls: name for name, cls in GATES.items()}
    if type(gate) not in names or not dataclasses.is_dataclass(gate):
        raise ConfigError(f"cannot record gate {type(gate).__name__}: register it in cascade.GATES")
    kind = names[type(gate)]
    settings: dict[str, Any] = {}
    for name in _SETTINGS[kind]:
        value = getattr(gate, "screen" if kind == "verify" and name == "router" else name)
        if name == "router":
            if value is None:
                continue
            source = getattr(value, "source", None)
            if not source:
                raise ConfigError(f"cannot record the gate's router {value!r} in a calibration file: it "
                                  "was not loaded from a file; save it and load it with cascade.load_router")
            settings.update(router=str(source), router_weights=repr(value))
        elif name == "screen_threshold" and gate.screen is None:
            continue
        else:
            settings[name] = value
    return GateSpec(kind, threshold=gate.threshold, **settings)


RouterSource = Mapping[str, Any] | Callable[[str], Any]


def _router(spec: GateSpec, routers: RouterSource | None):
    if routers is None:
        raise ConfigError(f"gate {spec.kind!r} names router {spec.router!r}, but no routers were given "
                          "(--router FILE, made by cascade train-router)")
    if callable(routers):
        return routers(spec.router)
    if spec.router not in routers:
        named = spec.router or "(unnamed)"
        raise ConfigError(f"gate {spec.kind!r} needs router {named!r}; the routers given are "
                          f"{sorted(k or '(unnamed)' for k in routers)}")
    return routers[spec.router]


def build_gate(spec: GateSpec, routers: RouterSource | None = None) -> Gate:
    """The gate a spec names. routers: what a router reference resolves to (a mapping of
    names, or a callable taking the reference), for advantage and screened verify gates."""
    settings: dict[str, Any] = {name: getattr(spec, name) for name in _SETTINGS[spec.kind]
                                if name != "router" and getattr(spec, name) is not None}
    if spec.threshold is not None:
        settings["threshold"] = spec.threshold
    if spec.router is not None:
        settings["screen" if spec.kind == "verify" else "router"] = _router(spec, routers)
    kind = GATES[spec.kind]
    if kind is AdvantageGate:
        return AdvantageGate(**settings)
    if kind is VerifyGate:
        return VerifyGate(**settings)
    if kind is ConfidenceGate:
        return ConfidenceGate(**settings)
    return kind(**settings)  # AlwaysSmall, AlwaysLarge


def build_gates(specs: Sequence[GateSpec], routers: RouterSource | None = None) -> list[Gate]:
    if isinstance(specs, GateSpec) or not isinstance(specs, Sequence):
        raise ConfigError(f"gates must be a list of gate specs, got {specs!r}")
    return [build_gate(s, routers) for s in specs]


def make_gate(name: str, **options) -> Gate:
    """Build a gate by name (registry name or alias) and keyword settings, given as
    objects (a router object for `router`/`screen`). Errors list the valid names."""
    kind = canonical_gate_name(name)
    try:
        return GATES[kind](**options)
    except TypeError as error:
        raise ConfigError(f"bad options for gate {name!r}: {error}") from error


# ---- the grammar ----------------------------------------------------------------------------

def _thresholds(text: str, name: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split("/"))  # "/" separates per-gate values
    except ValueError:
        raise ConfigError(f"bad threshold in {what} {name!r}: {text!r} is not a number "
                          "(or T1/T2/... for one threshold per gate)") from None
    return tuple(check_threshold(v, f"the threshold of {name!r}") for v in values)


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy: one gate kind at every gate position, and the solve options it
    implies. label: its name in results ("confidence@0.3"). kind: one of `POLICY_KINDS` or
    `BENCH_KINDS`. threshold: one float for every gate, or one per gate (a tuple).
    router: the router name of advantage / screened verify policies ("" = the unnamed one).
    screen_threshold: screened verify policies' S. signal / mode: a confidence policy's own
    (None: the caller's default). budget: a ``calibrated@B`` policy's B."""

    label: str
    kind: str
    threshold: float | tuple[float, ...] | None = None
    router: str = ""
    screen_threshold: float | None = None
    signal: str | None = None
    mode: str | None = None
    budget: float | None = None  # calibrated@B: its own budget (None: the run's --budget)

    @property
    def draft_ahead(self) -> bool:
        """verify-ahead and verify-fix draft the next step while the large model verifies."""
        return self.kind in ("verify-ahead", "verify-fix")

    def gate_specs(self, n_gates: int, *, signal: str | None = None,
                   mode: str | None = None) -> list[GateSpec]:
        """One gate spec per position of a cascade with n_gates gates. signal / mode: the
        defaults of a confidence policy that names none."""
        if self.kind in BENCH_KINDS:
            raise ConfigError(f"policy {self.kind!r} is built by the benchmark, not from a gate spec")
        thresholds = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,) * n_gates
        if len(thresholds) != n_gates:
            raise ConfigError(f"policy {self.label!r} gives {len(thresholds)} thresholds for "
                              f"{n_gates + 1} models, which have {n_gates} gate(s)")
        settings: dict[str, Any] = {}
        kind = self.kind
        if kind == "confidence":
            settings.update(signal=self.signal or signal, mode=self.mode or mode)
        elif kind in _VERIFY_KINDS:
            settings["rewrite"] = "token" if kind == "verify-fix" else "step"
            if self.screen_threshold is not None:
                settings.update(router=self.router, screen_threshold=self.screen_threshold)
            kind = "verify"
        elif kind == "advantage":
            settings["router"] = self.router
        return [GateSpec(kind, threshold=t, **settings) for t in thresholds]


def parse_policy(text: str, *, threshold: float | None = 0.5, bench_kinds: bool = True,
                 what: str = "policy") -> PolicySpec:
    """Parse one policy / gate name of the grammar above. threshold: of a threshold kind
    named without @T (None: the gate's default). bench_kinds: accept oracle/calibrated.
    what: how error messages name the text ("policy", "--gates item", ...)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"a {what} must be a non-empty name, got {text!r}")
    name = text.strip()
    head, at, value = name.partition("@")
    kind, *qualifiers = head.split(":")
    kind = GATE_ALIASES.get(kind, kind)
    known = POLICY_KINDS + (BENCH_KINDS if bench_kinds else ())
    if kind not in known:
        raise ConfigError(f"unknown policy {name!r}; valid policies: {', '.join(known)} "
                          f"({' and '.join(THRESHOLD_KINDS)} also as NAME@THRESHOLD, e.g. confidence@0.3)")
    router, screen, signal, mode = "", None, None, None
    if kind == "confidence":
        for q in qualifiers:
            if q in SIGNALS and signal is None:
                signal = q
            elif q in MODES and mode is None:
                mode = q
            else:
                raise ConfigError(f"policy {name!r}: a confidence qualifier is one signal "
                                  f"({', '.join(SIGNALS)}) and/or one mode ({', '.join(MODES)}), got {q!r}")
    elif kind == "advantage" and qualifiers:
        if len(qualifiers) != 1 or not qualifiers[0]:
            raise ConfigError(f"policy {name!r} names no router after 'advantage:' (advantage:NAME@T)")
        router = qualifiers[0]
    elif kind in _VERIFY_KINDS and qualifiers:
        router, eq, s = qualifiers[0].partition("=")
        try:
            screen = float(s) if eq and router and len(qualifiers) == 1 else math.nan
        except ValueError:
            screen = math.nan
        if math.isnan(screen):
            raise ConfigError(f"policy {name!r}: a screened verify policy reads {kind}:NAME=S@T (verify "
                              "only drafts router NAME gives P(large better) >= S)")
        screen = check_threshold(screen, f"the screen threshold of {name!r}")
    elif qualifiers:
        raise ConfigError(f"policy {kind!r} takes no qualifier, got {name!r}")
    t: float | tuple[float, ...] | None = None
    if kind == "calibrated" and at:  # the budget the calibration's threshold is looked up for
        try:
            budget = check_budget(float(value))
        except (ValueError, ConfigError):
            raise ConfigError(f"policy {name!r}: calibrated@B takes a budget B, a finite number >= 0 "
                              "in cost units") from None
        return PolicySpec(f"calibrated@{budget:g}", kind, budget=budget)
    if at:
        if kind not in THRESHOLD_KINDS:
            raise ConfigError(f"policy {kind!r} takes no threshold (only {', '.join(THRESHOLD_KINDS)} "
                              f"do), got {name!r}")
        values = _thresholds(value, name, what)
        t = values[0] if len(values) == 1 else values
        label = f"{kind}@" + "/".join(f"{v:g}" for v in values)
    else:
        if kind in THRESHOLD_KINDS and threshold is not None:
            t = check_threshold(threshold)
        label = kind
    qualifier = ":".join(q for q in (signal, mode) if q) if kind == "confidence" else \
        (router + ("" if screen is None else f"={screen:g}") if router else "")
    if qualifier:
        label = label.replace(kind, f"{kind}:{qualifier}", 1)
    return PolicySpec(label, kind, t, router, screen, signal, mode)


def parse_gate(text: str, *, threshold: float | None = None, what: str = "gate") -> GateSpec:
    """One gate of the grammar (a single threshold; no draft-ahead kinds, which are
    policies): e.g. ``confidence:entropy@0.3``, ``verify:seq=0.1@0.4``, ``small``."""
    if isinstance(text, str):
        kind = text.strip().partition("@")[0].partition(":")[0]
        if GATE_ALIASES.get(kind, kind) not in POLICY_KINDS:
            raise ConfigError(f"unknown gate {kind!r} in {what} {text!r}; choose one of "
                              f"{', '.join(GATE_KINDS)}")
    policy = parse_policy(text, threshold=threshold, bench_kinds=False, what=what)
    if policy.draft_ahead:
        raise ConfigError(f"{policy.kind!r} is a policy (verify with draft-ahead), not a gate")
    if isinstance(policy.threshold, tuple):
        raise ConfigError(f"gate {text!r} takes one threshold, got {len(policy.threshold)}")
    return policy.gate_specs(1)[0]


# ---- models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """One model of a cascade and how it runs.

    model: a local directory, a hub id, ``embedded:<tier>`` (a shipped model) or a
        ``.gguf`` file (run by llama.cpp unless another backend is named).
    backend: one of `BACKEND_KINDS`: "hf" (transformers in this process), "process"
        (transformers in a process of its own), "vllm", "openai" (OpenAI-compatible
        servers at `endpoints`), "llamacpp" (llama-cpp-python in this process). None:
        "llamacpp" for a .gguf file, else "hf".
    template: the prompt, a str.format string with {problem} (None: the tokenizer's chat
        template, or the embedded pair's own). delimiter: the step delimiter (None: "\\n\\n",
        or the embedded pair's own "\\n").
    endpoints / served_name / api_key_env: the openai backend's servers (several =
        replicas), the name they serve the model as (default: the model as given), and the
        environment variable holding the API key (read when the model is loaded).
    dtype / device: hf and process; dtype, gpu_memory, max_model_len: vllm.
    n_ctx / n_threads / seed: llamacpp. threads: process.
    """

    model: str
    backend: str | None = None
    template: str | None = None
    delimiter: str | None = None
    endpoints: tuple[str, ...] = ()
    served_name: str | None = None
    api_key_env: str | None = None
    dtype: str | None = None
    device: str | None = None
    gpu_memory: float | None = None
    max_model_len: int | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    seed: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, Path):
            object.__setattr__(self, "model", str(self.model))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"a model must be a path, a hub id or embedded:<tier>, got {self.model!r}")
        if self.backend is None:
            object.__setattr__(self, "backend", "llamacpp" if self.is_gguf else "hf")
        _check_choice(self.backend, "backend", BACKEND_KINDS)
        if self.is_embedded:
            embedded_path(self.embedded_tier)  # an unknown tier fails here, naming the shipped ones
            if self.backend == "llamacpp":
                raise ConfigError("the embedded models are transformers checkpoints; llamacpp runs "
                                  ".gguf files")
        if self.template is not None and not isinstance(self.template, str):
            raise ConfigError(f"template must be a str.format string with {{problem}}, got {self.template!r}")
        if self.delimiter is not None and (not isinstance(self.delimiter, str) or not self.delimiter):
            raise ConfigError(f"delimiter must be a non-empty string, got {self.delimiter!r}")
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", (self.endpoints,))
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if self.backend == "openai" and not self.endpoints:
            raise ConfigError(f"model {self.model!r} on backend openai needs endpoints (its servers' URLs)")
        if self.backend != "openai" and (self.endpoints or self.served_name or self.api_key_env):
            raise ConfigError("endpoints, served_name and api_key_env are settings of backend openai, "
                              f"not {self.backend}")
        if self.gpu_memory is not None and not (isinstance(self.gpu_memory, (int, float))
                                                and not isinstance(self.gpu_memory, bool)
                                                and 0 < self.gpu_memory <= 1):
            raise ConfigError(f"gpu_memory must be a fraction in (0, 1], got {self.gpu_memory!r}")
        for name in ("max_model_len", "n_ctx", "n_threads", "threads"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, low=1)
        if self.seed is not None:
            _check_int(self.seed, "seed")

    @property
    def is_embedded(self) -> bool:
        return self.model.startswith("embedded:")

    @property
    def embedded_tier(self) -> str:
        return self.model.split(":", 1)[1]

    @property
    def is_gguf(self) -> bool:
        return self.model.lower().endswith(".gguf")

    @property
    def path(self) -> str:
        """Where the weights are: the embedded tier's directory, or the model as given."""
        return str(embedded_path(self.embedded_tier)) if self.is_embedded else self.model

    @property
    def step_delimiter(self) -> str:
        if self.delimiter is not None:
            return self.delimiter
        return EMBEDDED_DELIMITER if self.is_embedded else "\n\n"


def _llamacpp_backend_class():
    # llama-cpp-python is an optional, heavy dependency (a native build): imported only
    # when a llama.cpp model is asked for, so that everything else runs without it.
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ConfigError("llama.cpp models (.gguf files, backend llamacpp) need llama-cpp-python: "
                          "pip install llama-cpp-python") from None
    try:
        from decoding.llamacpp import LlamaCppBackend
    except ImportError as error:
        raise ConfigError(f"this stepcascade has no llama.cpp backend (decoding.llamacpp): {error}") from None
    return LlamaCppBackend


def load_model(spec: ModelSpec, *, api_key: str | None = None) -> Backend:
    """Load one model as its spec says. The one place models are loaded.
    api_key: the openai backend's key (else read from spec.api_key_env)."""
    name = spec.model
    common = {"step_delimiter": spec.step_delimiter, "prompt_template": spec.template}
    if spec.backend == "llamacpp":
        backend = _llamacpp_backend_class()
        settings = {k: v for k, v in (("n_ctx", spec.n_ctx), ("n_threads", spec.n_threads),
                                      ("seed", spec.seed)) if v is not None}
        return backend(spec.path, name=name, **common, **settings)
    if spec.backend == "openai":
        if api_key is None and spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise ConfigError(f"api_key_env {spec.api_key_env}: that environment variable is not set")
        return OpenAIBackend.from_model_dir(spec.path, list(spec.endpoints), spec.served_name or name,
                                            name=name, api_key=api_key, **common)
    if spec.backend == "vllm":
        # decoding.VLLMBackend is loaded on first use (vllm is an optional extra)
        settings = {k: v for k, v in (("dtype", spec.dtype), ("gpu_memory_utilization", spec.gpu_memory),
                                      ("max_model_len", spec.max_model_len)) if v is not None}
        return decoding.VLLMBackend.from_pretrained(spec.path, name=name, **settings, **common)
    settings = {"name": name, **common}
    if spec.dtype is not None:
        settings["dtype"] = spec.dtype
    if spec.device is not None:
        settings["device"] = spec.device
    if spec.backend == "process":
        return ProcessBackend.from_pretrained(spec.path, threads=spec.threads or 1, **settings)
    return HFBackend.from_pretrained(spec.path, **settings)


def load_models(specs: Sequence[ModelSpec], *, api_key: str | None = None) -> list[Backend]:
    """Load a cascade's models, cheapest first; warns when they are not in order of size."""
    if isinstance(specs, ModelSpec) or not isinstance(specs, Sequence):
        raise ConfigError(f"models must be a list of model specs, got {specs!r}")
    models = [load_model(spec, api_key=api_key) for spec in specs]
    warn_on_tier_order(models)
    return models


def warn_on_tier_order(models: Sequence[Backend]) -> None:
    """Warn when a cheaper tier has more parameters than the one above it: the cost model
    then prices the "small" model above the "large" one (a swapped --small/--large)."""
    for k in range(len(models) - 1):
        low, high = models[k].info, models[k + 1].info
        if low.num_parameters > high.num_parameters:
            warnings.warn(f"tier {k} ({low.name}, {low.num_parameters:,} parameters) is larger than tier "
                          f"{k + 1} ({high.name}, {high.num_parameters:,}); models go cheapest first "
                          "(--small is the cheaper model)", UserWarning, stacklevel=3)


def step_limits(models: Sequence[Backend | ModelSpec]) -> tuple[int, int]:
    """(max_steps, max_step_tokens) for these models: the embedded pair's own step limits
    when every model is a shipped one, else `SolveOptions`' defaults (32, 256)."""
    names = [m.model if isinstance(m, ModelSpec) else m.info.name for m in models]
    if names and all(n.startswith("embedded:") for n in names):
        return EMBEDDED_MAX_STEPS, EMBEDDED_MAX_STEP_TOKENS
    return 32, 256
