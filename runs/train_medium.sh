#!/bin/bash
# Trains the embedded medium tier (h128x4) on one core (the other core stays free for
# the rest of the session's work); resumable (re-run to continue). Same schedule as
# the shipped small model: 3,000 steps x 64, lr 2e-3, curriculum 0.1.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
python -m bench.train_embedded --size medium --steps 3000 --batch-size 64 --learning-rate 2e-3 \
    --threads 1 --curriculum-fraction 0.1 --out runs/train/medium
