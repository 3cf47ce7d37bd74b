"""Certify the accuracy-budget curve on unlabeled problems, then serve a stream of requests
paced to a mean budget, its state kept so that a restart goes on where it stopped.

    python examples/budget_curve.py --n 120 --budget 40 --stream 60
"""

import argparse
import tempfile
from pathlib import Path

import cascade
from bench.tasks import check_answer, generate_split

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=120, help="unlabeled calibration problems")
parser.add_argument("--budget", type=float, default=40.0, help="mean budget per request (cost units)")
parser.add_argument("--stream", type=int, default=60, help="test problems served one after another")
parser.add_argument("--thresholds", type=lambda text: [float(t) for t in text.split(",")], default=None,
                    help="the re-solve thresholds, comma-separated (default: the curve's own grid)")
args = parser.parse_args()

runner = cascade.embedded_cascade(cascade.ConfidenceGate(0.5, signal="mean_prob"))
problems = [p.problem for p in generate_split("calibration", args.n)]  # answers are not used
# The re-solve: a doubted step hands the whole problem to the large model. Certified per
# budget: E[cost] <= B (conformal risk control), every request under the hard cap 6 x B.
curve = cascade.calibrate_budget_curve(runner, problems, methods=("resolve",), cap_factor=6.0,
                                       budgets=[args.budget / 2, args.budget],
                                       resolve_thresholds=args.thresholds)
print(curve.summary())

# Served traffic drifts from the calibration problems: pace the threshold online so that the
# running mean cost stays at B, whatever arrives. A server runs many requests at once:
# `begin` lets the pacer count the requests still running when it picks the next threshold.
state = Path(tempfile.mkdtemp()) / "pacing.json"
paced = curve.paced("resolve", args.budget, state_file=state)
correct = 0
for test in generate_split("test", args.stream):
    ticket, gates, cap = paced.begin()
    result = runner.solve(test.problem, cap, gates=gates)
    paced.observe(result, ticket)
    correct += check_answer(test.problem, result.answer)
print(f"served {args.stream} test problems: accuracy {correct / args.stream:.3f}; {paced.statement()}")
resumed = curve.paced("resolve", args.budget, state_file=state)  # e.g. after a restart
print(f"resumed from {state}: {resumed.pacer.n} requests, mean cost {resumed.mean_cost:.1f}")
