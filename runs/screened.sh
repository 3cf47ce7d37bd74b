#!/bin/bash
# Issue 6: verify-fix screened by the sequence router (only drafts it gives P(large better)
# >= S are verified), next to plain verify / verify-fix and large-only, on the embedded test
# split (500 problems), --isolate, one torch thread per model; then its report.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
cascade bench --dataset embedded --policies small,large,oracle,verify@0.3,verify:seq=0.05@0.3,verify-fix@0.3,verify-fix:seq=0.1@0.3,verify-fix:seq=0.05@0.3,verify-fix:seq=0.02@0.3,verify-fix:seq=0.005@0.3 \
    --router seq=bench/results/gates/sequence_router.pt --limit 500 --backend hf --delimiter $'\n' --signal min_prob --mode speculate \
    --isolate -o bench/results/screened/run
