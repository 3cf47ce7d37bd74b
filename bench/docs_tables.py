"""The result tables of README.md and docs/*.md, generated from the committed JSON under bench/results/.

    python -m bench.docs_tables            # rewrite every marked region in place
    python -m bench.docs_tables --check    # exit 1, naming each region that differs

A region is the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME is a key
of `TABLES`. Its whole content is rebuilt from the JSON, with a provenance line (the pair,
the commands and commits the JSON records), so a figure edited by hand, or a JSON changed
without regenerating, shows up as a difference (tests/bench/test_docs_tables.py checks it).
The same NAME may appear in several files; each copy gets the same text.

Run from a source checkout: run outputs are not packaged in the wheel.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bench.paired import clairvoyant_cost_summary, clairvoyant_summary, format_interval

__all__ = ["TABLES", "DOC_FILES", "render", "rewrite", "stale_regions"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC_FILES = ("README.md", "docs/*.md")

_REGION = re.compile(r"(<!-- table:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)",
                     re.DOTALL)


# ---- formatting ---------------------------------------------------------------------------------

def _load(relative: str, results: Path) -> dict:
    path = results / relative
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the committed result this table is built from is missing") from None


def _short(commit: str) -> str:
    dirty = commit.endswith("-dirty")
    return commit[:7] + (" (uncommitted changes)" if dirty else "")


def _commits(commits: Iterable[str]) -> str:
    return ", ".join(f"`{_short(c)}`" for c in dict.fromkeys(commits))


def _pair(models: Iterable[dict]) -> str:
    """`embedded:small` -> `embedded:large` from a results file's model records."""
    names = []
    for model in models:
        name = model["name"]
        shipped = re.search(r"cascade/embedded/(\w+)$", name)  # older reports record the path
        names.append(f"embedded:{shipped.group(1)}" if shipped else name)
    return " -> ".join(f"`{n}`" for n in names)


def _command(command: str) -> str:
    # gate_report commands carry their free-text notes (--note '...'); the notes are in the
    # report itself, the provenance line keeps the command that matters.
    head = command.split(" --note ")[0]
    return head + (" --note ..." if head != command else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(x: float) -> str:
    return f"{x:.2f}x"


def _source(*relative: str) -> str:
    return ", ".join(f"[`bench/results/{r}`]({{root}}bench/results/{r})" for r in relative)


# ---- the tables ---------------------------------------------------------------------------------

def gates(results: Path) -> list[str]:
    """The headline: each gate at matched accuracy (within the tolerance of large-only)."""
    report = _load("gates/report.json", results)
    summary = _load("gates/run/summary.json", results)
    names = {"confidence": "confidence", "advantage": "advantage, logistic router",
             "advantage:seq": "advantage, sequence router", "verify": "verify",
             "verify-ahead": "verify + draft ahead", "verify-fix": "verify + token rewrite + draft ahead",
             "oracle": "oracle (upper bound)"}
    rows = [(names.get(family, family), f"`{m['policy']}`", f"{m['accuracy']:.3f}",
             f"{m['cost_vs_large']:.3f}", _ratio(m["speedup_vs_large"]), f"{m['step_escalation_rate']:.3f}")
            if m["policy"] is not None else (names.get(family, family), "none reaches it", "-", "-", "-", "-")
            for family, m in report["matched"].items()]
    large = report["policies"]["large"]
    return _table(("gate", "policy", "accuracy", "cost vs large", "wall speedup vs large", "steps escalated"),
                  rows) + [
        "",
        f"{report['n_problems']} held-out embedded test problems; large-only accuracy "
        f"{large['accuracy']:.3f}, matched = within {report['tolerance']:g} of it "
        f"(>= {report['target_accuracy']:g}). Pair {_pair(summary['models'])}. "
        f"Run: `{report['run_commands'][0]}` at {_commits(report['run_commits'])}; "
        f"table: `{_command(report['command'])}` at {_commits([report['commit']])}. "
        f"Source: {_source('gates/report.json')}."]


def _matched_table(relative: str, results: Path) -> list[str]:
    report = _load(relative + "/report.json", results)
    summary = _load(relative + "/run/summary.json", results)
    rows = [(f"`{m['policy']}`", f"{m['accuracy']:.3f}", f"{m['cost_vs_large']:.3f}",
             _ratio(m["speedup_vs_large"]), f"{m['step_escalation_rate']:.3f}")
            if m["policy"] is not None else (f"`{family}`: no threshold run reaches it", "-", "-", "-", "-")
            for family, m in report["matched"].items()]
    large = report["policies"]["large"]
    return _table(("policy at matched accuracy", "accuracy", "cost vs large", "wall speedup vs large",
                   "steps escalated"), rows) + [
        "",
        f"{report['n_problems']} embedded test problems; large-only accuracy {large['accuracy']:.3f}. "
        f"Pair {_pair(summary['models'])}. "
        f"Run: `{report['run_commands'][0]}` at {_commits(report['run_commits'])}; "
        f"table: `{_command(report['command'])}` at {_commits([report['commit']])}. "
        f"Source: {_source(relative + '/report.json')}."]


def reader(results: Path) -> list[str]:
    """Routers that read a cheaper model's log-probabilities of the draft (`advantage:rd`)."""
    return _matched_table("reader", results)


def screened(results: Path) -> list[str]:
    """Verification screened by the sequence router (`verify-fix:seq=S@T`)."""
    return _matched_table("screened", results)


def gate_targets(results: Path) -> list[str]:
    """The two targets of the gates run and the router runs, and the routers' held-out AUROC."""
    rows, provenance = [], []
    for relative in ("gates", "reader"):
        report = _load(relative + "/report.json", results)
        pair = _pair(_load(relative + "/run/summary.json", results)["models"])
        provenance.append(f"{relative}: pair {pair}, `cascade bench` at {_commits(report['run_commits'])}, "
                          f"`python -m bench.gate_report` at {_commits([report['commit']])}")
        t = report["targets"]
        rows.append((f"[{relative}]({{root}}bench/results/{relative}/report.md)", f"`{t['best_gate']}`",
                     f"{_ratio(t['best_speedup_vs_large'])} (target {_ratio(t['speedup_target'])})",
                     f"`{t['advantage_gap_family']}`",
                     f"{100 * t['advantage_gap_closed']:.1f} % "
                     f"(target {100 * t['advantage_gap_target']:.0f} %)",
                     ", ".join(f"{name or 'logistic'} {r['metrics']['auroc']:.3f}"
                               for name, r in report["routers"].items())))
    return _table(("run", "fastest gate at matched accuracy", "its speedup vs large", "best router",
                   "confidence-to-oracle gap closed", "router held-out AUROC"), rows) + [
        "",
        "Gap closed: how far the router's step-escalation rate at matched accuracy moves from the "
        "confidence gate's to the oracle's. Runs (full commands in the tables above): "
        + "; ".join(provenance) + f". Sources: {_source('gates/report.json', 'reader/report.json')}."]


def embedded_bench(results: Path) -> list[str]:
    """Fixed-threshold policies on 500 test problems (the first committed benchmark)."""
    s = _load("embedded_bench/summary.json", results)
    rows = []
    for name, p in s["policies"].items():
        low, high = p["accuracy_ci95"]
        rows.append((f"`{name}`", f"{p['accuracy']:.3f} ({low:.3f}-{high:.3f})",
                     f"{p['wall_seconds']['mean']:.3f}", f"{p['wall_seconds']['p95']:.3f}",
                     f"{p['speedup_vs_large']:.2f}", f"{p['mean_cost']:.1f}", f"{p['escalation_rate']:.3f}"))
    return _table(("policy", "accuracy (95% CI)", "mean s", "p95 s", "speedup vs large", "mean cost",
                   "escalation rate"), rows) + [
        "",
        f"{s['n_problems']} embedded test problems, greedy, batch 1. Pair {_pair(s['models'])}. "
        f"Run: `{s['command']}` at {_commits(s['commits'])} (three processes over problem shards, "
        f"see `run.json`). Source: {_source('embedded_bench/summary.json')}."]


def nl_datasets(results: Path) -> list[str]:
    """The natural-language sets with the embedded pair: the path end to end, accuracy 0."""
    rows, commands, commits, pair = [], [], [], ""
    for dataset in ("gsm8k", "math500", "aime24", "aime25"):
        s = _load(f"{dataset}/summary.json", results)
        p = s["policies"]
        correct = sorted({q["n_correct"] for q in p.values()})
        rows.append((f"[{dataset}]({{root}}bench/results/{dataset}/summary.md)", str(s["n_problems"]),
                     "/".join(str(c) for c in correct) + f"/{s['n_problems']}",
                     f"{p['small']['wall_seconds']['mean']:.2f} / {p['large']['wall_seconds']['mean']:.2f}",
                     f"{p['small']['mean_cost']:.1f} / {p['large']['mean_cost']:.1f}",
                     f"{s['problems_with_unknown_chars']}/{s['n_problems']}"))
        commands.append(s["command"])
        commits += s["commits"]
        pair = _pair(s["models"])
    policies = ",".join(p for p in _load("gsm8k/summary.json", results)["policies"])
    return _table(("dataset", "problems", "correct, every policy", "mean s: small / large",
                   "mean cost: small / large", "problems with unknown characters"), rows) + [
        "",
        f"Policies `{policies}`. Pair {pair}. Runs: `{commands[0]}` (and the same with each dataset) "
        f"at {_commits(commits)}. Sources: `bench/results/{{gsm8k,math500,aime24,aime25}}/summary.json`."]


def calibration(results: Path) -> list[str]:
    """Label-free calibration at five budgets: the chosen threshold against the test split."""
    r = _load("calibration/report.json", results)
    rows = [(f"{b['budget']:g}", f"{b['threshold']:g}", f"{b['test_violation']:.3f}",
             f"{b['test_accuracy']:.3f}", f"{b['test_mean_cost']:.1f}", f"{b['oracle_threshold']:g}",
             f"{b['oracle_accuracy']:.3f}")
            for b in r["budgets"]]
    return _table(("budget", "chosen threshold", f"test P(cost > B) (alpha {r['alpha']:g})", "test accuracy",
                   "test mean cost", "best threshold with labels", "its accuracy"), rows) + [
        "",
        f"LTT, alpha {r['alpha']:g}, delta {r['delta']:g}, {r['n_cal']} unlabeled calibration problems, "
        f"{r['n_test']} test problems; small-only mean cost {r['small_only_mean_cost']:.1f}, large-only "
        f"{r['large_only_mean_cost']:.1f}. Pair `embedded:small` -> `embedded:large` (the script's "
        f"`embedded_cascade()`). Run: `{r['command'].strip()}` at {_commits([r['commit']])}. "
        f"Source: {_source('calibration/report.json')}."]


def trio(results: Path) -> list[str]:
    """Two- and three-tier cascades with the medium model, calibrated at the same budgets."""
    r = _load("trio/report.json", results)
    rows = []
    for name, s in r["summary"].items():
        low, high = s["accuracy_ci95"]
        thresholds = s.get("thresholds")
        rows.append((name.replace("->", " -> "), f"{s['accuracy']:.3f} ({low:.3f}-{high:.3f})",
                     f"{s['mean_cost']:.1f}", f"{s['mean_wall_seconds']:.3f}",
                     ", ".join(f"{t:g}" for t in thresholds) if thresholds else "-"))
    header = ("cascade", "accuracy (95% CI)", "mean cost", "mean wall s", "calibrated thresholds")
    return _table(header, rows) + [
        "",
        f"{r['n_test']} test problems, {r['n_calibration']} calibration problems, alpha {r['alpha']:g}, "
        f"delta {r['delta']:g}. Models {_pair(r['models'].values())}. "
        f"Run: `{r['command']}` at {_commits([r['commit']])}. Source: {_source('trio/report.json')}."]


def throughput(results: Path) -> list[str]:
    """`solve_many` against sequential `solve`, in one process and with the large model isolated."""
    r = _load("throughput/report.json", results)
    rows = [(run["setup"], f"`{run['mode']}`", str(run["concurrency"]), f"{run['throughput']:.2f}",
             _ratio(run["speedup"]), f"{run['latency_p95']:.2f}", "yes" if run["same_traces"] else "NO")
            for run in r["runs"]]
    return _table(("setup", "call", "concurrency", "problems/s", "vs sequential", "p95 latency s",
                   "same traces"), rows) + [
        "",
        f"{r['n']} embedded test problems, {r['torch_threads']} torch thread per process, {r['machine']}; "
        f"baseline: the mean of the sequential in-process runs, {r['baseline_throughput']:.2f} problems/s. "
        f"Models `{r['models']}`, gate `{r['gate']}`. Run: `{r['command']}` at {_commits([r['commit']])}. "
        f"Source: {_source('throughput/report.json')}."]


def serve_load(results: Path) -> list[str]:
    """Closed-loop load against `cascade serve`, in one process and `--isolate`."""
    rows, provenance = [], []
    for relative in ("serve", "serve_isolated"):
        r = _load(relative + "/report.json", results)
        for level in r["levels"]:
            rows.append((f"`{r['server_command'].split('  ')[0]}`", str(level["clients"]),
                         f"{level['completed_200']}/{level['requests_planned']}",
                         str(level["errors"] + level["lost"]), str(level["hard_cap_violations"]),
                         f"{level['throughput_rps']:.1f}", f"{level['latency_p50_s']:.2f}",
                         f"{level['latency_p99_s']:.2f}"))
        provenance.append(f"`{r['command']}` at {_commits([r['commit']])} ({r['machine']})")
    return _table(("server", "clients", "answered 200", "errors + lost", "hard-cap violations", "requests/s",
                   "p50 s", "p99 s"), rows) + [
        "",
        f"Budget {r['budget']:g} per request; the server runs the embedded default pair "
        "(`embedded:small` -> `embedded:large`). Runs: " + "; ".join(provenance) + ". "
        f"Sources: {_source('serve/report.json', 'serve_isolated/report.json')}."]


def overhead(results: Path) -> list[str]:
    """Milliseconds per decoded token: the step runtime against bare `model.generate`."""
    r = _load("overhead/report.json", results)
    rows = [(f"`embedded:{tier}`", str(t["steps"]), str(t["tokens"]), f"{t['cascade_ms_per_token']:.2f}",
             f"{t['generate_ms_per_token']:.2f}", f"{100 * t['overhead_fraction']:+.1f} %")
            for tier, t in r["tiers"].items()]
    return _table(("model", "steps", "tokens", "runtime ms/token", "generate ms/token", "overhead"), rows) + [
        "",
        f"{r['n']} embedded test problems, batch 1, {r['threads']} torch thread; load average "
        f"{r['load_average_before']:.2f} before, {r['load_average_after']:.2f} after. "
        f"Run: `{r['command'].strip()}` at {_commits([r['commit']])}. "
        f"Source: {_source('overhead/report.json')}."]


def embedded_pair(results: Path) -> list[str]:
    """The shipped pair alone and with a confidence gate, 1000 test problems."""
    r = _load("embedded_pair/report.json", results)
    rows = []
    for name, s in r["summary"].items():
        low, high = s["accuracy_ci95"]
        rows.append((f"`{name}`", f"{s['accuracy']:.3f} ({low:.3f}-{high:.3f})", f"{s['mean_cost']:.1f}",
                     f"{s['escalation_rate']:.3f}", f"{s['mean_wall_seconds']:.3f}",
                     f"{s['gap_recovered']:.2f}"))
    auroc = ", ".join(f"{k} {v:.3f}" for k, v in r["step_auroc_confidence_vs_correct"].items())
    task = r["task_config"]
    return _table(("policy", "accuracy (95% CI)", "mean cost", "escalation rate", "mean wall s",
                   "accuracy gap recovered"), rows) + [
        "",
        f"{r['n_problems']} {r['split']}-split problems "
        f"({task['min_steps']}-{task['max_steps']} derived variables, ops `{task['ops']}`, "
        f"values 0-{task['max_value']}), {r['machine']}. Small-model step AUROC of "
        f"confidence vs correctness: {auroc}; large/small seconds per step "
        f"{r['seconds_per_step']['ratio']:.1f}x. Pair {_pair(r['models'].values())}. "
        f"Run: `{r['command']}` at {_commits([r['commit']])}. "
        f"Source: {_source('embedded_pair/report.json')}."]


def model_accuracy(results: Path) -> list[str]:
    """Each shipped model alone: the pair report (1000 problems) and the trio run (300)."""
    pair = _load("embedded_pair/report.json", results)
    tri = _load("trio/report.json", results)
    rows = []
    for size in ("small", "medium", "large"):
        model = tri["models"][size]
        cells = [f"`{model['name']}`", f"{model['parameters']:,}"]
        for summary, n in ((pair["summary"], pair["n_problems"]), (tri["summary"], tri["n_test"])):
            s = summary.get(size) or summary.get(f"{size}-only")
            cells.append(f"{s['accuracy']:.3f} ({n})" if s else "-")
        rows.append(cells)
    return _table(("model", "parameters", "accuracy alone: pair report (problems)",
                   "accuracy alone: three-tier run (problems)"), rows) + [
        "",
        f"Test-split problems. Runs: `{pair['command']}` at {_commits([pair['commit']])}; "
        f"`{tri['command']}` at {_commits([tri['commit']])}. "
        f"Sources: {_source('embedded_pair/report.json', 'trio/report.json')}."]


def pair_accuracy(results: Path) -> list[str]:
    """One line for the README: the shipped pair's accuracy alone."""
    r = _load("embedded_pair/report.json", results)
    small, large = (r["summary"][k]["accuracy"] for k in ("small", "large"))
    return [f"Measured alone on {r['n_problems']} test problems: `embedded:small` {small:.3f}, "
            f"`embedded:large` {large:.3f} (`{r['command']}` at {_commits([r['commit']])})."]


def _budget_curve(results: Path, suffix: str, folder: str = "budget_curve") -> list[str]:
    r = _load(f"{folder}/report{suffix}.json", results)
    large = r["test_large_mean_cost"]
    points = {(p["method"], p["budget"]): p for p in r["points"]}
    bars = {o["budget"]: o for o in r["oracle"]}

    def cell(method: str, budget: float) -> str:
        p = points.get((method, budget))
        if p is None or p["index"] is None:
            return "none certified"
        return f"{p['test_accuracy']:.3f} ({p['gap_recovered']:.2f}; cost {p['test_mean_cost']:.0f})"

    def bar(budget: float, key: str) -> str:
        entry = bars[budget].get(key)
        return f"{entry['test_accuracy']:.3f}" if entry else "-"

    rows = [(f"{b:.1f} ({b / large:.2f}x)", *(cell(m, b) for m in ("budget", "risk", "conformal", "ltt")),
             bar(b, "labelled_certified"), bar(b, "labelled_calibration"), bar(b, "oracle"))
            for b in r["budgets"]]
    header = ("budget B (x large-only)", "budget-aware, E[cost] <= B", "one threshold, E[cost] <= B",
              "C3PO: P(cost > B) <= alpha, conformal", "P(cost > B) <= alpha, LTT",
              "labelled choice, budget-aware guarantee", "labelled choice, no margin",
              "oracle (test labels)")
    test = "the test split" if r["test_split"] == "test" else "problems of the independent generator"
    return _table(header, rows) + [
        "",
        f"Test accuracy (gap recovered; test mean cost) of the label-free choice, {r['n_cal']} unlabeled "
        f"calibration problems, {r['n_test']} test problems from {test}: small alone "
        f"{r['test_small_accuracy']:.3f}, large alone {r['test_large_accuracy']:.3f} at mean cost "
        f"{large:.1f}. "
        f"alpha {r['alpha']:g}, delta {r['delta']:g}, cap {r['cap_factor']:g} x B for the budget-aware "
        f"gate. Gate score: `{r['gate']['inner'].split('(')[0]}`"
        + (f" (router `{r['router']}`)" if r.get("router") else "")
        + f". Pair `embedded:small` -> `embedded:large`. Run: `{r['command'].strip()}` at "
        f"{_commits([r['commit']])} (swept at {_commits([r['sweep_commit']])}). "
        f"Source: {_source(f'{folder}/report{suffix}.json')}."]


def budget_curve(results: Path) -> list[str]:
    """Accuracy against budget for every calibration method, the task's test split."""
    return _budget_curve(results, "")


def budget_curve_independent(results: Path) -> list[str]:
    """The same curve on problems of the independently written generator."""
    return _budget_curve(results, "_independent")


def budget_curve_seq(results: Path) -> list[str]:
    """The curve with the sequence router's score in place of the confidence gate's."""
    return _budget_curve(results, "", "budget_curve_seq")


def budget_curve_seq_independent(results: Path) -> list[str]:
    """The same on problems of the independently written generator."""
    return _budget_curve(results, "_independent", "budget_curve_seq")


def _resolve_probe(results: Path, folder: str) -> list[str]:
    r = _load(f"{folder}/report.json", results)
    splits = r["splits"]

    def cell(row: dict) -> str:
        c = row.get("certified")
        return (f"{c['test_accuracy']:.3f} ({c['gap_recovered']:.2f}; cost {c['test_mean_cost']:.0f}; "
                f"cap {c['cap_intervened']:.2f})" if c else "none certified")

    def step(row: dict) -> str:
        st = row.get("budget_aware_step_cascade")
        if not st or st.get("test_accuracy") is None:
            return "none certified"
        return f"{st['test_accuracy']:.3f} ({st['gap_recovered']:.2f})"

    names = list(splits)
    rows = []
    for k, first in enumerate(splits[names[0]]["rows"]):
        cells = []
        for name in names:
            row = splits[name]["rows"][k]
            cells += [cell(row), step(row)]
        rows.append((f"{first['budget']:.1f} ({first['budget_x_large']:.2f}x)", *cells))
    header = ["budget B (x large-only)"]
    for name in names:
        header += [f"{name}: re-solve", f"{name}: budget-aware step cascade"]
    sizes = ", ".join(f"{name} {s['small_accuracy']:.3f} -> {s['large_accuracy']:.3f} (large-only mean cost "
                      f"{s['large_mean_cost']:.1f})" for name, s in splits.items())
    return _table(header, rows) + [
        "",
        f"Test accuracy (gap recovered; test mean cost; fraction of requests on which the cap intervened) "
        f"of the label-free certified re-solve, {r['n_calibration']} unlabeled calibration problems, "
        f"{r['n_test']} problems per test set (small alone -> large alone: {sizes}); E[cost] <= B by "
        f"conformal risk control, every request under the hard cap {r['cap_factor']:g} x B; the step "
        f"cascade's column is the budget-aware method of the curve "
        f"above (cap 3 x B). Gate `{r['gate']}`. Pair `embedded:small` -> `embedded:large`. Run: "
        f"`{r['command']}` at {_commits([r['commit']])}. Source: {_source(f'{folder}/report.json')}."]


def resolve_probe_bars(results: Path) -> list[str]:
    """The certified re-solve against label-using choices of its own family, on the test split,
    and over random calibration/test splits of the pooled problems, for each cap."""
    rows, sources = [], []
    for folder in ("resolve_probe", "resolve_probe_cap6"):
        r = _load(f"{folder}/report.json", results)
        sources.append((r, folder))
        by_budget = {row["budget"]: row for row in r["random_splits"]}
        for row in r["splits"]["test"]["rows"]:
            c, bars = row.get("certified"), row["bars"]
            spread = by_budget[row["budget"]]
            cells = [f"{row['budget']:.1f} ({row['budget_x_large']:.2f}x)", f"{r['cap_factor']:g} x B",
                     (f"{c['test_accuracy']:.3f} ({c['gap_recovered']:.2f})" if c else "none certified")]
            cells += [f"{b['test_accuracy']:.3f} ({b['gap_recovered']:.2f})"
                      if (b := bars.get(name)) else "none"
                      for name in ("labelled_certified", "labelled_calibration", "oracle")]
            if spread["mean_gap_recovered"] is None:
                cells += ["none certified", "-"]
            else:
                low, high = spread["gap_recovered_5_95"]
                cells += [f"{spread['mean_gap_recovered']:.2f} ({low:.2f}-{high:.2f})",
                          f"{spread['mean_test_cost']:.1f}"]
            rows.append(tuple(cells))
    header = ["budget B (x large-only)", "cap", "label-free certified: test accuracy (gap)",
              "labelled choice on cal., same guarantee", "labelled choice on cal., no margin",
              "oracle: best re-solve column with test mean cost <= B (test labels)",
              "over random splits: gap recovered, mean (5-95 %)", "over random splits: mean test cost"]
    r = sources[0][0]
    test = r["splits"]["test"]
    runs = "; ".join(f"`{x['command']}` at {_commits([x['commit']])} ({_source(f'{f}/report.json')})"
                     for x, f in sources)
    return _table(header, rows) + [
        "",
        f"Test split ({r['n_test']} problems; small alone {test['small_accuracy']:.3f}, large alone "
        f"{test['large_accuracy']:.3f}). The labelled choices and the oracle pick among the same re-solve "
        f"columns (thresholds) under the same cap: with the {r['n_calibration']} calibration problems' "
        f"answers and the same conformal risk control, with those answers and no margin (calibration "
        f"mean cost <= B), and with the test problems' answers and costs. Random splits: "
        f"{r['random_splits'][0]['splits']} draws of {r['n_calibration']} calibration rows from the pooled "
        f"{r['n_calibration'] + r['n_test']} calibration and test-split problems, the rest tested; "
        f"E[cost] <= B is promised over the draw, so the mean test cost is the promise's check. "
        f"Pair `embedded:small` -> "
        f"`embedded:large`. Runs: {runs}."]


def curve_cli(results: Path) -> list[str]:
    """`cascade bench --curve`: every method's certified point per budget, and the oracle."""
    r = _load("curve_cli/curve.json", results)
    methods = list(dict.fromkeys(p["method"] for p in r["points"]))
    large = r["test_large_mean_cost"]
    oracle = {o["budget"]: o.get("oracle") for o in r["oracle"]}
    paced_methods = list(dict.fromkeys(p["method"] for p in r.get("paced", [])))
    rows = []
    for b in r["budgets"]:
        cells = [f"{b:.1f} ({b / large:.2f}x)"]
        for method in methods:
            p = next(q for q in r["points"] if q["method"] == method and q["budget"] == b)
            cells.append("none certified" if p["index"] is None else f"{p['test_accuracy']:.3f} "
                         f"({p['gap_recovered']:.2f}; cost {p['test_mean_cost']:.0f})")
        for method in paced_methods:
            q = next(q for q in r["paced"] if q["method"] == method and q["budget"] == b)
            cells.append(f"{q['test_accuracy']:.3f} ({q['gap_recovered']:.2f}; "
                         f"cost {q['test_mean_cost']:.1f})")
        cells.append(f"{oracle[b]['test_accuracy']:.3f}" if oracle[b] else "-")
        rows.append(tuple(cells))
    header = ["budget B (x large-only)", *methods, *(f"{m}, paced online" for m in paced_methods),
              "oracle (test labels)"]
    return _table(header, rows) + [
        "",
        f"Test accuracy (gap recovered between small alone {r['test_small_accuracy']:.3f} and large alone "
        f"{r['test_large_accuracy']:.3f}; test mean cost) of each method's policy certified on "
        f"{r['n_calibration']} unlabeled problems, on {r['n_test']} test-split problems; hard cap "
        f"{r['cap_factor']:g} x B for budget and resolve; "
        + ("the paced columns serve the test problems in order from the certified threshold, moving it as "
           "each finishes (`BudgetCurve.paced`, mean cost held at B); " if paced_methods else "")
        + f"gate score `{r['gate']['inner']}`. Pair "
        f"`embedded:small` -> `embedded:large`. Run: `bash runs/curve_cli.sh` (its second command: "
        f"`{r['command']}`) at {_commits([r['commit']])}. Source: {_source('curve_cli/curve.json')}."]


def resolve_probe(results: Path) -> list[str]:
    """The problem-level re-solve (resolve mode) certified at the curve's budgets, cap 3 x B."""
    return _resolve_probe(results, "resolve_probe")


def resolve_probe_cap6(results: Path) -> list[str]:
    """The same under the hard cap 6 x B."""
    return _resolve_probe(results, "resolve_probe_cap6")


def resolve_probe_calibration_size(results: Path) -> list[str]:
    """What more unlabeled calibration problems buy the certified re-solve (cap 6 x B): the
    same random splits of one pool of problems at several calibration sizes, and the one run
    certified on the largest."""
    folder = "resolve_probe_cap6_cal400"
    r = _load(f"{folder}/report.json", results)
    by_size = r["random_splits_by_calibration_size"]
    sizes = sorted(by_size, key=int)
    splits = r["splits"]
    rows = []
    for k, first in enumerate(splits["test"]["rows"]):
        cells = [f"{first['budget']:.1f} ({first['budget_x_large']:.2f}x)"]
        for n in sizes:
            spread = by_size[n][k]
            if spread["mean_gap_recovered"] is None:
                cells.append("none certified")
            else:
                low, high = spread["gap_recovered_5_95"]
                cells.append(f"{spread['mean_gap_recovered']:.2f} ({low:.2f}-{high:.2f}); cost "
                             f"{spread['mean_test_cost']:.1f}")
        for name in splits:
            c = splits[name]["rows"][k].get("certified")
            cells.append(f"{c['test_accuracy']:.3f} ({c['gap_recovered']:.2f}; "
                         f"cost {c['test_mean_cost']:.0f})" if c else "none certified")
        rows.append(tuple(cells))
    header = (["budget B (x large-only)"]
              + [f"random splits, {n} calibration rows: gap recovered, mean (5-95 %); mean test cost"
                 for n in sizes]
              + [f"{name}, certified on {r['n_calibration']}: accuracy (gap; cost)" for name in splits])
    pool = r["n_calibration"] + r["n_test"]
    return _table(header, rows) + [
        "",
        f"Re-solve (`{r['gate']}`), E[cost] <= B by conformal risk control, every request under the hard "
        f"cap {r['cap_factor']:g} x B. Random splits: {r['random_splits'][0]['splits']} draws from one pool "
        f"of {pool} problems ({r['n_calibration']} calibration-split and {r['n_test']} test-split problems), "
        f"n calibration rows each, the rest tested (the same draws' seed for every n); E[cost] <= B is "
        f"promised over the draw. The last columns: the threshold certified on the {r['n_calibration']} "
        f"calibration-split problems, run on {r['n_test']} problems of each test set. Pair "
        f"`embedded:small` -> `embedded:large`. Run: `{r['command']}` at {_commits([r['commit']])}. "
        f"Source: {_source(f'{folder}/report.json')}."]


def pacing(results: Path) -> list[str]:
    """The certified re-solve served static and paced online, on both test sets."""
    r = _load("pacing/report.json", results)
    step = "2.0"
    rows = []
    for name, data in r["sets"].items():
        for row in data["rows"]:
            if row["certified"] is None:
                rows.append((name, f"{row['budget']:.1f}", "none certified", "-", "-"))
                continue
            c, paced = row["certified"], row["paced"][step]
            o, many = paced["in_order"], paced["random_orders"]
            low, high = many["gap_recovered_5_95"]
            held = "yes" if many["ceiling_held"] else "NO"
            rows.append((name, f"{row['budget']:.1f}",
                         f"{c['gap_recovered']:.2f} (cost {c['mean_cost']:.1f})",
                         f"{o['gap_recovered']:.2f} (cost {o['mean_cost']:.1f}; ceiling {o['ceiling']:.1f})",
                         f"{many['gap_recovered_mean']:.2f} ({low:.2f}-{high:.2f}); "
                         f"cost {many['mean_cost_mean']:.1f}, max {many['mean_cost_max']:.1f}; held {held}"))
    header = ("test set", "budget B", "certified, static: gap recovered (mean cost)",
              "paced, in order: gap recovered (mean cost; ceiling)",
              f"paced, {r['orders']} random orders: gap recovered, mean (5-95 %); mean cost, max; "
              "ceiling held")
    sizes = ", ".join(f"{name} {data['n']} (small alone {data['small_accuracy']:.3f}, large alone "
                      f"{data['large_accuracy']:.3f})" for name, data in r["sets"].items())
    check = r["runtime_check"]
    return _table(header, rows) + [
        "",
        f"Re-solve (`{r['gate']}`), every request under the hard cap {r['cap_factor']:g} x B; the static "
        f"column runs the threshold certified on {r['n_calibration']} unlabeled calibration problems "
        f"(E[cost] <= B by conformal risk control); the paced columns start there and move {step[:-2]} "
        f"thresholds per B of over- or underspend (`calibration.BudgetPacer`); the ceiling is the "
        f"guaranteed bound on the mean cost for that order. Problems: {sizes}. Replayed on every problem's "
        f"recorded outcome at every threshold; checked through the runtime (`PacedPolicy`) at B = "
        f"{check['budget']:.1f} on the {check['problems']} test problems in order: same costs and answers. "
        f"Pair `embedded:small` -> `embedded:large`. Run: `{r['command']}` at {_commits([r['commit']])}. "
        f"Source: {_source('pacing/report.json')}."]


def pacing_load(results: Path) -> list[str]:
    """The paced re-solve replayed under closed-loop load: the pacer that hears only of finished
    requests against the one that counts the running ones."""
    r = _load("pacing/report.json", results)
    load = r["load"]
    rows = []
    for name, data in r["sets"].items():
        for row in data["rows"]:
            if row["certified"] is None:
                continue
            cells = []
            for clients in load["clients"]:
                level = row["load"][str(clients)]
                cells.append(" / ".join(f"{v['gap_recovered_mean']:.2f} (cost {v['mean_cost_mean']:.1f}, max "
                                        f"{v['mean_cost_max']:.1f})"
                                        for v in (level["finished"], level["running"])))
            held = all(v["ceiling_held"] for level in row["load"].values() for v in level.values())
            rows.append((name, f"{row['budget']:.1f}", *cells, "yes" if held else "NO"))
    header = ("test set", "budget B", *(f"{c} client{'s' if c > 1 else ''}: finished only / counting running"
                                        for c in load["clients"]), "ceiling held")
    return _table(header, rows) + [
        "",
        f"Gap recovered, mean over {load['draws']} streams (mean cost over the stream, mean and max), of the "
        "paced re-solve (step 2) served to closed-loop clients: each stream is "
        f"{load['passes']} passes over the test set in random order, each request runs for as long as it "
        "costs (cost units as time, so cheap requests finish first), the next one starts when one finishes. "
        "'finished only': the pacer moves only when a request finishes; 'counting running': it also counts "
        "each running request's expected final cost given its spend so far (`BudgetPacer.begin`/`spend`). "
        f"Hard cap {r['cap_factor']:g} x B; start: the threshold certified on {r['n_calibration']} unlabeled "
        "problems. Pair `embedded:small` -> `embedded:large`. "
        f"Run: `{r['command']}` at {_commits([r['commit']])}. Source: {_source('pacing/report.json')}."]


# The live paced-server runs: folder -> what the pacer knew of running requests.
SERVE_PACED = (("step_0.5", "finished only"), ("step_2", "finished only"), ("step_8", "finished only"),
               ("step_2_running", "counting running"), ("step_8_running", "counting running"))


def serve_paced(results: Path) -> list[str]:
    """`cascade serve --curve --pace` under closed-loop load, before and after the pacer counted
    running requests."""
    rows, provenance = [], []
    for folder, pacer in SERVE_PACED:
        r = _load(f"serve_paced/{folder}/report.json", results)
        step = r["command"].split("--pace-step ")[1].split()[0]
        for level in r["levels"]:
            paced = level["pacing"]
            rows.append((pacer, step, str(level["clients"]), f"{level['mean_cost']:.1f}",
                         f"{paced['requests']}: {paced['mean_cost']:.1f} (ceiling {paced['ceiling']:.1f})",
                         str(level["hard_cap_violations"]), str(level["errors"] + level["lost"])))
        provenance.append(f"`{r['command']}` at {_commits([r['commit']])}")
    budget = r["levels"][0]["pacing"]["budget"]
    return _table(("pacer", "step", "clients", "level mean cost",
                   "pacer after the level: requests, mean cost (ceiling)", "hard-cap violations",
                   "errors + lost"), rows) + [
        "",
        f"`cascade serve --curve bench/results/curve_cli/curve_file.json --pace {budget:g}` (B = {budget:g}, "
        "the re-solve family, cap 6 x B) under closed-loop load: levels of 1, 16 and 64 clients, the same "
        "150 test-split problems in order per level (300 at 64 clients), one server per run (its pacer's "
        "count includes 4 warm-up requests). 'finished only': the pacer before it counted running "
        "requests; 'counting running': after. Pair `embedded:small` -> `embedded:large`, 2 CPU cores. "
        "Runs: " + "; ".join(provenance) + "."]


def real_pair_gsm8k(results: Path) -> list[str]:
    """The real pair on GSM8K test problems: paired figures of every policy."""
    return _real_pair(results, "real_pair_gsm8k/paired.json")


def real_pair_gsm8k_advantage(results: Path) -> list[str]:
    """The same with the advantage router's policies, run beside it, over the problems both runs hold."""
    return _real_pair(results, "real_pair_gsm8k/paired_advantage.json")


def real_pair_gsm8k_advantage_270(results: Path) -> list[str]:
    """advantage@0.9 over the first 270 problems (its run and its extension) against the main run."""
    return _real_pair(results, "real_pair_gsm8k/paired_advantage_270.json",
                      which="the first ones; advantage@0.9 in two runs of its own beside the main run, "
                            "their wall seconds not paired in time with it")


def real_pair_gsm8k_main(results: Path) -> list[str]:
    """The four main policies over every problem they finished (the main run and its extension)."""
    return _real_pair(results, "real_pair_gsm8k/paired_main.json")


def real_pair_gsm8k_resolve(results: Path) -> list[str]:
    """The resolve-mode policies, run beside the main run, over the problems both hold."""
    return _real_pair(results, "real_pair_gsm8k/paired_resolve.json")


def real_pair_math500(results: Path) -> list[str]:
    """The real pair on MATH-500 problems (a pilot of the same policies' run)."""
    return _real_pair(results, "real_pair_math500/paired.json", "MATH-500 problems")


def real_pair_gsm8k_resolve_wall(results: Path) -> list[str]:
    """The resolve-mode policies timed beside large-only in the same process (problems 198-269)."""
    return _real_pair(results, "real_pair_gsm8k/paired_resolve_wall.json",
                      which="problems 198-269; large and the resolve policies interleaved in one process, "
                            "small's rows from the main run")


def real_pair_paced_live(results: Path) -> list[str]:
    """The paced re-solve run live on the real pair (runs/real_pair/paced_live.py)."""
    r = _load("real_pair_gsm8k/paced_live.json", results)
    rows = []
    for run in r["runs"]:
        used = ", ".join(f"{t}: {n}" for t, n in run["thresholds_used"].items() if n)
        rows.append((f"{run['budget']:g} ({run['budget_x_large']:.2f}x)", str(run["problems"]),
                     f"{run['accuracy']:.3f} ({run['small_accuracy']:.3f} / {run['large_accuracy']:.3f})",
                     "{:.2f} ({:.2f} to {:.2f})".format(run["gap_recovered"], *run["gap_recovered_ci"]),
                     f"{run['mean_cost']:.1f} ({run['ceiling']:.1f})",
                     f"{run['cost_x_large']:.2f}", f"{run['resolved']:.2f}",
                     f"{run['max_cost']:.1f} ({run['cap']:g})", used,
                     *("{:.2f} ({:.2f} to {:.2f}; cost {:.2f}x)".format(
                         v["gap_recovered"], *v["gap_recovered_ci"], v["cost_x_large"])
                       for v in run["static"].values())))
    commits = sorted({run["started_at"] for run in r["runs"]})
    static = [f"static `{policy}`: gap (95% CI; cost x large)" for policy in r["runs"][0]["static"]]
    header = ("budget B (x large's mean cost)", "problems", "accuracy (small / large alone)",
              "gap recovered (95% CI)",
              "mean cost (ceiling)", "cost x large", "re-solved", "max cost (hard cap)", "thresholds run",
              *static)
    return _table(header, rows) + [
        "",
        "GSM8K test problems in order, each solved live by the paced re-solve: "
        f"`ConfidenceGate(T, signal='mean_prob', mode='resolve')`, T paced over {r['thresholds']} "
        f"(step {r['step']:g}, cheapest first) from T = {r['start_threshold']} (the threshold certified "
        f"label-free at B = 200-300 in the replay), every request under the hard cap {r['cap_factor']:g} "
        "x B, the pacer told each request's real cost. Small and large alone, and the static thresholds "
        "through the runtime: the recorded rows of the same problems (`runs/real_pair/gsm8k_test`, "
        "`runs/real_pair/gsm8k_test_resolve`). Pair `qwen2.5-coder-0.5b-instruct-q4_k_m.gguf` -> "
        "`qwen2.5-coder-1.5b-instruct-q4_k_m.gguf` through llama.cpp, one core per run. Runs: "
        f"`taskset -c CORE python runs/real_pair/paced_live.py --budget B --limit N` at {_commits(commits)}; "
        f"table: `{r['command']}` at {_commits([r['commit']])}. "
        "Intervals: paired bootstrap over problems (10000 draws). "
        f"Source: {_source('real_pair_gsm8k/paced_live.json')}."]


def real_pair_what_would_close(results: Path) -> list[str]:
    """Issues 18 and 19's targets against the signal's quality and the small model's price (replay)."""
    r = _load("real_pair_gsm8k/what_would_close.json", results)
    shown = ("0.7", "0.8", "0.9", "1")
    rows = []
    for table in r["tables"]:
        what = (f"{table['policy']}, {table['measure']} <= {table['ratio']:g}x "
                f"(target {table['target_gap']:.0%})")
        rows.append((what, f"measured: {table['measured_signal']} ({table['measured_auroc']:.2f})",
                     *(f"{c['measured']:.2f}" for c in table["cells"])))
        for a in shown:
            rows.append((what, "clairvoyant (1)" if a == "1" else f"AUROC {a}",
                         *(f"{mean:.2f}" + ("" if a == "1" else f" ({met:.0%})")
                           for mean, met in (c["synthetic"][a] for c in table["cells"]))))
    price = r["small_price_x_large"]
    header = ("policy, ratio vs large (target gap)", "signal (AUROC for \"only large solves it\")",
              *(f"small's price x{f:g} (wall {f * price['wall']:.2f}x, cost {f * price['cost']:.2f}x)"
                for f in (c["price_factor"] for c in r["tables"][0]["cells"])))
    return _table(header, rows) + [
        "",
        "Best gap recovered within the ratio, over every number of problems sent to the large model (an "
        f"upper bound for any threshold on the signal), replayed on the first {r['n_problems']} GSM8K test "
        f"problems of the main run (small alone {r['small_accuracy']:.3f}, large alone "
        f"{r['large_accuracy']:.3f}; {r['only_large_fraction']:.3f} solved by the large model only). "
        "Re-solve: the small model solves every problem and the large model solves the sent ones again "
        "(the small solve counted whole); route: the sent problems go to the large model instead. "
        "Measured signals: the small model's mean token probability for the re-solve (its recorded "
        "thresholds), the problem's length for the router (which decides before anything is generated); "
        f"synthetic ones have the stated AUROC, mean over {r['draws']} draws (share of draws that meet "
        "the target); the clairvoyant sends the only-large problems, cheapest first. The small model's "
        "price is its measured seconds or cost units times the factor. Pair "
        "`qwen2.5-coder-0.5b-instruct-q4_k_m.gguf` -> `qwen2.5-coder-1.5b-instruct-q4_k_m.gguf` through "
        f"llama.cpp, one core. Command: `{r['command']}` at {_commits([r['commit']])}. "
        f"Source: {_source('real_pair_gsm8k/what_would_close.json')}."]


def _real_pair(results: Path, relative: str, what: str = "GSM8K test problems",
               which: str = "the first ones; every policy on each, interleaved") -> list[str]:
    r = _load(relative, results)
    rows = []
    for name, p in r["policies"].items():
        label = name if p["rows_of"] == name else f"{name} (= {p['rows_of']})"
        rows.append((f"`{label}`", f"{p['n_correct']}/{r['n_problems']}", f"{p['accuracy']:.3f}",
                     format_interval(p["gap_recovered"], p["gap_recovered_ci95"]),
                     format_interval(p["wall_ratio"], p["wall_ratio_ci95"]),
                     format_interval(p["cost_ratio"], p["cost_ratio_ci95"]), f"{p['mean_wall_seconds']:.1f}"))
    header = ("policy", "correct", "accuracy", "gap recovered (95% CI)", "wall vs large (95% CI)",
              "cost vs large (95% CI)", "mean wall s")
    runs = "; ".join(f"`{run['command']}` at {_commits(run['commits'])}"
                     for run in r["runs"] if run.get("command"))
    models = next((run["models"] for run in r["runs"] if run.get("models")), [])
    targets = r.get("targets") or {}
    summary = clairvoyant_summary(r, targets["gap"], targets.get("wall")) if targets.get("gap") else ""
    if targets.get("gap") and targets.get("cost") is not None:
        by_cost = clairvoyant_cost_summary(r, targets["gap"], targets["cost"])
        summary = " ".join(filter(None, [summary, by_cost]))
    return _table(header, rows) + [
        "",
        f"{r['n_problems']} {what} ({which}), paired "
        f"bootstrap intervals ({r['n_bootstrap']} draws). Pair "
        f"{' -> '.join(f'`{Path(m).name}`' for m in models)} through llama.cpp, one core. Runs: {runs}. "
        f"Figures: `{r['command']}`. Source: {_source(relative)}."] + (["", summary] if summary else [])


TABLES: dict[str, Callable[[Path], list[str]]] = {
    "gates": gates, "gate-targets": gate_targets, "reader": reader, "screened": screened,
    "embedded-bench": embedded_bench, "nl-datasets": nl_datasets, "calibration": calibration,
    "trio": trio, "throughput": throughput, "serve-load": serve_load, "overhead": overhead,
    "embedded-pair": embedded_pair, "model-accuracy": model_accuracy, "pair-accuracy": pair_accuracy,
    "budget-curve": budget_curve, "budget-curve-independent": budget_curve_independent,
    "budget-curve-seq": budget_curve_seq, "budget-curve-seq-independent": budget_curve_seq_independent,
    "real-pair-gsm8k": real_pair_gsm8k, "real-pair-gsm8k-advantage": real_pair_gsm8k_advantage,
    "real-pair-gsm8k-advantage-270": real_pair_gsm8k_advantage_270,
    "real-pair-gsm8k-main": real_pair_gsm8k_main, "real-pair-gsm8k-resolve": real_pair_gsm8k_resolve,
    "real-pair-gsm8k-resolve-wall": real_pair_gsm8k_resolve_wall,
    "real-pair-math500": real_pair_math500, "resolve-probe": resolve_probe,
    "resolve-probe-cap6": resolve_probe_cap6, "resolve-probe-bars": resolve_probe_bars,
    "resolve-probe-calibration-size": resolve_probe_calibration_size, "pacing": pacing,
    "pacing-load": pacing_load, "serve-paced": serve_paced, "curve-cli": curve_cli,
    "real-pair-paced-live": real_pair_paced_live, "real-pair-what-would-close": real_pair_what_would_close,
}


# ---- rewriting marked regions ---------------------------------------------------------------------

def render(name: str, results: Path = RESULTS, root_link: str = "") -> str:
    """The region body for table NAME; `root_link` prefixes repository links (docs/ uses "../")."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return "\n".join(TABLES[name](results)).replace("{root}", root_link) + "\n"


def _root_link(path: Path, root: Path) -> str:
    depth = len(path.resolve().relative_to(root.resolve()).parts) - 1
    return "../" * depth


def rewrite(text: str, results: Path = RESULTS, root_link: str = "") -> str:
    """`text` with every marked region's body rebuilt."""
    return _REGION.sub(lambda m: m.group(1) + render(m.group("name"), results, root_link) + m.group(4), text)


def doc_files(root: Path = ROOT) -> list[Path]:
    return sorted({p for pattern in DOC_FILES for p in root.glob(pattern)})


def stale_regions(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    """`file: table NAME` for every region whose text differs from what the JSON gives."""
    stale = []
    for path in doc_files(root):
        text = path.read_text()
        link = _root_link(path, root)
        if text.count("<!-- table:") != len(_REGION.findall(text)):
            stale.append(f"{path.relative_to(root)}: a `<!-- table:NAME -->` marker without its "
                         "`<!-- /table:NAME -->` (or the reverse)")
        for match in _REGION.finditer(text):
            if match.group("body") != render(match.group("name"), results, link):
                stale.append(f"{path.relative_to(root)}: table {match.group('name')}")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any region is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_regions(ROOT, RESULTS)
        for line in stale:
            print(f"stale: {line} (run python -m bench.docs_tables)", file=sys.stderr)
        return 1 if stale else 0
    for path in doc_files(ROOT):
        text = path.read_text()
        new = rewrite(text, RESULTS, _root_link(path, ROOT))
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
