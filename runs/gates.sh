#!/bin/bash
# Issue 6's side-by-side gates run on the embedded test split (500 problems, 14 policies),
# then its report. One torch thread; the router is the committed one.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
cascade bench --dataset embedded --policies small,large,oracle,confidence@0.3,confidence@0.1,confidence@0.05,confidence@0.02,advantage@0.5,advantage@0.3,advantage@0.2,advantage@0.12,verify@0.9,verify@0.6,verify@0.3 \
    --router bench/results/gates/router.pt --limit 500 --backend hf --delimiter $'\n' --signal min_prob --mode speculate \
    -o bench/results/gates/run
