#!/bin/bash
# Issue 18: GSM8K test problems on the real pair (Qwen2.5-Coder 0.5B -> 1.5B, Q4_K_M GGUF,
# llama.cpp in process), policies interleaved per problem; resumable (rerun the same command:
# rows already in results.jsonl are kept). Models: python runs/fetch_models.py
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
python -m app.cli bench --dataset gsm8k --small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --template qwen25-math-cot --delimiter $'\n\n' \
    --policies small,large,confidence:mean_prob@0.2,confidence:mean_prob@0.1,verify@0.3 \
    --max-steps 24 --max-step-tokens 160 --limit ${LIMIT:-400} -o runs/real_pair/gsm8k_test
