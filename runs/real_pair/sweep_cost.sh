#!/bin/bash
# Issue 19 on the real pair: tokens a calibration sweep runs against one pass, with the
# sweep's token-keyed sharing (this checkout) and without it (the commit before it, 54a77b4,
# in a git worktree), on the same N GSM8K train problems of the calibration split and the same
# thresholds. Tokens do not depend on how busy the machine is. Pinned to one core.
# Writes runs/real_pair/sweep_cost/{after,before}.json(.sweep.jsonl) and summary.json (OUT=DIR
# for another place; NO_BEFORE=1 measures this checkout only).
set -e
cd "$(dirname "$0")/../.."
M=${MODELS:-$HOME/.cache/stepcascade/models}
N=${N:-4}
OUT=${OUT:-runs/real_pair/sweep_cost}
ARGS="--problems runs/real_pair/splits/calibration.jsonl --limit $N --gate confidence --signal mean_prob
  --budgets 400 --thresholds 1.0,0.3,0.25,0.2,0.15,0.1 --alpha 0.1 --delta 0.1 --method ltt
  --small $M/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --large $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
  --template qwen25-math-cot --max-steps 24 --max-step-tokens 160"
mkdir -p $OUT
rm -f $OUT/after.json.sweep.jsonl  # measured afresh (a sweep file resumes its rows)
taskset -c ${CORE:-1} python -m app.cli calibrate $ARGS --delimiter $'\n\n' -o $OUT/after.json || true  # n = N certifies nothing; the sweep file is what is measured
BEFORE=${BEFORE:-54a77b4}
SIDES="before after"
if [ "${NO_BEFORE:-0}" = 1 ]; then
  SIDES="after"
elif [ "${KEEP_BEFORE:-0}" != 1 ]; then  # KEEP_BEFORE=1: the before side's rows are already there
  rm -rf /tmp/stepcascade_before && git worktree add -f -q --detach /tmp/stepcascade_before $BEFORE
  PYTHONPATH=/tmp/stepcascade_before taskset -c ${CORE:-1} python -m app.cli calibrate $ARGS \
      --delimiter $'\n\n' -o $OUT/before.json || true
  git worktree remove --force /tmp/stepcascade_before
fi
python - <<PY
import json
sides = "$SIDES".split()
out = {"command": "OUT=$OUT NO_BEFORE=${NO_BEFORE:-0} N=$N bash runs/real_pair/sweep_cost.sh",
       "before_commit": "$BEFORE" if "before" in sides else None,
       "after_commit": "$(git rev-parse --short HEAD)", "columns": 6}
for side in sides:
    rows = [json.loads(l) for l in open("$OUT/%s.json.sweep.jsonl" % side) if '"executed_tokens"' in l]
    ex, ind = sum(r["executed_tokens"] for r in rows), sum(r["independent_tokens"] for r in rows)
    out[side] = {"problems": len(rows), "executed_tokens": ex, "independent_tokens": ind,
                 "sweep_vs_one_pass": ex / (ind / 6),
                 "costs": [r["costs"] for r in rows], "answers": [r["answers"] for r in rows]}
if "before" in sides:
    out["same_costs_and_answers"] = (out["before"]["costs"] == out["after"]["costs"]
                                     and out["before"]["answers"] == out["after"]["answers"])
json.dump(out, open("$OUT/summary.json", "w"), indent=1)
print({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a not in ("costs", "answers")})
       for k, v in out.items()})
PY
