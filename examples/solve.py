"""Solve one problem with the embedded pair and print who wrote each step.

    python examples/solve.py "a=17;b=a+38;c=b-25;?c" --budget 300
"""

import argparse

import cascade

parser = argparse.ArgumentParser()
parser.add_argument("problem", nargs="?", default="a=17;b=a+38;c=b-25;d=c+a;?d")
parser.add_argument("--budget", type=float, default=None, help="hard cap, large-token equivalents")
parser.add_argument("--threshold", type=float, default=0.5)
args = parser.parse_args()

gate = cascade.ConfidenceGate(threshold=args.threshold, signal="min_prob")
result = cascade.solve(args.problem, budget=args.budget, gate=gate)
for step in result.steps:
    print(f"{step.author:>5}  confidence {step.confidence.min_prob:.2f}  {step.text}")
print(f"answer {result.answer}  cost {result.cost.total:.1f}  escalation rate {result.escalation_rate:.0%}")
