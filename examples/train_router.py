"""Train an advantage router for the embedded pair, save it, and solve with AdvantageGate.

    python examples/train_router.py --n 200 --threshold 0.3
    python examples/train_router.py --n 200 --threshold 0.3 --router-model sequence

Training problems come from the task's train split (disjoint from calibration and test);
steps are labelled by the task's exact checker (large step correct, small draft wrong).
"""

import argparse
import tempfile
from pathlib import Path

import cascade
from bench.router_data import ExactStepScorer
from bench.tasks import generate_split
from cascade.router import collect_router_data, load_router, train_router
from cascade.sequence_router import train_sequence_router

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=200, help="training problems")
parser.add_argument("--threshold", type=float, default=0.3, help="escalate when P(large better) >= this")
parser.add_argument("--router-model", choices=["logistic", "sequence"], default="logistic",
                    help="logistic regression on summary features, or a bi-GRU over the draft's tokens")
args = parser.parse_args()

runner = cascade.embedded_cascade()
small, large = runner.models
work = Path(tempfile.mkdtemp())
problems = [p.problem for p in generate_split("train", args.n)]
data = collect_router_data(small, large, problems, ExactStepScorer(), work / "rows.jsonl",
                           max_steps=runner.options.max_steps,
                           max_step_tokens=runner.options.max_step_tokens, skip_perfect=True)
train = train_router if args.router_model == "logistic" else train_sequence_router
router = train(data, tau=0.0)
print(router.summary())
path = router.save(work / "router.pt")

gate = cascade.AdvantageGate(load_router(path, models=runner.models), threshold=args.threshold)
for test in generate_split("test", 3):
    result = runner.solve(test.problem, gates=[gate])
    print(f"{test.problem} -> {result.answer} (truth {test.answer}), "
          f"escalation {result.escalation_rate:.0%}, cost {result.cost.total:.1f}")
