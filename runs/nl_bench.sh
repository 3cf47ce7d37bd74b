#!/bin/bash
# The natural-language datasets with the embedded pair, 20 problems each (proves the path end to end).
set -e
export OMP_NUM_THREADS=1
for d in gsm8k math500 aime24 aime25; do
  cascade bench --dataset $d --limit 20 --policies small,large,confidence@0.4,verify@0.5 -o bench/results/$d
done
