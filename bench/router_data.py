"""Router training on the embedded task: its exact step checker as a `StepScorer`, and the
training problems (the task's train split, disjoint from calibration and test).

    python -m bench.router_data --write-train runs/embedded_train.jsonl --n 2000
    cascade train-router --problems runs/embedded_train.jsonl --scorer exact -o runs/router.pt

The scorer lives in bench because it needs the task; `cascade` stays task-agnostic.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench.tasks import check_step, write_split

__all__ = ["ExactStepScorer", "write_train_problems"]


class ExactStepScorer:
    """score = 1 when the candidate step is locally correct by the embedded task's exact
    checker (`bench.tasks.check_step`, earlier mistakes not held against it), else 0."""

    name = "exact"

    def score(self, problem: str, context: str, candidates: Sequence[str]) -> list[float]:
        lines = [line for line in context.split("\n") if line]
        return [1.0 if check_step(problem, lines, text.strip()) else 0.0 for text in candidates]


def write_train_problems(path: str | Path, n: int) -> Path:
    """The first n problems of the embedded task's train split, as JSONL (+ params file)."""
    return write_split(path, "train", n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-train", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--n", type=int, default=2000, help="number of train-split problems")
    args = parser.parse_args(argv)
    print(f"wrote {write_train_problems(args.write_train, args.n)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
