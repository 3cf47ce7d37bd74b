"""Calibrate the embedded pair's gate on unlabeled problems, save it, and serve from it.

    python examples/calibrate.py --n 100 --budget 60
"""

import argparse
import tempfile
from pathlib import Path

import cascade
from bench.tasks import generate_split

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=100, help="unlabeled calibration problems")
parser.add_argument("--budget", type=float, default=60.0, help="budget, large-token equivalents")
parser.add_argument("--alpha", type=float, default=0.2)
parser.add_argument("--delta", type=float, default=0.1)
parser.add_argument("--thresholds", type=lambda text: [float(t) for t in text.split(",")],
                    default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                    help="candidate thresholds, comma-separated (the sweep runs each)")
args = parser.parse_args()

runner = cascade.embedded_cascade()
problems = [p.problem for p in generate_split("calibration", args.n)]  # answers are not used
calib = cascade.calibrate(runner, problems, budget=args.budget, alpha=args.alpha, delta=args.delta,
                          thresholds=args.thresholds)
print(calib.summary())
path = calib.save(Path(tempfile.mkdtemp()) / "calib.json")
served = cascade.Cascade.from_calibration(path)
test = generate_split("test", 1)[0]
result = served.solve(test.problem, budget=args.budget)
print(f"{test.problem} -> {result.answer} (truth {test.answer}), "
      f"cost {result.cost.total:.1f} <= {args.budget}")
