"""The benchmark harness: run gate policies on one cascade's models over a dataset.

    cascade bench --dataset gsm8k --policies small,large,confidence@0.3,verify --limit 100 \\
        --small Qwen/Qwen2.5-Math-1.5B-Instruct --large Qwen/Qwen2.5-Math-7B-Instruct -o runs/gsm8k

or from Python::

    from bench.harness import run_benchmark
    summary = run_benchmark(cascade, "embedded", out_dir="runs/emb", limit=200,
                            policies=["small", "large", "confidence@0.5", "oracle"])

Policies (`POLICY_NAMES`), each used at every gate position of an N-tier cascade, are
parsed by `cascade.specs.parse_policy` (the grammar the CLI's --gates and the server's
gate fields share) and built by `cascade.specs.build_gates`:

- ``small``: `AlwaysSmall`; ``large``: `AlwaysLarge`;
- ``confidence`` / ``confidence@T``: `ConfidenceGate` at threshold T (default: `threshold`);
  ``confidence:SIGNAL[:MODE]@T`` names its own signal and mode (default: `signal`, `mode`);
- ``verify`` / ``verify@T``: `VerifyGate` at threshold T;
- ``verify-ahead`` / ``verify-ahead@T``: the same gate with `SolveOptions.draft_ahead`: the
  small model drafts the next step while the large one verifies (run with ``--isolate`` so
  the two models have a core each);
- ``advantage`` / ``advantage@T``: `AdvantageGate` at threshold T, with the router file given
  as `router` (``--router FILE``, from ``cascade train-router``; refused for other models);
  ``advantage:NAME@T`` uses the router given as ``--router NAME=FILE``, so routers of
  several kinds run side by side (``--router seq=s.pt --router lr=l.pt``);
- ``verify:NAME=S@T`` (and ``verify-ahead:``, ``verify-fix:``): the verify gate screened by
  router NAME at S: only drafts it gives P(large better) >= S are verified (`VerifyGate.screen`);
- ``oracle``: `bench.oracle.OracleGate` (the embedded dataset only: it reads the exact checker);
- ``calibrated``: `Cascade.from_calibration(calibration, models=cascade.models)`, solved
  with `budget` so that the threshold certified for it is looked up; ``calibrated@B``
  with its own budget B instead (several budgets side by side in one run).

All policies run on the same loaded models, interleaved per problem (each problem is
solved by every policy in turn, so a change of machine load hits all alike), after one
warm-up solve per policy (excluded from the results, reported in ``run.json``).

The output directory holds

- ``results.jsonl``: one line per (problem, policy), written and flushed as it is
  finished. Re-running the same command resumes: pairs already there are skipped, and a
  half-written last line (a killed run) is trimmed. ``run.json`` records the settings
  (dataset and its content hash, policies and their gates, models and fingerprints,
  budget, solve options), and a directory made with other settings is refused.
- ``summary.json`` and ``summary.md``: per-policy figures recomputed from
  ``results.jsonl`` alone (`summarize_rows`), plus the command and commit.
- ``accuracy_vs_cost.png``, ``accuracy_vs_latency.png``, ``escalation_by_step.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.datasets import Example, load_dataset
from bench.grading import Grader
from bench.oracle import OracleGate
from bench.pair_report import wilson_interval
from bench.progress import progress_printer
from bench.provenance import package_commit
from cascade.checks import check_budget
from cascade.errors import CascadeError, ConfigError
from cascade.router import load_router
from cascade.runtime import Cascade
from cascade.specs import BENCH_KINDS, POLICY_KINDS, PolicySpec, build_gates, parse_policy

__all__ = [
    "PLOT_FILES",
    "POLICY_NAMES",
    "BenchError",
    "PolicySpec",
    "load_results",
    "parse_policies",
    "router_files",
    "run_benchmark",
    "summarize",
    "summarize_rows",
    "unknown_characters",
]

POLICY_NAMES: tuple[str, ...] = POLICY_KINDS + BENCH_KINDS  # one vocabulary: cascade.specs
PLOT_FILES: tuple[str, ...] = ("accuracy_vs_cost.png", "accuracy_vs_latency.png", "escalation_by_step.png")
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
# Below this accuracy (every policy) on a non-embedded dataset, summary.md says why.
_NEAR_ZERO = 0.05


class BenchError(ConfigError):
    """A benchmark cannot run as asked: bad policy, other settings in the directory, ..."""


# ---- policies ------------------------------------------------------------------------------

def router_files(router: str | Path | Sequence[str] | Mapping[str, str | Path] | None) -> dict[str, Path]:
    """The router files of a run by name: one FILE (name ""), a list of "NAME=FILE" / "FILE"
    strings (the CLI's repeated --router), or a mapping name -> file. Raises BenchError on a
    name given twice or a malformed name."""
    if router is None:
        return {}
    if isinstance(router, (str, Path)):
        items = [str(router)]
    elif isinstance(router, Mapping):
        items = [f"{k}={v}" if k else str(v) for k, v in router.items()]
    else:
        items = [str(r) for r in router]
    files: dict[str, Path] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            name, rest = "", item  # a plain path (which may itself hold "=")
        if name in files:
            raise BenchError(f"router {name or '(unnamed)'!r} is given twice")
        files[name] = Path(rest)
    return files


def _policy_list(policies: str | Sequence[str]) -> list[str]:
    if isinstance(policies, str):
        policies = policies.split(",")
    names = [str(p).strip() for p in policies]
    if not names or any(not n for n in names):
        raise BenchError(f"policies must be a non-empty comma-separated list of {', '.join(POLICY_NAMES)}; "
                         f"got {policies!r}")
    return names


def parse_policies(policies: str | Sequence[str], *, dataset: str, threshold: float = 0.5,
                   calibration: str | Path | None = None, budget: float | None = None,
                   router=None) -> list[PolicySpec]:
    """Parse and check policy names before any model is loaded. Raises `BenchError`.
    router: what `router_files` reads."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise BenchError(f"threshold must be a number, got {threshold!r}")
    routers = router_files(router)
    specs: list[PolicySpec] = []
    for name in _policy_list(policies):
        try:  # the grammar and its values: cascade.specs, shared with the CLI and the server
            spec = parse_policy(name, threshold=float(threshold))
        except ConfigError as error:
            raise BenchError(str(error)) from None
        kind = spec.kind
        if kind == "oracle" and dataset != "embedded":
            raise BenchError(f"policy 'oracle' reads the exact checker of the embedded task; it runs only "
                             f"with --dataset embedded, not {dataset!r}")
        if (kind == "advantage" or spec.screen_threshold is not None) and spec.router not in routers:
            router_name = spec.router
            raise BenchError(f"policy {name!r} needs a router file (--router "
                             f"{router_name + '=' if router_name else ''}FILE, made by cascade train-router)"
                             + (f"; the routers given are {sorted(routers)}" if routers else ""))
        if kind == "calibrated":
            if calibration is None:
                raise BenchError("policy 'calibrated' needs a calibration file (--calibration FILE)")
            if budget is None and spec.budget is None:
                raise BenchError(f"policy {name!r} needs a budget (calibrated@B, or --budget): its threshold "
                                 "is the one certified for that budget")
        if any(s.label == spec.label for s in specs):
            raise BenchError(f"policy {spec.label!r} is named twice")
        specs.append(spec)
    return specs


@dataclass
class _Policy:
    spec: PolicySpec
    runner: Any  # the Cascade it solves with (the shared one, or the calibrated view of it)
    gates: list | None  # passed to solve; None = the runner's own (calibration lookup)
    described_gates: list[str] = field(default_factory=list)
    options: Any = None  # SolveOptions; None = the runner's own

    def solve(self, problem: str, budget: float | None):
        """budget: the run's hard cap; a calibrated@B policy runs under its own B instead."""
        if self.spec.budget is not None:
            budget = self.spec.budget
        return self.runner.solve(problem, budget, gates=self.gates, options=self.options)


def _build_policies(specs: Sequence[PolicySpec], cascade, *, calibration, budget, signal: str,
                    mode: str, router=None) -> list[_Policy]:
    n_gates = len(cascade.models) - 1
    routers: dict[str, Any] = {}  # name -> loaded router, each file loaded once

    def load_routers(name: str):
        routers[name] = load_router(router_files(router)[name], models=cascade.models)  # refuses other models
        return routers[name]
    built = []
    for spec in specs:
        if spec.kind == "calibrated":
            runner = Cascade.from_calibration(calibration, models=cascade.models, options=cascade.options)
            gates = None
            own_budget = budget if spec.budget is None else spec.budget
            described = [repr(g) for g in runner.calibration.gates_for(own_budget)]
            described.append(f"budget={own_budget:g}")
        else:
            if spec.kind == "oracle":
                gates = [OracleGate()] * n_gates
            else:
                try:
                    gate_specs = spec.gate_specs(n_gates, signal=signal, mode=mode)
                except ConfigError as error:
                    raise BenchError(str(error)) from None
                gates = build_gates(gate_specs, lambda name: routers.get(name) or load_routers(name))
            runner = cascade
            described = [repr(g) for g in gates]
        options = None
        if spec.draft_ahead:  # verify-ahead, verify-fix: drafting the next step during verification
            options = dataclasses.replace(cascade.options, draft_ahead=True)
            described.append("draft_ahead=True")
        built.append(_Policy(spec, runner, gates, described, options))
    return built


# ---- results file -------------------------------------------------------------------------

def load_results(path: str | Path, *, repair: bool = False) -> list[dict]:
    """The rows of a results.jsonl. A last line cut short by a killed run (no newline, or
    not JSON) is dropped, and with repair=True also trimmed from the file; a bad line
    anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    keep = 0  # bytes of whole, valid lines
    offset, number = 0, 0
    while offset < len(data):
        number += 1
        newline = data.find(b"\n", offset)
        end = len(data) if newline < 0 else newline + 1
        line, last = data[offset:end], end == len(data)
        offset = end
        if not line.strip():
            keep = end
            continue
        try:
            if newline < 0:
                raise ValueError("no newline: the write was cut short")
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row or "policy" not in row:
                raise ValueError("not a result row")
        except (ValueError, UnicodeDecodeError) as error:
            if last:  # the last write of a killed run
                break
            raise BenchError(f"{path}, line {number}: not a result row ({error}); "
                             "the file was edited or corrupted") from None
        rows.append(row)
        keep = end
    if repair and keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
        print(f"bench: trimmed a partial last line ({len(data) - keep} bytes) from {path}",
              file=sys.stderr)
    return rows


def _unique(rows: Sequence[dict]) -> list[dict]:
    seen, unique = set(), []
    for row in rows:
        key = (row["id"], row["policy"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _row(example: Example, policy: str, result, wall: float, correct: bool | None,
         error: str | None, unknown_chars: int | None = None) -> dict:
    per_tier = [{"tier": name, "prefill_tokens": u.prefill_tokens, "generated_tokens": u.generated_tokens,
                 "seconds": u.seconds, "cost": u.cost}
                for name, u in zip(result.tier_names, result.cost.per_tier, strict=False)]
    return {
        "id": example.id, "policy": policy, "kind": example.kind, "problem": example.problem,
        "reference": example.answer, "predicted": result.answer, "correct": correct,
        "steps": [{"index": s.index, "text": s.text, "author": s.author, "tier": s.tier}
                  for s in result.steps],
        # resolve mode: the steps a re-solve replaced (their cost is in "cost")
        "set_aside": [{"index": s.index, "text": s.text, "author": s.author, "tier": s.tier}
                      for s in result.set_aside],
        "tier_names": list(result.tier_names), "per_tier": per_tier,
        "tokens": {"prefill": [t["prefill_tokens"] for t in per_tier],
                   "generated": [t["generated_tokens"] for t in per_tier]},
        "seconds_per_tier": [t["seconds"] for t in per_tier],
        "cost": result.cost.total, "escalation_rate": result.escalation_rate,
        "wall_seconds": wall, "stop_reason": result.stop_reason,
        "cap_intervened": result.cap_intervened, "budget": result.budget, "error": error,
        "unknown_chars": unknown_chars,
    }


def unknown_characters(models: Sequence, text: str) -> int | None:
    """How many characters of `text` the models' tokenizers cannot represent (they become
    the unknown token), the most over the models; None when no model exposes a tokenizer
    (an HTTP backend, say). Byte-level tokenizers give 0; the embedded char-level one
    counts every character outside its task alphabet, e.g. the capitals and LaTeX of a
    natural-language problem: the model then reads a degraded problem, and the summary
    says how many problems were affected."""
    counts = []
    for model in models:
        tokenizer = getattr(model, "tokenizer", None)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tokenizer is None:
            continue
        if unk is None:  # no unknown token: nothing is mapped to one
            counts.append(0)
            continue
        counts.append(list(tokenizer.encode(text, add_special_tokens=False)).count(unk))
    return max(counts) if counts else None


# ---- settings and resume -------------------------------------------------------------------

def _sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _examples_hash(examples: Sequence[Example]) -> str:
    body = json.dumps([[e.id, e.problem, e.answer, e.kind] for e in examples])
    return hashlib.sha256(body.encode()).hexdigest()


def _settings(cascade, dataset: str, path, limit, examples, policies: Sequence[_Policy], budget,
              calibration, router=None, start: int = 0) -> dict:
    options = cascade.options
    settings = {
        "dataset": dataset,
        "path": str(Path(path).resolve()) if path is not None else None,
        "limit": limit,
        "n_problems": len(examples),
        "examples_sha256": _examples_hash(examples),
        "policies": [{"name": p.spec.label, "gates": p.described_gates} for p in policies],
        "models": [{"name": m.info.name, "fingerprint": m.info.fingerprint,
                    "parameters": m.info.num_parameters} for m in cascade.models],
        "tier_names": list(cascade.tier_names),
        "prices": [[p.input, p.output] for p in cascade.cost_model.prices],
        "delimiter": cascade.delimiter,
        # what each model's backend wraps the problem in (None: its tokenizer's chat template)
        "prompt_templates": [getattr(m, "prompt_template", None) for m in cascade.models],
        "budget": budget,
        "calibration": ({"path": str(Path(calibration).resolve()), "sha256": _sha256_file(calibration)}
                        if calibration is not None else None),
        "options": {"max_steps": options.max_steps, "max_step_tokens": options.max_step_tokens,
                    "temperature": options.temperature, "seed": options.seed},
    }
    if start:  # only when set: directories written before --start existed still resume
        settings["start"] = start
    files = {name: {"path": str(p.resolve()), "sha256": _sha256_file(p)}
             for name, p in router_files(router).items()}
    # Only when there are routers, and one unnamed router as before: older directories still resume.
    if list(files) == [""]:
        settings["router"] = files[""]
    elif files:
        settings["router"] = files
    return json.loads(json.dumps(settings))  # as it reads back from the file


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} (in the directory) vs {new.get(k)!r} (now)"
            for k in keys if old.get(k) != new.get(k)]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


# ---- the run --------------------------------------------------------------------------------

def run_benchmark(cascade, dataset: str, *, out_dir: str | Path,
                  policies: str | Sequence[str] = ("small", "large", "confidence"),
                  limit: int | None = None, start: int = 0, path: str | Path | None = None,
                  budget: float | None = None, calibration: str | Path | None = None,
                  threshold: float = 0.5, signal: str = "min_prob", mode: str = "speculate",
                  examples: Sequence[Example] | None = None, command: str | None = None,
                  progress: bool | Callable[[int, int], None] = True, plots: bool = True,
                  use_math_verify: bool = True, router=None) -> dict:
    """Run `policies` on `cascade`'s models over `dataset` (a `bench.datasets` name; `path`
    for "jsonl"), resuming what `out_dir` already holds. Returns the summary (also written
    to summary.json / summary.md, with the plots).

    budget: hard cap per problem (cost units), for every policy. threshold: of the
    confidence / verify policies named without "@T"; signal and mode: of the confidence
    gate. examples: already loaded `load_dataset(dataset, limit, path)` (else loaded here).
    start: skip the first `start` of those problems (a second process runs the rest of a
    range into its own directory).
    command: recorded in run.json and the summaries (default: this process's argv).
    progress: True = progress with ETA on stderr, or a callable(done, total).
    router: the router file of the advantage policies (`cascade train-router`), or several
        by name for ``advantage:NAME`` policies (what `router_files` reads).
    """
    budget = check_budget(budget)
    specs = parse_policies(policies, dataset=dataset, threshold=threshold, calibration=calibration,
                           budget=budget, router=router)
    if examples is None:
        examples = load_dataset(dataset, limit, None if path is None else str(path))
    examples = list(examples)
    if not examples:
        raise BenchError(f"dataset {dataset!r} has no problems")
    if not (isinstance(start, int) and 0 <= start < len(examples)):
        raise BenchError(f"start must be an integer in [0, {len(examples)}) (the problems loaded), "
                         f"got {start!r}")
    examples = examples[start:]
    built = _build_policies(specs, cascade, calibration=calibration, budget=budget, signal=signal, mode=mode,
                            router=router)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cascade, dataset, path, limit, examples, built, budget, calibration, router, start)
    run_path, results_path = out / RUN_FILE, out / RESULTS_FILE
    if run_path.exists():
        header = json.loads(run_path.read_text())
        diff = _settings_diff(header.get("settings", {}), settings)
        if diff:
            raise BenchError(f"{out} holds a run made with other settings; refusing to resume it "
                             f"(use another output directory):\n  " + "\n  ".join(diff))
    elif results_path.exists() and results_path.stat().st_size > 0:
        raise BenchError(f"{results_path} exists but {run_path} does not: not a harness directory, "
                         "refusing to add to it")
    else:
        header = {"settings": settings, "sessions": []}
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    session = {"command": command, "commit": package_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": f"{platform.machine()}, python {platform.python_version()}",
               "warmup_seconds": {}, "skipped": 0, "solved": 0, "finished": False}
    header.setdefault("command", command)
    header["sessions"].append(session)
    _write_json(run_path, header)

    done = {(r["id"], r["policy"]) for r in load_results(results_path, repair=True)}
    todo = [(e, p) for e in examples for p in built if (e.id, p.spec.label) not in done]
    session["skipped"] = len(examples) * len(built) - len(todo)
    if session["skipped"]:
        print(f"bench: resuming {out}: {session['skipped']} of {len(examples) * len(built)} "
              f"(problem, policy) pairs already done", file=sys.stderr)
    report = progress_printer("bench", "solves") if progress is True else (progress or None)

    if todo:
        pending = {p.spec.label for _, p in todo}
        for policy in built:  # warm-up: first calls, allocations, caches; not timed in results
            if policy.spec.label in pending:
                begin = time.perf_counter()
                policy.solve(examples[0].problem, budget)
                session["warmup_seconds"][policy.spec.label] = time.perf_counter() - begin
        _write_json(run_path, header)
        unknown: dict[str, int | None] = {}
        with Grader(use_math_verify=use_math_verify) as grader, \
                results_path.open("a", encoding="utf-8") as sink:
            for count, (example, policy) in enumerate(todo, start=1):
                if example.id not in unknown:
                    unknown[example.id] = unknown_characters(cascade.models, example.problem)
                row = _solve_one(policy, example, budget, grader, unknown[example.id])
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                session["solved"] = count
                if report:
                    report(count, len(todo))
    session["finished"] = True
    session["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_json(run_path, header)
    return summarize(out, plots=plots)


def _solve_one(policy: _Policy, example: Example, budget: float | None, grader,
               unknown_chars: int | None = None) -> dict:
    error = None
    begin = time.perf_counter()
    try:
        result = policy.solve(example.problem, budget)
    except CascadeError as failure:  # a model failed mid-problem: keep what it wrote, go on
        result = getattr(failure, "partial", None)
        if result is None:
            raise
        error = str(failure)
    wall = time.perf_counter() - begin
    correct = None
    if example.answer is not None:
        correct = bool(grader.grade(result.answer, example.answer, example.kind))
    return _row(example, policy.spec.label, result, wall, correct, error, unknown_chars)


# ---- summary --------------------------------------------------------------------------------

def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def summarize_rows(rows: Sequence[dict]) -> dict:
    """Per-policy figures from result rows alone (first row per (id, policy) counts).

    accuracy over rows with a reference (correct is not None), with its 95 % Wilson
    interval; wall latency mean / p50 / p95 per problem; mean tokens per tier; mean
    cost; escalation rate (mean of per-problem rates) and step escalation rate
    (escalated steps / steps); speedup = mean wall of `large` / mean wall of the policy
    and cost ratio = mean cost of the policy / mean cost of `large` (when `large` ran);
    escalation_by_step[i] = fraction of the policy's steps at index i written by a tier > 0.
    """
    rows = _unique(rows)
    order: list[str] = []
    for row in rows:
        if row["policy"] not in order:
            order.append(row["policy"])
    policies: dict[str, dict] = {}
    for name in order:
        cells = [r for r in rows if r["policy"] == name]
        graded = [r["correct"] for r in cells if r["correct"] is not None]
        n_correct = sum(bool(c) for c in graded)
        accuracy = n_correct / len(graded) if graded else None
        ci = None
        if graded:  # clamped: the interval's float arithmetic can leave -1e-17 at 0 successes
            low, high = wilson_interval(n_correct, len(graded))
            ci = [min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)]
        walls = [r["wall_seconds"] for r in cells]
        tier_names = cells[0]["tier_names"]
        steps_total = sum(len(r["steps"]) for r in cells)
        escalated_steps = sum(s["tier"] > 0 for r in cells for s in r["steps"])
        depth = max((len(r["steps"]) for r in cells), default=0)
        by_step = []
        for i in range(depth):
            at_i = [r["steps"][i]["tier"] > 0 for r in cells if len(r["steps"]) > i]
            by_step.append(sum(at_i) / len(at_i))
        stop_reasons: dict[str, int] = {}
        for r in cells:
            stop_reasons[r["stop_reason"]] = stop_reasons.get(r["stop_reason"], 0) + 1
        policies[name] = {
            "n": len(cells), "n_graded": len(graded), "n_correct": n_correct,
            "accuracy": accuracy, "accuracy_ci95": ci,
            "wall_seconds": {"mean": _mean(walls), "p50": _percentile(walls, 50),
                             "p95": _percentile(walls, 95)},
            "mean_tokens": {t: {"prefill": _mean([r["tokens"]["prefill"][k] for r in cells]),
                                "generated": _mean([r["tokens"]["generated"][k] for r in cells])}
                            for k, t in enumerate(tier_names)},
            # per-model time split: seconds inside each tier's backend calls, and the rest of the
            # wall time (gates, cost accounting, grading is not included: it runs after timing)
            "mean_seconds_per_tier": {t: _mean([r["seconds_per_tier"][k] for r in cells])
                                      for k, t in enumerate(tier_names)},
            "mean_overhead_seconds": _mean([r["wall_seconds"] - math.fsum(r["seconds_per_tier"])
                                            for r in cells]),
            "mean_cost": _mean([r["cost"] for r in cells]),
            "escalation_rate": _mean([r["escalation_rate"] for r in cells]),
            "step_escalation_rate": escalated_steps / steps_total if steps_total else 0.0,
            "escalation_by_step": by_step,
            # N tiers: fraction of all the policy's steps written by each tier
            "step_share_by_tier": {t: (sum(s["tier"] == k for r in cells for s in r["steps"]) / steps_total
                                       if steps_total else 0.0) for k, t in enumerate(tier_names)},
            "cap_intervened_rate": _mean([float(bool(r["cap_intervened"])) for r in cells]),
            "stop_reasons": stop_reasons,
            "errors": sum(r.get("error") is not None for r in cells),
        }
    large = policies.get("large")
    for stats in policies.values():
        speedup = cost_ratio = None
        if large is not None:
            if stats["wall_seconds"]["mean"]:
                speedup = large["wall_seconds"]["mean"] / stats["wall_seconds"]["mean"]
            if large["mean_cost"]:
                cost_ratio = stats["mean_cost"] / large["mean_cost"]
        stats["speedup_vs_large"] = speedup
        stats["cost_ratio_vs_large"] = cost_ratio
    unknown = {r["id"]: r.get("unknown_chars") for r in rows}
    return {"n_rows": len(rows), "n_problems": len({r["id"] for r in rows}), "policies": policies,
            "problems_with_unknown_chars": sum(bool(v) for v in unknown.values()),
            "unknown_chars_known": any(v is not None for v in unknown.values())}


def _wrote_rows(session: dict) -> bool:
    """Did this session (of run.json) write rows? A killed one did not record its count."""
    return bool(session.get("solved")) or not session.get("finished")


def summarize(out_dir: str | Path, *, plots: bool = True) -> dict:
    """Recompute summary.json, summary.md (and the plots) of a run directory from its
    results.jsonl; run.json adds the command, commit and settings."""
    out = Path(out_dir)
    rows = load_results(out / RESULTS_FILE)
    header = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    settings = header.get("settings", {})
    sessions = header.get("sessions", [])
    summary = summarize_rows(rows)
    # rows may also come from other processes' directories appended to this one ("merged_shards")
    writing = [s for s in sessions + [t for m in header.get("merged_shards", []) for t in m["sessions"]]
               if _wrote_rows(s)]
    summary.update({
        "dataset": settings.get("dataset"), "budget": settings.get("budget"),
        "models": settings.get("models"), "command": header.get("command"),
        # the commit of the last session that wrote rows (a resume that found all done wrote none)
        "commit": next((s["commit"] for s in reversed(sessions) if _wrote_rows(s)),
                       sessions[-1]["commit"] if sessions else package_commit()),
        "commits": sorted({s["commit"] for s in writing}),  # every commit that wrote rows
        # the last session that solved anything warmed up; a resume that found all done did not
        "warmup_seconds": next((s["warmup_seconds"] for s in reversed(sessions) if s["warmup_seconds"]), {}),
        "expected_rows": (settings["n_problems"] * len(settings["policies"])) if settings else None,
    })
    accuracies = [s["accuracy"] for s in summary["policies"].values() if s["accuracy"] is not None]
    # The embedded pair on another dataset is a smoke test of the path, whatever a lucky
    # guess scores; any other models earn the note only by scoring near zero everywhere.
    embedded_pair = bool(summary["models"]) and all(str(m["name"]).startswith("embedded:")
                                                   for m in summary["models"])
    summary["tiny_model_note"] = bool(summary["dataset"] != "embedded" and accuracies
                                      and (embedded_pair or max(accuracies) < _NEAR_ZERO))
    _write_json(out / SUMMARY_JSON, summary)
    (out / SUMMARY_MD).write_text(_markdown(summary) + "\n")
    if plots:
        _plot(summary, rows, out)
    return summary


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(summary: dict) -> str:
    models = " -> ".join(f"{m['name']} ({m['parameters']:,} params)" for m in summary.get("models") or [])
    lines = [
        f"# Benchmark: {summary.get('dataset')} ({summary['n_problems']} problems)",
        "",
        f"Command: `{summary.get('command')}`  ",
        f"Commit: `{summary.get('commit')}`"
        + (f" (rows written under {', '.join(f'`{c}`' for c in summary['commits'])})"
           if len(summary.get("commits") or []) > 1 else "") + "  ",
        f"Models: {models or '?'}  ",
        f"Budget (hard cap per problem): {_fmt(summary.get('budget'), 'g')}",
        "",
        ("| policy | n | accuracy (95% CI) | mean s | p50 s | p95 s | speedup vs large | mean cost "
         "| cost vs large | escalation rate | tokens out per tier | model s per tier |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["policies"].items():
        if s["accuracy"] is None:
            accuracy = "- (no reference answers)"
        else:
            accuracy = f"{s['accuracy']:.3f} ({s['accuracy_ci95'][0]:.3f}-{s['accuracy_ci95'][1]:.3f})"
        tokens = ", ".join(f"{t} {_fmt(v['generated'], '.1f')}" for t, v in s["mean_tokens"].items())
        seconds = ", ".join(f"{t} {_fmt(v, '.4f')}" for t, v in s["mean_seconds_per_tier"].items())
        wall = s["wall_seconds"]
        lines.append(f"| {name} | {s['n']} | {accuracy} | {_fmt(wall['mean'], '.4f')} | "
                     f"{_fmt(wall['p50'], '.4f')} | {_fmt(wall['p95'], '.4f')} | "
                     f"{_fmt(s['speedup_vs_large'], '.2f')} | {_fmt(s['mean_cost'], '.2f')} | "
                     f"{_fmt(s['cost_ratio_vs_large'], '.3f')} | {_fmt(s['escalation_rate'], '.3f')} | "
                     f"{tokens} | {seconds} |")
    lines.append("")
    if summary["expected_rows"] is not None and summary["n_rows"] < summary["expected_rows"]:
        lines.append(f"**Incomplete**: {summary['n_rows']} of {summary['expected_rows']} (problem, policy) "
                     "pairs; re-run the same command to resume.  ")
    if summary.get("tiny_model_note"):
        lines.append("**Note**: accuracy is near zero, as expected: the models are too small for "
                     f"{summary['dataset']!r} (the embedded pair was trained only on its synthetic task and "
                     "cannot read natural language). This run proves the path end to end "
                     "(loading, prompting, "
                     "grading, timing); its cost, latency and escalation figures are measured, its accuracy "
                     "is not informative.  ")
    if summary.get("problems_with_unknown_chars"):
        lines.append(f"**Tokenizer**: {summary['problems_with_unknown_chars']} of {summary['n_problems']} "
                     "problems contain characters the models' tokenizers cannot represent (read as the "
                     "unknown token; per problem: `unknown_chars` in results.jsonl).  ")
    warm = summary.get("warmup_seconds") or {}
    if warm:
        lines.append("Warm-up solve per policy (excluded): "
                     + ", ".join(f"{k} {v:.3f} s" for k, v in warm.items()) + ".  ")
    lines.append("Latency: wall seconds per problem, batch 1, policies interleaved per problem; "
                 "model s per tier: seconds inside each model's calls (the rest is runtime overhead). "
                 "Cost: large-model token equivalents.")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOT_FILES)]
    return "\n".join(lines)


def _plot(summary: dict, rows: Sequence[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    policies = summary["policies"]
    title = f"{summary.get('dataset')} ({summary['n_problems']} problems)"
    for file_name, key, xlabel in (("accuracy_vs_cost.png", "mean_cost",
                                    "mean cost per problem (large-token eq.)"),
                                   ("accuracy_vs_latency.png", "latency", "mean wall seconds per problem")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, s in policies.items():
            x = s["wall_seconds"]["mean"] if key == "latency" else s["mean_cost"]
            y = s["accuracy"] if s["accuracy"] is not None else math.nan
            ci = s["accuracy_ci95"]
            # max(0, ..): a Wilson interval at 100 % ends at 1 only up to float rounding
            yerr = [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]] if ci is not None else None
            ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, label=name)
            if math.isfinite(y):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if all(s["accuracy"] is None for s in policies.values()):
            ax.text(0.5, 0.5, "no reference answers: accuracy not measured", ha="center",
                    transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (95% Wilson CI)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file_name, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, s in policies.items():
        rates = s["escalation_by_step"]
        ax.plot(range(len(rates)), rates, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step index")
    ax.set_ylabel("fraction of steps written by a tier > 0")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"escalation rate by step, {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "escalation_by_step.png", dpi=110)
    plt.close(fig)
