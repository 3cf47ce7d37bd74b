#!/bin/bash
# Issue 6's side-by-side gates run on the embedded test split (500 problems, 21 policies),
# then its report. One torch thread per model; --isolate runs the large model in a process
# of its own (every policy alike), so verify-ahead / verify-fix can overlap the two models.
# The routers are the committed ones, made by (about 8 min on one core, then 25 s):
#   python -m bench.router_data --write-train runs/embedded_train.jsonl --n 5000
#   cascade train-router --problems runs/embedded_train.jsonl --scorer exact -o runs/router5k/logistic.pt --data runs/router5k/data.jsonl
#   cascade train-router --problems runs/embedded_train.jsonl --scorer exact --router-model sequence -o runs/router5k/sequence.pt --data runs/router5k/data.jsonl
# (copied to bench/results/gates/router.pt and sequence_router.pt).
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
cascade bench --dataset embedded --policies small,large,oracle,confidence@0.3,confidence@0.1,confidence@0.05,confidence@0.02,advantage@0.5,advantage@0.3,advantage@0.2,advantage@0.12,advantage:seq@0.5,advantage:seq@0.3,advantage:seq@0.2,advantage:seq@0.1,verify@0.9,verify@0.6,verify@0.3,verify-ahead@0.3,verify-fix@0.6,verify-fix@0.3 \
    --router bench/results/gates/router.pt --router seq=bench/results/gates/sequence_router.pt --limit 500 --backend hf --delimiter $'\n' --signal min_prob --mode speculate \
    --isolate -o bench/results/gates/run
