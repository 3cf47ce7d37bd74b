#!/bin/bash
# Issue 18, the train side of the real pair (GSM8K *train* problems only, disjoint slices in
# runs/real_pair/splits/): 1. the template's accuracy for both models, 2. an advantage router,
# 3. label-free calibration of the confidence gate at a grid of budgets (METHOD ltt: P(cost > B)
# <= alpha; risk: E[cost] <= B), on the thresholds of the test run's confidence policies, so
# that the certified policy's test rows are that run's rows. Pinned to one core.
set -e
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
PAIR="--small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --template qwen25-math-cot --delimiter $'\n\n' --max-steps 24 --max-step-tokens 160"
T="taskset -c ${CORE:-1}"
OUT=runs/real_pair/train
mkdir -p $OUT
step=${1:-all}
if [[ $step == all || $step == template ]]; then
  eval $T python -m app.cli bench --dataset jsonl --path runs/real_pair/splits/template.jsonl \
      --policies small,large $PAIR -o $OUT/template_check
fi
if [[ $step == all || $step == router ]]; then
  eval $T python -m app.cli train-router --problems runs/real_pair/splits/router.jsonl \
      --scorer large-likelihood --limit ${ROUTER_N:-40} $PAIR -o $OUT/router.pt
fi
if [[ $step == all || $step == calibrate ]]; then
  eval $T python -m app.cli calibrate --problems runs/real_pair/splits/calibration.jsonl \
      --limit ${CAL_N:-40} --gate confidence --signal mean_prob --budgets ${BUDGETS:?set BUDGETS} \
      --thresholds ${THRESHOLDS:-1.0,0.25,0.2,0.15} --alpha 0.1 --delta 0.1 --method ${METHOD:-ltt} \
      ${COST_MAX:+--cost-max $COST_MAX} $PAIR -o $OUT/calibration_${METHOD:-ltt}.json
fi
