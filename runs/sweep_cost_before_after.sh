#!/bin/bash
# Issue 19: what a calibration sweep costs against one pass on the embedded pair, with the
# sweep's token-keyed sharing (this checkout) and without it (BEFORE, default 54a77b4, the
# commit before it, in a git worktree): this checkout's bench/sweep_cost.py runs on each
# package, one after the other, pinned to one core. Writes bench/results/sweep_cost/.
set -e
cd "$(dirname "$0")/.."
N=${N:-40}
BEFORE=${BEFORE:-54a77b4}
OUT=bench/results/sweep_cost
mkdir -p $OUT
taskset -c ${CORE:-1} python -m bench.sweep_cost --n $N --seconds --out $OUT/after.json
rm -rf /tmp/stepcascade_before_sw && git worktree add -f -q --detach /tmp/stepcascade_before_sw $BEFORE
PYTHONPATH=/tmp/stepcascade_before_sw taskset -c ${CORE:-1} python bench/sweep_cost.py --n $N --seconds \
    --out $OUT/before.json
git worktree remove --force /tmp/stepcascade_before_sw
