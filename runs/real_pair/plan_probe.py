"""Probe: the large model writes the first k steps (the plan), the small model the rest.

On the real pair the small model's failures are in its plan, not in a few low-confidence
steps (docs/real-models.md), and at 0.5x the large model's cost a clairvoyant router that
sends problems to the large model before the small one writes anything recovers 0.82 of the
gap, one that re-solves after the small model's solve 0.55. Writing the opening steps with
the large model costs a fraction of a large-only solve, needs no signal at all, and hands the
small model a plan to carry out. This measures accuracy and cost of k = 1, 2 on GSM8K test
problems in order, against the recorded small and large rows of the same problems (same
settings as `runs/real_pair/gsm8k_test.sh`). Rows are appended; a rerun resumes.

    taskset -c 0 python runs/real_pair/plan_probe.py --first 2 --limit 60
    python runs/real_pair/plan_probe.py --report 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from paced_live import real_pair_runner  # the same pair and settings

from bench.datasets import load_dataset
from bench.grading import Grader
from bench.harness import RESULTS_FILE, load_results
from bench.paired import format_interval, paired_figures
from bench.provenance import package_commit
from cascade.gates import Gate, GateState

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "runs/real_pair/gsm8k_test"
RESOLVE = ROOT / "runs/real_pair/gsm8k_test_resolve"
OUT = ROOT / "runs/real_pair/plan_probe"
# The runtime's recorded rows of the same problems: the step cascade and the re-solve.
COMPARED = ("confidence:mean_prob@0.2", "confidence:mean_prob:resolve@0.25",
            "confidence:mean_prob:resolve@0.2")


@dataclass(frozen=True)
class FirstSteps(Gate):
    """Escalate, before the small model writes anything, exactly the first `first` steps."""

    first: int = 1
    threshold: float = 0.5
    mode: str = "route"
    probe_tokens: int = 0
    requires_verification: bool = False

    def score(self, state: GateState) -> float:
        return 1.0 if state.step_index < self.first else 0.0


def rows_path(first: int) -> Path:
    return ROOT / f"runs/real_pair/plan_probe_first{first}.jsonl"


def run(first: int, limit: int) -> None:
    runner = real_pair_runner()
    path = rows_path(first)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    commit = package_commit()
    with Grader() as grader, path.open("a") as sink:
        for example in load_dataset("gsm8k", limit)[len(done):]:
            began = time.perf_counter()
            result = runner.solve(example.problem, gates=[FirstSteps(first)])
            wall = time.perf_counter() - began
            correct = bool(grader.grade(result.answer, example.answer, example.kind))
            row = {"id": example.id, "policy": f"first{first}", "cost": result.cost.total,
                   "wall_seconds": wall, "answer": result.answer, "correct": correct,
                   "steps": len(result.steps), "large_steps": sum(s.tier != 0 for s in result.steps),
                   "commit": commit}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{example.id}: cost {row['cost']:.1f} {wall:.1f}s correct={row['correct']}", flush=True)


def report(firsts: list[int]) -> dict:
    recorded = [r for r in [*load_results(MAIN / RESULTS_FILE), *load_results(RESOLVE / RESULTS_FILE)]
                if r.get("error") is None and r["policy"] in ("small", "large", *COMPARED)]
    mine = [json.loads(line) for k in firsts for line in rows_path(k).read_text().splitlines()]
    ids = set.intersection(*({r["id"] for r in mine if r["policy"] == f"first{k}"} for k in firsts))
    figures = paired_figures([r for r in [*recorded, *mine] if r["id"] in ids],
                             policies=[*(f"first{k}" for k in firsts), *COMPARED])
    out = {"command": "python runs/real_pair/plan_probe.py --report " + " ".join(map(str, firsts)),
           "commit": package_commit(), "problems": len(ids), "figures": figures}
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Large writes the first k steps, small the rest (real pair, first {len(ids)} GSM8K test "
             "problems)", "", "| policy | accuracy | gap recovered (95 % CI) | cost x large (95 % CI) |",
             "|---|---|---|---|"]
    for name, p in figures["policies"].items():
        lines.append(f"| {name} | {p['accuracy']:.3f} | "
                     f"{format_interval(p['gap_recovered'], p['gap_recovered_ci95'])} | "
                     f"{format_interval(p['cost_ratio'], p['cost_ratio_ci95'])} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, help="run: the large model writes this many first steps")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--report", type=int, nargs="+", metavar="K")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    else:
        run(args.first, args.limit)


if __name__ == "__main__":
    main()
