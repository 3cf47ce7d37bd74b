"""Issue 19 on the real pair, live: the paced re-solve served through the runtime.

`runs/real_pair/resolve_replay.py` replays the pacer on recorded runs, with each re-solve's cost
bounded by the small model's whole solve plus the large model's. This runs it: GSM8K test
problems in order, each solved by the real pair (Qwen2.5-Coder-0.5B -> 1.5B-Instruct, Q4_K_M
GGUF, llama.cpp in process, the same settings as `runs/real_pair/gsm8k_test.sh`) with the gate
`ConfidenceGate(T, signal="mean_prob", mode="resolve")` at the threshold the pacer
(`calibration.BudgetPacer`, step 2) gives, every request under the hard cap 3 x B, the pacer
told each request's real cost. The thresholds: the replay's grid refined (cheapest first), the
start the one the replay certified label-free at B (conformal risk control on 60 unlabeled
train problems: T = 0.25 at B = 200-300). Rows are appended as problems finish; a rerun
resumes (the pacer re-observes the rows already there, in order).

    taskset -c 0 python runs/real_pair/paced_live.py --budget 250 --limit 120
    python runs/real_pair/paced_live.py --report 250 300   # -> bench/results/real_pair_gsm8k/paced_live.*
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cascade
from app.cli import build_parser
from app.options import build_runner
from bench.datasets import load_dataset
from bench.grading import Grader
from bench.harness import RESULTS_FILE, load_results
from bench.paired import paired_figures
from bench.provenance import package_commit
from calibration import BudgetPacer

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path("~/.cache/stepcascade/models").expanduser()
MAIN = ROOT / "runs/real_pair/gsm8k_test"  # the recorded small and large rows of the same problems
RESOLVE = ROOT / "runs/real_pair/gsm8k_test_resolve"  # the runtime's static resolve@0.25 and @0.2 rows
STATIC = ("confidence:mean_prob:resolve@0.25", "confidence:mean_prob:resolve@0.2")
OUT = ROOT / "bench/results/real_pair_gsm8k/paced_live"
THRESHOLDS = (1.0, 0.3, 0.275, 0.25, 0.225, 0.2, 0.175, 0.15)  # cheapest first (1.0: never re-solve)
START_THRESHOLD = 0.25
CAP_FACTOR, STEP = 3.0, 2.0


def rows_path(budget: float, beside_large: bool = False) -> Path:
    return ROOT / f"runs/real_pair/paced_live_B{budget:g}{'_wall' if beside_large else ''}.jsonl"


def real_pair_runner() -> cascade.Cascade:
    """The real pair with the settings of `runs/real_pair/gsm8k_test.sh`."""
    args = build_parser().parse_args([
        "bench", "--dataset", "gsm8k", "--small", str(MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        "--large", str(MODELS / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"), "--template", "qwen25-math-cot",
        "--delimiter", "\n\n", "--max-steps", "24", "--max-step-tokens", "160", "-o", "/dev/null"])
    return build_runner(args, gates=False)


def run(budget: float, limit: int, beside_large: bool = False) -> None:
    """With `beside_large`, each problem is also solved by the large model alone in the same
    process (the order alternating per problem), so that wall clocks compare fairly."""
    runner = real_pair_runner()
    examples = load_dataset("gsm8k", limit)
    pacer = BudgetPacer(len(THRESHOLDS), budget, step=STEP, start=float(THRESHOLDS.index(START_THRESHOLD)))
    path = rows_path(budget, beside_large)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for row in done:  # resume: the pacer goes on from the rows already there
        assert row["setting"] == pacer.index, "the rows do not replay to the same pacer"
        pacer.observe(row["cost"])
    cap = CAP_FACTOR * budget
    commit = package_commit()  # the code this process loaded (HEAD may move while it runs)
    with Grader() as grader, path.open("a") as sink:
        for i, example in enumerate(examples[len(done):], start=len(done)):
            setting = pacer.index
            gate = cascade.ConfidenceGate(THRESHOLDS[setting], signal="mean_prob", mode="resolve")
            large = {}
            if beside_large and i % 2:
                large = solve_large(runner, grader, example)
            began = time.perf_counter()
            result = runner.solve(example.problem, cap, gates=[gate])
            wall = time.perf_counter() - began
            if beside_large and not i % 2:
                large = solve_large(runner, grader, example)
            assert result.cost.total <= cap + 1e-9, (example.id, result.cost.total)
            pacer.observe(result.cost.total)
            row = {"id": example.id, "setting": setting, "threshold": THRESHOLDS[setting],
                   "cost": result.cost.total, "wall_seconds": wall, "answer": result.answer,
                   "correct": bool(grader.grade(result.answer, example.answer, example.kind)),
                   "resolved": bool(result.set_aside), "mean_cost": pacer.mean_cost, "ceiling": pacer.bound(),
                   "commit": commit, **large}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{example.id}: T={row['threshold']} cost {row['cost']:.1f} {wall:.1f}s "
                  f"correct={row['correct']} mean {pacer.mean_cost:.1f} ceiling {pacer.bound():.1f}",
                  flush=True)


def solve_large(runner: cascade.Cascade, grader: Grader, example) -> dict:
    """The large model alone on the same problem, timed in the same process."""
    began = time.perf_counter()
    result = runner.solve(example.problem, gates=[cascade.AlwaysLarge()])
    return {"large_wall_seconds": time.perf_counter() - began, "large_cost": result.cost.total,
            "large_correct": bool(grader.grade(result.answer, example.answer, example.kind))}


def report_wall(budget: float) -> dict:
    """The run beside the large model: paced vs large-alone wall clock, paired by problem."""
    rows = [json.loads(line) for line in rows_path(budget, True).read_text().splitlines()]
    small = {r["id"]: r for r in load_results(MAIN / RESULTS_FILE)
             if r.get("error") is None and r["policy"] == "small"}
    paced = f"paced@{budget:g}"
    merged = []
    for r in rows:
        merged += [{**small[r["id"]], "wall_seconds": 0.0},  # small's own wall: another run, not used
                   {"id": r["id"], "policy": "large", "correct": r["large_correct"], "cost": r["large_cost"],
                    "wall_seconds": r["large_wall_seconds"]},
                   {"id": r["id"], "policy": paced, "correct": r["correct"], "cost": r["cost"],
                    "wall_seconds": r["wall_seconds"]}]
    figures = paired_figures(merged, policies=[paced])
    mine = figures["policies"][paced]
    out = {"command": f"python runs/real_pair/paced_live.py --report-wall {budget:g}",
           "commit": package_commit(),
           "run": f"taskset -c CORE python runs/real_pair/paced_live.py --budget {budget:g} --beside-large "
                  f"--limit N", "started_at": rows[0]["commit"], "problems": len(rows), "budget": budget,
           "accuracy": mine["accuracy"], "large_accuracy": figures["policies"]["large"]["accuracy"],
           "small_accuracy": figures["policies"]["small"]["accuracy"],
           "gap_recovered": mine["gap_recovered"], "gap_recovered_ci": mine["gap_recovered_ci95"],
           "wall_x_large": mine["wall_ratio"], "wall_x_large_ci": mine["wall_ratio_ci95"],
           "cost_x_large": mine["cost_ratio"], "cost_x_large_ci": mine["cost_ratio_ci95"],
           "mean_cost": mine["mean_cost"], "ceiling": rows[-1]["ceiling"]}
    target = ROOT / f"bench/results/real_pair_gsm8k/paced_live_B{budget:g}_wall.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


def report(budgets: list[float]) -> dict:
    recorded = [row for row in [*load_results(MAIN / RESULTS_FILE), *load_results(RESOLVE / RESULTS_FILE)]
                if row.get("error") is None and row["policy"] in ("small", "large", *STATIC)]
    out = {"command": "python runs/real_pair/paced_live.py --report " + " ".join(f"{b:g}" for b in budgets),
           "commit": package_commit(), "thresholds": list(THRESHOLDS), "start_threshold": START_THRESHOLD,
           "cap_factor": CAP_FACTOR, "step": STEP,
           "pair": ["Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M"], "runs": []}
    for budget in budgets:
        rows = [json.loads(line) for line in rows_path(budget).read_text().splitlines()]
        ids = {r["id"] for r in rows}
        paced = f"paced@{budget:g}"
        # The paired figures (bench.paired) over these problems: the live rows beside the recorded
        # small, large and static rows (their wall ratios are not used: other runs, other times).
        figures = paired_figures([*(r for r in recorded if r["id"] in ids),
                                  *({**r, "policy": paced} for r in rows)], policies=[paced, *STATIC])
        assert figures["n_problems"] == len(rows), "a problem lacks a recorded row"
        mine, large_cost = figures["policies"][paced], figures["policies"]["large"]["mean_cost"]
        out["runs"].append({
            # Rows written before the commit was read once per process carry the HEAD of their
            # moment; the code a run loaded is that of its first row.
            "budget": budget, "problems": len(rows), "started_at": rows[0]["commit"],
            "accuracy": mine["accuracy"], "small_accuracy": figures["policies"]["small"]["accuracy"],
            "large_accuracy": figures["policies"]["large"]["accuracy"],
            "gap_recovered": mine["gap_recovered"], "gap_recovered_ci": mine["gap_recovered_ci95"],
            "mean_cost": mine["mean_cost"], "ceiling": rows[-1]["ceiling"],
            "budget_x_large": budget / large_cost, "cost_x_large": mine["cost_ratio"],
            "small_cost_x_large": figures["policies"]["small"]["cost_ratio"],
            "resolved": float(np.mean([r["resolved"] for r in rows])),
            "max_cost": float(max(r["cost"] for r in rows)), "cap": CAP_FACTOR * budget,
            "thresholds_used": {f"{t:g}": int(sum(r["threshold"] == t for r in rows)) for t in THRESHOLDS},
            "static": {policy: {"accuracy": figures["policies"][policy]["accuracy"],
                                "gap_recovered": figures["policies"][policy]["gap_recovered"],
                                "gap_recovered_ci": figures["policies"][policy]["gap_recovered_ci95"],
                                "cost_x_large": figures["policies"][policy]["cost_ratio"]}
                       for policy in STATIC},
            "mean_wall_seconds": mine["mean_wall_seconds"]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# The paced re-solve on the real pair, live (GSM8K test problems in order)", "",
          f"Command: `{out['command']}` at `{out['commit'][:7]}` (runs: `taskset -c CORE python "
          "runs/real_pair/paced_live.py --budget B --limit N`). Pair Qwen2.5-Coder-0.5B-Instruct -> "
          "1.5B-Instruct (Q4_K_M, llama.cpp, one core). Gate `ConfidenceGate(T, signal='mean_prob', "
          f"mode='resolve')`, T paced over {list(THRESHOLDS)} (step {STEP:g}) from T = {START_THRESHOLD} "
          f"(certified label-free at B = 200-300), hard cap {CAP_FACTOR:g} x B. Small and large alone, and "
          "the static thresholds: the recorded rows of the same problems (`runs/real_pair/gsm8k_test`, "
          "`runs/real_pair/gsm8k_test_resolve`).", "",
          "| B (x large's mean cost) | problems | accuracy (small / large alone) | gap recovered | mean cost "
          "(ceiling) | cost x large | re-solved | max cost (cap) | thresholds run | static resolve@0.25, "
          "@0.2 on the same problems: gap (cost x large) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        used = ", ".join(f"{t}: {n}" for t, n in r["thresholds_used"].items() if n)
        md.append(f"| {r['budget']:g} ({r['budget_x_large']:.2f}x) | {r['problems']} | {r['accuracy']:.3f} "
                  f"({r['small_accuracy']:.3f} / {r['large_accuracy']:.3f}) | {r['gap_recovered']:.2f} | "
                  f"{r['mean_cost']:.1f} ({r['ceiling']:.1f}) | {r['cost_x_large']:.2f} | "
                  f"{r['resolved']:.2f} | {r['max_cost']:.1f} ({r['cap']:g}) | {used} | "
                  + ", ".join(f"{v['gap_recovered']:.2f} ({v['cost_x_large']:.2f}x)"
                              for v in r["static"].values()) + " |")
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, help="run: the mean budget B (cost units)")
    parser.add_argument("--limit", type=int, default=120, help="run: the first N GSM8K test problems")
    parser.add_argument("--beside-large", action="store_true",
                        help="run: also solve each problem with the large model alone, timed in this process")
    parser.add_argument("--report", type=float, nargs="+", metavar="B",
                        help="report the runs of these budgets")
    parser.add_argument("--report-wall", type=float, metavar="B", help="report the --beside-large run of B")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    elif args.report_wall:
        report_wall(args.report_wall)
    elif args.budget:
        run(args.budget, args.limit, args.beside_large)
    else:
        parser.error("--budget B, --report B [B ...] or --report-wall B")


if __name__ == "__main__":
    main()
