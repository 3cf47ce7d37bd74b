"""Parts of the committed embedded run, in other processes.

The machine was shared (load ~10 on 2 cores), so one `cascade bench` process over 500
problems would not have finished in the time we had. This script runs problems
FIRST..LAST-1 of the same command (same models, policies, options and code) concurrently
into a separate directory; `merge` then appends the rows the main run's results.jsonl
lacks, and re-running the main command recomputes the summary from the merged file (it
finds every (problem, policy) pair done). We ran, at the same time: the main command
(stopped after 2001 rows: problems 0-249 and one row of problem 250), `run
runs/embedded_bench_b 250 500` (stopped after 1000 rows: problems 250-374; its duplicate
of that one row was dropped by `merge`) and `run runs/embedded_bench_c 375 500`, then
`merge` on b and on c.

    OMP_NUM_THREADS=1 python bench/results/embedded_bench/shard.py run OUT FIRST LAST
    python bench/results/embedded_bench/shard.py merge OUT
"""

import json
import sys
from pathlib import Path

POLICIES = ("small,large,confidence@0.2,confidence@0.4,confidence@0.6,verify@0.2,verify@0.5,oracle")
MAIN = Path(__file__).parent
FIRST, N = 250, 500


def run(out: str, first: str = str(FIRST), last: str = str(N)) -> None:
    import torch

    torch.set_num_threads(1)
    import cascade
    from bench.datasets import load_dataset
    from bench.harness import run_benchmark

    examples = load_dataset("embedded", N)[int(first):int(last)]
    run_benchmark(cascade.embedded_cascade(), "embedded", out_dir=out, policies=POLICIES, examples=examples,
                  limit=N, command=f"python bench/results/embedded_bench/shard.py run {out} {first} {last}")


def merge(out: str) -> None:
    from bench.harness import load_results

    main_rows = load_results(MAIN / "results.jsonl", repair=True)
    have = {(r["id"], r["policy"]) for r in main_rows}
    shard = [r for r in load_results(Path(out) / "results.jsonl") if (r["id"], r["policy"]) not in have]
    with (MAIN / "results.jsonl").open("a", encoding="utf-8") as sink:
        for row in shard:
            sink.write(json.dumps(row) + "\n")
    header = json.loads((MAIN / "run.json").read_text())
    shard_header = json.loads((Path(out) / "run.json").read_text())
    header.setdefault("merged_shards", []).append(
        {"rows": len(shard), "command": shard_header["command"], "sessions": shard_header["sessions"]})
    (MAIN / "run.json").write_text(json.dumps(header, indent=1) + "\n")
    print(f"appended {len(shard)} rows from {out}")


if __name__ == "__main__":
    {"run": run, "merge": merge}[sys.argv[1]](*sys.argv[2:])
