#!/bin/bash
# Three tiers vs two on the embedded task with the retrained medium model (issue 11);
# resumable through --work. One torch thread.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
python -m bench.trio_report --n-cal 150 --n-test 300 --alpha 0.1 --delta 0.2 --thresholds 0.6,0.3,0.15,0.05 \
    --budget-fractions 0.5,0.75,1.0 --test-minutes 14 --medium runs/train/medium/model --work runs/trio \
    --out bench/results/trio
