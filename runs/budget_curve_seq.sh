#!/bin/bash
# Issue 19: the accuracy-budget curve of the embedded pair with the sequence router's score
# (bench/results/gates/sequence_router.pt, trained on 5000 train-split problems) in place of
# the confidence gate's; same splits, budgets from the same kind of pilot, floors finest where
# this score's curve bends (0.75-0.95). One core (CORE, default 1); stages in turn, each
# resumable by re-running its line. Writes bench/results/budget_curve_seq/.
set -e
cd "$(dirname "$0")/.."
OUT=bench/results/budget_curve_seq
RUN="taskset -c ${CORE:-1} python -m bench.budget_curve --router bench/results/gates/sequence_router.pt --out $OUT"
[ -f $OUT/plan.json ] || $RUN --stage prepare --floors 1,0.95,0.9,0.85,0.8,0.75,0.7,0.6,0.5,0.3,0.1,0
for split in calibration test independent; do
  ls $OUT/part_${split}_* >/dev/null 2>&1 || $RUN --stage sweep --split $split --n-cal 120 --n-test 150
done
$RUN --stage report --n-cal 120 --n-test 150
$RUN --stage report --n-cal 120 --n-test 150 --test-split independent
