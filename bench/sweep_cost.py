"""What a calibration sweep costs against one pass of the cascade.

    python -m bench.sweep_cost --n 40 --out bench/results/budget_curve/sweep_cost.json

Sweeps the embedded pair's default confidence gate over the 21 default thresholds on the
first n calibration problems (a fixed set) and reports tokens run by the sweep (prefill +
generated, every tier) against one pass: the mean, over the thresholds, of what one
independent run of that threshold runs. Tokens do not depend on how busy the machine is;
with --seconds it also times each threshold's own run (`solve_many`, as calibration's
users run it) and reports the sweep's seconds against their mean, in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.provenance import package_commit
from bench.tasks import generate_split
from cascade import ConfidenceGate, embedded_cascade, sweep
from cascade.calibrate import default_thresholds

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--seconds", action="store_true", help="also time one pass per threshold")
    args = parser.parse_args(argv)
    runner = embedded_cascade(ConfidenceGate(threshold=0.5, signal="min_prob"))
    candidates = [(t,) for t in sorted(default_thresholds(21), reverse=True)]
    problems = [p.problem for p in generate_split("calibration", args.n)]
    started = time.perf_counter()
    swept = sweep(runner, problems, candidates)
    one_pass = swept.independent_tokens / len(candidates)
    report = {"command": "python -m bench.sweep_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": package_commit(),
              "n": args.n, "thresholds": len(candidates), "executed_tokens": swept.executed_tokens,
              "independent_tokens": swept.independent_tokens, "one_pass_tokens": one_pass,
              "sweep_vs_one_pass": swept.executed_tokens / one_pass,
              "seconds": time.perf_counter() - started}
    if args.seconds:
        passes = []
        for (threshold,) in candidates:
            t0 = time.perf_counter()
            runner.solve_many(problems, gates=[ConfidenceGate(threshold=threshold, signal="min_prob")])
            passes.append(time.perf_counter() - t0)
        report.update(one_pass_seconds=sum(passes) / len(passes),
                      sweep_vs_one_pass_seconds=report["seconds"] / (sum(passes) / len(passes)))
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
