#!/bin/bash
# Issue 18: MATH-500 on the real pair (Qwen2.5-Coder 0.5B -> 1.5B, Q4_K_M GGUF, llama.cpp in
# process), the GSM8K run's settings and template, a reduced set of policies (small, large,
# the best confidence threshold and verify of the GSM8K run), interleaved per problem;
# resumable (rerun the same command). Pinned to one core (CORE, default 1).
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
exec taskset -c ${CORE:-1} python -m app.cli bench --dataset math500 \
    --small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --template qwen25-math-cot --delimiter $'\n\n' \
    --policies small,large,confidence:mean_prob@0.15,verify@0.3 \
    --max-steps 24 --max-step-tokens 160 --limit ${LIMIT:-100} -o runs/real_pair/math500
