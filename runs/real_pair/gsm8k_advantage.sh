#!/bin/bash
# Issue 18: the advantage policy on the GSM8K test problems of the main run
# (runs/real_pair/gsm8k_test.sh), one threshold per run directory, pinned to the other core;
# resumable. Router: runs/real_pair/train/router.pt (bash runs/real_pair/train_side.sh router).
# THRESHOLD=0.75 -> runs/real_pair/gsm8k_test_advantage, others -> ..._advantage_<T>.
# START=81 LIMIT=270 THRESHOLD=0.9 takes the problems past the first 81 into ..._advantage_0.9_from81.
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
T=${THRESHOLD:-0.75}
OUT=runs/real_pair/gsm8k_test_advantage$([[ $T == 0.75 ]] || echo _$T)${START:+_from$START}
exec taskset -c ${CORE:-1} python -m app.cli bench --dataset gsm8k \
    --small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --template qwen25-math-cot --delimiter $'\n\n' \
    --policies advantage@$T --router runs/real_pair/train/router.pt \
    --max-steps 24 --max-step-tokens 160 --limit ${LIMIT:-81} ${START:+--start $START} -o $OUT
