#!/bin/bash
# Issue 18: GSM8K test problems on the real pair (Qwen2.5-Coder 0.5B -> 1.5B, Q4_K_M GGUF,
# llama.cpp in process), policies interleaved per problem; resumable (rerun the same command:
# rows already in results.jsonl are kept). Models: python runs/fetch_models.py
# Run pinned to one core (taskset -c 0) so that the train-side jobs can use the other one;
# llama.cpp then uses one thread per engine.
# A second process on the other core takes a later part of the range into its own directory:
#   START=200 CORE=1 bash runs/real_pair/gsm8k_test.sh   -> runs/real_pair/gsm8k_test_from200
# (then run the first process with LIMIT=200; bench.paired merges the directories).
# POLICIES=... runs a subset (the problems past 270 were run with the four main policies only:
#   START=270 LIMIT=335 POLICIES=small,large,confidence:mean_prob@0.15,verify@0.3 ...).
# SUFFIX=_resolve names another directory (the resolve-mode policies, run beside the main run:
#   SUFFIX=_resolve LIMIT=270 CORE=1 POLICIES=confidence:mean_prob:resolve@0.2,confidence:mean_prob:resolve@0.25;
#   problems 198-269 with large interleaved in the same process, so that their wall ratio is paired:
#   SUFFIX=_resolve_paired START=198 LIMIT=234 POLICIES=large,confidence:mean_prob:resolve@0.2,... ).
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
exec taskset -c ${CORE:-0} python -m app.cli bench --dataset gsm8k \
    --small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --template qwen25-math-cot --delimiter $'\n\n' \
    --policies ${POLICIES:-small,large,confidence:mean_prob@0.15,confidence:mean_prob@0.2,confidence:mean_prob@0.25,verify@0.3,verify-fix@0.3} \
    --max-steps 24 --max-step-tokens 160 --limit ${LIMIT:-400} ${START:+--start $START} \
    -o runs/real_pair/gsm8k_test${SUFFIX}${START:+_from$START}
