#!/bin/bash
# Issue 6's side-by-side gates run on the embedded test split (500 problems, 17 policies),
# then its report. One torch thread per model; --isolate runs the large model in a process
# of its own (every policy alike), so verify-ahead / verify-fix can overlap the two models.
# The router is the committed one.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
cascade bench --dataset embedded --policies small,large,oracle,confidence@0.3,confidence@0.1,confidence@0.05,confidence@0.02,advantage@0.5,advantage@0.3,advantage@0.2,advantage@0.12,verify@0.9,verify@0.6,verify@0.3,verify-ahead@0.3,verify-fix@0.6,verify-fix@0.3 \
    --router bench/results/gates/router.pt --limit 500 --backend hf --delimiter $'\n' --signal min_prob --mode speculate \
    --isolate -o bench/results/gates/run
