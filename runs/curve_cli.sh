#!/usr/bin/env bash
# The accuracy-budget curve through the two user commands, on the embedded pair:
# certified label-free on 60 (fit) + 120 (calibration) unlabeled problems, measured on the
# 150 first test-split problems. Writes bench/results/curve_cli/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/curve_cli
# The unlabeled problems: 60 of the train split (fit the gate), 120 of the calibration split.
python -c "
import json
from bench.tasks import generate_split
rows = [p.problem for p in generate_split('train', 60)] + [p.problem for p in generate_split('calibration', 120)]
open('$OUT/unlabeled.jsonl', 'w').write(''.join(json.dumps({'problem': r}) + '\n' for r in rows))"
cascade calibrate --curve --problems $OUT/unlabeled.jsonl --fit-problems 60 \
    --budgets 13.428,26.856,40.283,53.711,67.139,80.567 --cap-factor 6 \
    --gate confidence --signal mean_prob -o $OUT/curve_file.json
cascade bench --curve $OUT/curve_file.json --dataset embedded --limit 150 -o $OUT
