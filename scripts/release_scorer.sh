#!/usr/bin/env bash
# Reproduce the released scorer of the embedded default model in one command:
#
#   scripts/release_scorer.sh [RUN_DIR]        (default RUN_DIR: runs/released-smollm2-135m)
#
# 1. the pipeline of configs/released-smollm2-135m.yaml (collect 1000 varied built-in problems
#    x 8 traces, record with step means, sweep, tune, export; resumable: rerun after a kill);
# 2. the out-of-template test set (builtin-ood, never trained on): collect + record;
# 3. `stepprobe evaluate` of the exported scorer on it, with the logistic-regression reference;
# 4. pruning with it on the same out-of-template problems: one self-consistency pass with the
#    scorer (per-trace seeds, step scores kept), every policy replayed on those traces;
# 5. the scorer, its evaluation and a model card into stepprobe/released/smollm2-135m/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/released-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
SP=("$PY" -m stepprobe.cli)
"${SP[@]}" pipeline --config configs/released-smollm2-135m.yaml --out "$RUN"
"${SP[@]}" collect --problems "builtin-ood:n=160,seed=0" --n 8 --max-tokens 192 --temperature 0.7 --top-p 1.0 \
    --dtype bfloat16 --output "$RUN/ood/traces.jsonl"
"${SP[@]}" record --traces "$RUN/ood/traces.jsonl" --output "$RUN/ood/hidden_states.h5" --dtype bfloat16 \
    --storage-dtype float16 --step-mean all
"${SP[@]}" evaluate --scorer "$RUN/scorer" --data "$RUN/ood/hidden_states.h5" \
    --reference-data "$RUN/record/hidden_states.h5" --out "$RUN/eval-ood" --overwrite
"${SP[@]}" run --problems "builtin-ood:n=160,seed=0" --scorer "$RUN/scorer" --n 8 --max-tokens 192 \
    --temperature 0.7 --top-p 1.0 --dtype bfloat16 --enforce-eager --policy none --vote majority \
    --record-confidence --batch-problems 40 --output "$RUN/ood-sc"
"${SP[@]}" replay --results "$RUN/ood-sc" --output "$RUN/ood-replay" --kv-blocks 0,12,16,24,32,48,64 \
    --policies none,memory,memory:group_gap,memory:group_largest,threshold,relative,top_fraction,confidence
"$PY" -m stepprobe.training.release --run "$RUN" --dest stepprobe/released/smollm2-135m
scripts/calibrate_released.sh "$RUN/trust"   # the trust.json of the released scorer, on problems it never saw
