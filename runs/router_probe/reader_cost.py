# What the reader of bench/results/reader/router.pt feeds per problem (its compute is not in
# the runtime's costs): 100 test problems, AdvantageGate at the threshold given, in process.
# usage: PYTHONPATH=. python runs/router_probe/reader_cost.py THRESHOLD
import sys
import cascade
from bench.tasks import generate_split
from cascade.router import load_router
runner = cascade.embedded_cascade()
router = load_router("bench/results/reader/router.pt", models=runner.models)
gate = cascade.AdvantageGate(router, threshold=float(sys.argv[1]))
problems = [p.problem for p in generate_split("test", 100)]
results = runner.solve_many(problems, gates=[gate], concurrency=1)
reader, large = router.reader.backend.info.num_parameters, runner.models[1].info.num_parameters
per_problem = router.reader.tokens / len(problems)
print(f"reader tokens per problem {per_problem:.1f}; in large-token equivalents (FLOPs, "
      f"{reader} / {large} params) {per_problem * reader / large:.2f}; mean runtime cost "
      f"{sum(r.cost.total for r in results) / len(results):.2f}")
