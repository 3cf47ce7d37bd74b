#!/bin/bash
# The real pair's GSM8K figures from the (partial, resumable) test run: paired bootstrap
# figures over the problems every policy finished, the calibrated policies listed as the run's
# rows of the threshold each certified on 60 unlabeled train problems
# (runs/real_pair/train/calibration_{ltt,risk}.json: LTT certified 1.0 = the small model's own
# steps at budgets 250 and 400, 0.25 at 550, 0.15 at 700; risk control 0.15 at E[cost] <= 500
# and 700), and the run's summary and plots.
cd "$(dirname "$0")/../.."
python -m bench.paired runs/real_pair/gsm8k_test \
    --alias "calibrated:ltt@250-400=small" --alias "calibrated:ltt@550=confidence:mean_prob@0.25" \
    --alias "calibrated:ltt@700=confidence:mean_prob@0.15" \
    --alias "calibrated:risk@500-700=confidence:mean_prob@0.15" \
    --target-gap 0.7 --target-wall 0.6 \
    --title "GSM8K test problems, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core)" \
    -o bench/results/real_pair_gsm8k/paired
# The advantage router's policies (runs/real_pair/train/router.pt, 12 GSM8K train problems),
# run beside the main run on the other core (bash runs/real_pair/gsm8k_advantage.sh), merged
# with it over the problems both hold.
python -m bench.paired runs/real_pair/gsm8k_test runs/real_pair/gsm8k_test_advantage \
    runs/real_pair/gsm8k_test_advantage_0.9 \
    --policies small,large,confidence:mean_prob@0.15,verify@0.3,advantage@0.9,advantage@0.75 \
    --target-gap 0.7 --target-wall 0.6 \
    --title "GSM8K test problems, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core), advantage router" \
    -o bench/results/real_pair_gsm8k/paired_advantage
# advantage@0.9 over the first 270 problems: its first 81 (above) and its extension
# (START=81 LIMIT=270 THRESHOLD=0.9 bash runs/real_pair/gsm8k_advantage.sh), against the main
# run's policies on the same problems. The extension ran while other jobs held the other core:
# its wall seconds are not comparable with the main run's; its costs are.
python -m bench.paired runs/real_pair/gsm8k_test runs/real_pair/gsm8k_test_advantage_0.9 \
    runs/real_pair/gsm8k_test_advantage_0.9_from81 \
    --policies small,large,confidence:mean_prob@0.15,verify@0.3,advantage@0.9 \
    --target-gap 0.7 --target-wall 0.6 \
    --title "GSM8K test problems, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core), advantage@0.9 over 270 problems" \
    -o bench/results/real_pair_gsm8k/paired_advantage_270
# The four main policies over every problem they finished: the main run and its extension
# past problem 270 (one process per core, four policies: START=270 LIMIT=335, then START=335
# LIMIT=400 (stopped after problem 371) beside START=372 LIMIT=400; then START=400 LIMIT=490
# beside START=490 LIMIT=580, both stopped), with what a problem-level score would take.
python -m bench.paired runs/real_pair/gsm8k_test runs/real_pair/gsm8k_test_from270 \
    runs/real_pair/gsm8k_test_from335 runs/real_pair/gsm8k_test_from372 \
    runs/real_pair/gsm8k_test_from400 runs/real_pair/gsm8k_test_from490 \
    --policies small,large,confidence:mean_prob@0.15,verify@0.3 \
    --target-gap 0.7 --target-wall 0.6 --target-cost 0.5 --headroom \
    --title "GSM8K test problems, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core), four main policies" \
    -o bench/results/real_pair_gsm8k/paired_main
# The resolve-mode policies (SUFFIX=_resolve, run beside the main run on the other core, problems
# 0-197; problems 198-269 by the paired-timing runs below), merged with the main run over the
# problems all hold (the main run's large rows count: its directory comes first).
python -m bench.paired runs/real_pair/gsm8k_test runs/real_pair/gsm8k_test_resolve \
    runs/real_pair/gsm8k_test_resolve_paired_from198 runs/real_pair/gsm8k_test_resolve_paired_from234 \
    --policies small,large,confidence:mean_prob@0.15,confidence:mean_prob@0.2,confidence:mean_prob@0.25,verify@0.3,confidence:mean_prob:resolve@0.2,confidence:mean_prob:resolve@0.25 \
    --target-gap 0.7 --target-wall 0.6 \
    --title "GSM8K test problems, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core), resolve mode" \
    -o bench/results/real_pair_gsm8k/paired_resolve
# The resolve policies' wall clock against large-only timed in the same process, interleaved per
# problem (SUFFIX=_resolve_paired POLICIES=large,<the two resolve policies>, START=198 LIMIT=234
# and START=234 LIMIT=270, one process per core); small's rows are the main run's (their wall
# ratio is across runs). The paired directories come first so that their large rows count.
python -m bench.paired runs/real_pair/gsm8k_test_resolve_paired_from198 \
    runs/real_pair/gsm8k_test_resolve_paired_from234 runs/real_pair/gsm8k_test \
    --policies small,large,confidence:mean_prob:resolve@0.2,confidence:mean_prob:resolve@0.25 \
    --target-gap 0.7 --target-wall 0.6 \
    --title "GSM8K test problems 198-269, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core), resolve mode timed beside large" \
    -o bench/results/real_pair_gsm8k/paired_resolve_wall
python -c "from bench.harness import summarize; summarize('runs/real_pair/gsm8k_test')"
# Each label-free calibration's promise checked on the test run's rows of its certified threshold.
python runs/real_pair/calibration_test.py runs/real_pair/gsm8k_test runs/real_pair/gsm8k_test_from270 \
    runs/real_pair/gsm8k_test_from335 runs/real_pair/gsm8k_test_from372
# MATH-500 (partial, resumable: bash runs/real_pair/math500.sh), its paired figures and summary.
python -m bench.paired runs/real_pair/math500 \
    --title "MATH-500 pilot, real pair (Qwen2.5-Coder 0.5B -> 1.5B, llama.cpp, one core)" \
    -o bench/results/real_pair_math500/paired
python -c "from bench.harness import summarize; summarize('runs/real_pair/math500')"
