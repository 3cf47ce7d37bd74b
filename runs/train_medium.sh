#!/bin/bash
# Trains the embedded medium tier (h128x4) on one core (the CPU is shared); resumable (re-run to continue).
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1
python -m bench.train_embedded --size medium --steps 800 --batch-size 64 --learning-rate 2e-3 \
    --threads 1 --curriculum-fraction 0.1 --out runs/train/medium
