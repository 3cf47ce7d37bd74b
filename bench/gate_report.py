"""Side-by-side report of the gates (confidence, advantage, verify, oracle) from one harness run.

    python -m bench.gate_report --run bench/results/gates/run --router runs/gates/router_exact.pt \\
        -o bench/results/gates

(several routers: ``--router NAME=FILE`` once each, as given to the harness run for its
``advantage:NAME`` policies; each is its own gate family and the target is reported for each.)

Reads the run's results.jsonl (policies interleaved per problem by `bench.harness`), keeps
the problems every policy finished, and writes

- ``report.json`` / ``report.md``: per policy accuracy (95 % Wilson CI), mean cost, mean
  wall seconds, step escalation rate; per gate family the cheapest threshold whose
  accuracy is within `tolerance` (1 pt) of large-only ("matched accuracy"), its cost,
  latency and speedup vs large-only and vs the verify gate at matched accuracy; the
  escalation rate each family needs to reach matched accuracy (linear interpolation
  along its accuracy-vs-escalation curve); and the two targets of issue 6;
- ``pareto_cost.png`` and ``pareto_latency.png``: accuracy vs mean cost and vs mean wall
  seconds, one curve per gate family (its thresholds), small / large / oracle as points.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import load_results, router_files, summarize_rows
from bench.provenance import package_commit
from cascade.router import load_router

__all__ = ["family_of", "matched_point", "escalation_at_accuracy", "gate_report"]

FAMILIES = ("confidence", "advantage", "verify", "verify-ahead", "verify-fix")
TOLERANCE = 0.01  # "matched accuracy": within 1 point of large-only


def family_of(policy: str) -> str:
    """"confidence@0.1" -> "confidence"; "advantage:seq@0.2" -> "advantage:seq"; "large" -> "large"."""
    return policy.split("@", 1)[0]


def _families(policies) -> list[str]:
    """The gate families present, in FAMILIES' order; each named router's family
    ("advantage:NAME", a screened "verify-fix:NAME=S") right after its base family."""
    present = {family_of(p) for p in policies}
    ordered = []
    for family in FAMILIES:
        ordered += [family] if family in present else []
        ordered += sorted(f for f in present if f.startswith(family + ":"))
    return ordered


def _is_advantage(family: str) -> bool:
    return family == "advantage" or family.startswith("advantage:")


def _complete_rows(rows: Sequence[dict]) -> tuple[list[dict], int]:
    """Rows of the problems that every policy finished (a resumed or cut run has a ragged end)."""
    policies = {r["policy"] for r in rows}
    by_id: dict[str, set] = {}
    for r in rows:
        by_id.setdefault(r["id"], set()).add(r["policy"])
    complete = {i for i, p in by_id.items() if p == policies}
    return [r for r in rows if r["id"] in complete], len(complete)


def matched_point(stats: dict, members: Sequence[str], target: float) -> str | None:
    """The cheapest (mean cost) policy among `members` with accuracy >= target, or None."""
    ok = [m for m in members if stats[m]["accuracy"] is not None and stats[m]["accuracy"] >= target - 1e-12]
    return min(ok, key=lambda m: stats[m]["mean_cost"]) if ok else None


def escalation_at_accuracy(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Smallest escalation rate at which the curve (escalation, accuracy) reaches `target`,
    interpolating linearly between measured thresholds; None when no point reaches it.
    points: (escalation rate, accuracy) of one family's thresholds."""
    points = sorted(points)
    for k, (e, a) in enumerate(points):
        if a >= target:
            if k == 0:
                return e
            e0, a0 = points[k - 1]
            if a0 >= a:  # not increasing there: take the measured point
                return e
            return e0 + (target - a0) * (e - e0) / (a - a0)
    return None


def gate_report(run_dir: str | Path, out_dir: str | Path, *, router=None,
                command: str | None = None, tolerance: float = TOLERANCE,
                notes: Sequence[str] = ()) -> dict:
    run_dir, out = Path(run_dir), Path(out_dir)
    rows, n_problems = _complete_rows(load_results(run_dir / "results.jsonl"))
    if not rows:
        raise SystemExit(f"{run_dir}: no problem finished by every policy")
    summary = summarize_rows(rows)
    stats = summary["policies"]
    if "large" not in stats:
        raise SystemExit(f"{run_dir}: the run has no 'large' policy to match accuracy against")
    header = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    large = stats["large"]
    target = large["accuracy"] - tolerance
    families = {f: [p for p in stats if family_of(p) == f] for f in _families(stats)}
    matched: dict[str, dict] = {}
    for family, members in families.items():
        best = matched_point(stats, members, target)
        curve = [(stats[m]["step_escalation_rate"], stats[m]["accuracy"]) for m in members]
        matched[family] = {"policy": best, "escalation_needed": escalation_at_accuracy(curve, target)}
    if "oracle" in stats and stats["oracle"]["accuracy"] >= target:
        matched["oracle"] = {"policy": "oracle", "escalation_needed": stats["oracle"]["step_escalation_rate"]}
    verify_wall = None
    if matched.get("verify", {}).get("policy"):
        verify_wall = stats[matched["verify"]["policy"]]["wall_seconds"]["mean"]
    for entry in matched.values():
        p = entry["policy"]
        if p is None:
            continue
        s = stats[p]
        entry.update(accuracy=s["accuracy"], mean_cost=s["mean_cost"], mean_wall=s["wall_seconds"]["mean"],
                     step_escalation_rate=s["step_escalation_rate"],
                     speedup_vs_large=large["wall_seconds"]["mean"] / s["wall_seconds"]["mean"],
                     cost_vs_large=s["mean_cost"] / large["mean_cost"],
                     speedup_vs_verify=(verify_wall / s["wall_seconds"]["mean"]) if verify_wall else None)
    # Target 1: advantage closes >= 70 % of the confidence-oracle gap in escalation rate
    # (for each router's family; the target counts the best).
    gaps: dict[str, float | None] = {}
    e_conf = matched.get("confidence", {}).get("escalation_needed")
    e_orc = matched.get("oracle", {}).get("escalation_needed")
    for family in (f for f in matched if _is_advantage(f)):
        e_adv = matched[family]["escalation_needed"]
        gaps[family] = ((e_conf - e_adv) / (e_conf - e_orc)
                        if None not in (e_conf, e_adv, e_orc) and e_conf > e_orc else None)
    measured = {f: g for f, g in gaps.items() if g is not None}
    gap_family = max(measured, key=measured.get) if measured else None
    gap = measured.get(gap_family)
    # Target 2: the best deployable gate (not the oracle) >= 2.5x faster than large at <= 1 pt loss.
    deployable = [e for f, e in matched.items() if f != "oracle" and e.get("policy")]
    best = max(deployable, key=lambda e: e["speedup_vs_large"]) if deployable else None
    router_metrics = {}
    for name, path in router_files(router).items():
        loaded = load_router(path)
        router_metrics[name] = {"file": str(path), "summary": loaded.summary(),
                                "metrics": loaded.metrics.to_json() if loaded.metrics else None}
    report = {
        "command": command or " ".join(["python -m bench.gate_report", *sys.argv[1:]]),
        "commit": package_commit(), "run_dir": str(run_dir), "run_commands": [s.get("command") for s in
                                                                            header.get("sessions", [])],
        "run_commits": sorted({s.get("commit") for s in header.get("sessions", [])}),
        "n_problems": n_problems, "tolerance": tolerance, "target_accuracy": target,
        "policies": stats, "matched": matched, "routers": router_metrics, "notes": list(notes),
        "targets": {
            "advantage_gap_closed": gap, "advantage_gap_family": gap_family, "advantage_gaps": gaps,
            "advantage_gap_target": 0.7,
            "advantage_gap_met": None if gap is None else gap >= 0.7,
            "best_gate": best["policy"] if best else None,
            "best_speedup_vs_large": best["speedup_vs_large"] if best else None,
            "speedup_target": 2.5,
            "speedup_met": None if best is None else best["speedup_vs_large"] >= 2.5,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report) + "\n")
    _plot(report, out)
    return report


def _f(value, spec=".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _markdown(report: dict) -> str:
    stats, matched, targets = report["policies"], report["matched"], report["targets"]
    lines = [
        f"# Gates side by side: embedded pair, {report['n_problems']} held-out test problems",
        "",
        f"Report: `{report['command']}` at commit `{report['commit']}`  ",
        "Run: " + "; ".join(f"`{c}`" for c in report["run_commands"] if c) + "  ",
        f"Run commit(s): {', '.join(f'`{c}`' for c in report['run_commits'])}  ",
        "Greedy, batch 1, every policy on the same loaded models, interleaved per problem; "
        "cost in large-model token equivalents; wall = seconds per problem on a shared 2-core CPU.",
        "",
        "| policy | accuracy (95% CI) | mean cost | mean wall s | step escalation | speedup vs large |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        ci = s["accuracy_ci95"]
        lines.append(f"| {name} | {s['accuracy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {s['mean_cost']:.1f} | "
                     f"{s['wall_seconds']['mean']:.3f} | {s['step_escalation_rate']:.3f} | "
                     f"{_f(s['speedup_vs_large'], '.2f')} |")
    lines += [
        "",
        f"## At matched accuracy (>= large-only - {report['tolerance'] * 100:g} pt = "
        f"{report['target_accuracy']:.3f})",
        "",
        "Cheapest measured threshold of each gate that reaches it; escalation needed: interpolated "
        "along the gate's accuracy-vs-escalation curve.",
        "",
        "| gate | policy | accuracy | mean cost | cost vs large | mean wall s | speedup vs large | "
        "speedup vs verify | step escalation | escalation needed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, e in matched.items():
        if e.get("policy") is None:
            best = max((s["accuracy"] for n, s in stats.items() if family_of(n) == family), default=None)
            lines.append(f"| {family} | not reached (best accuracy {_f(best)}) | | | | | | | | "
                         f"{_f(e['escalation_needed'])} |")
            continue
        lines.append(f"| {family} | {e['policy']} | {e['accuracy']:.3f} | {e['mean_cost']:.1f} | "
                     f"{e['cost_vs_large']:.3f} | {e['mean_wall']:.3f} | {e['speedup_vs_large']:.2f} | "
                     f"{_f(e['speedup_vs_verify'], '.2f')} | {e['step_escalation_rate']:.3f} | "
                     f"{_f(e['escalation_needed'])} |")
    gap = targets["advantage_gap_closed"]
    per_family = ", ".join(f"{f} {_f(g)}" for f, g in targets.get("advantage_gaps", {}).items())
    lines += [
        "",
        "## Targets (issue 6)",
        "",
        f"- Advantage gate closes >= 70 % of the confidence-to-oracle gap in escalation rate at matched "
        f"accuracy: **{_f(gap)}**{f' ({per_family})' if len(targets.get('advantage_gaps', {})) > 1 else ''}"
        " -> "
        f"{'met' if targets['advantage_gap_met'] else 'not met' if gap is not None else 'not measurable'}.",
        f"- Best deployable gate >= 2.5x faster than large-only (wall) at <= 1 pt accuracy loss: "
        f"**{targets['best_gate']}, {_f(targets['best_speedup_vs_large'], '.2f')}x** -> "
        f"{'met' if targets['speedup_met'] else 'not met'}.",
    ]
    for name, entry in report.get("routers", {}).items():
        lines += ["", f"## Router{' ' + name if name else ''} (`{entry['file']}`)", "",
                  "```", entry["summary"], "```"]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "Plots: [pareto_cost.png](pareto_cost.png), [pareto_latency.png](pareto_latency.png)"]
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report["policies"]
    for file_name, key, label in (("pareto_cost.png", "cost", "mean cost per problem (large-token eq.)"),
                                  ("pareto_latency.png", "wall", "mean wall seconds per problem")):
        fig, ax = plt.subplots(figsize=(6.5, 4.8))

        def x_of(s, key=key):  # bound now: the loop rebinds `key`
            return s["mean_cost"] if key == "cost" else s["wall_seconds"]["mean"]

        # strict=False: a twelfth family would go unplotted (no run has more than seven)
        for family, marker in zip(_families(stats), "osPXv^<>Dph", strict=False):
            members = [n for n in stats if family_of(n) == family]
            if not members:
                continue
            members.sort(key=lambda n: x_of(stats[n]))
            ax.plot([x_of(stats[n]) for n in members], [stats[n]["accuracy"] for n in members],
                    marker=marker, label=family)
            for n in members:
                ax.annotate(n.split("@", 1)[-1], (x_of(stats[n]), stats[n]["accuracy"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
        for single, marker in (("small", "v"), ("large", "D"), ("oracle", "*")):
            if single in stats:
                ax.plot([x_of(stats[single])], [stats[single]["accuracy"]], marker=marker, linestyle="",
                        markersize=9, label=single)
        ax.axhline(report["target_accuracy"], color="grey", linestyle=":", linewidth=1,
                   label="large-only - 1 pt")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.set_title(f"embedded pair, {report['n_problems']} test problems")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / file_name, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gates side by side, from one harness run.")
    parser.add_argument("--run", required=True, type=Path, help="the harness output directory")
    parser.add_argument("--router", action="append", default=None, metavar="[NAME=]FILE",
                        help="a router file of the run (its metrics are reported); NAME=FILE for the "
                             "run's advantage:NAME policies; repeatable")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    parser.add_argument("-o", "--output", required=True, type=Path)
    args = parser.parse_args(argv)
    report = gate_report(args.run, args.output, router=args.router, notes=args.note)
    print((args.output / "report.md").read_text())
    return 0 if report else 1


if __name__ == "__main__":
    raise SystemExit(main())
