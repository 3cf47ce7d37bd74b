#!/bin/bash
# Issue 6: the advantage gate with a router that also reads the embedded medium model's
# log-probabilities of each draft, next to confidence, the sequence router, verify-fix and
# the oracle, on the embedded test split (500 problems), --isolate, one torch thread per
# model; then its report. The router (bench/results/reader/router.pt) was made by
#   cascade train-router --problems runs/embedded_train.jsonl --scorer exact --reader embedded:medium -o runs/router5k/reader.pt --data runs/router5k/reader_data.jsonl
# (runs/embedded_train.jsonl: python -m bench.router_data --write-train runs/embedded_train.jsonl --n 5000).
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
cascade bench --dataset embedded --policies small,large,oracle,confidence@0.1,confidence@0.05,advantage:seq@0.3,advantage:seq@0.2,advantage:rd@0.7,advantage:rd@0.5,advantage:rd@0.2,advantage:rd@0.05,verify-fix@0.3 \
    --router seq=bench/results/gates/sequence_router.pt --router rd=bench/results/reader/router.pt --limit 500 --backend hf --delimiter $'\n' --signal min_prob --mode speculate \
    --isolate -o bench/results/reader/run
