#!/bin/bash
# Trains the embedded pair one after the other, both cores each; resumable (re-run to continue).
cd "$(dirname "$0")/.."
export PYTHONPATH=.
python -m bench.train_embedded --size small --steps 3000 --learning-rate 2e-3 --out runs/train/small
python -m bench.train_embedded --size large --steps 2400 --batch-size 32 --learning-rate 1.5e-3 \
    --curriculum-fraction 0.05 --out runs/train/large
