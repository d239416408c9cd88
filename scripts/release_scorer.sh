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
# The run directory's layout is stepprobe.paths.RunPaths: one path per name, asked once.
{ read -r HIDDEN; read -r SCORER; read -r OOD_TRACES; read -r OOD_HIDDEN; read -r EVAL_OOD; read -r OOD_SC
  read -r OOD_REPLAY; } < <("$PY" -m stepprobe.paths "$RUN" hidden_states scorer ood_traces ood_hidden_states \
    eval_ood ood_sc ood_replay)
"${SP[@]}" pipeline --config configs/released-smollm2-135m.yaml --output "$RUN"
"${SP[@]}" collect --problems "builtin-ood:n=160,seed=0" --n 8 --max-tokens 192 --temperature 0.7 --top-p 1.0 \
    --dtype bfloat16 --output "$OOD_TRACES"
"${SP[@]}" record --traces "$OOD_TRACES" --output "$OOD_HIDDEN" --dtype bfloat16 \
    --storage-dtype float16 --step-mean all
"${SP[@]}" evaluate --scorer "$SCORER" --data "$OOD_HIDDEN" \
    --reference-data "$HIDDEN" --output "$EVAL_OOD" --overwrite
"${SP[@]}" run --problems "builtin-ood:n=160,seed=0" --scorer "$SCORER" --n 8 --max-tokens 192 \
    --temperature 0.7 --top-p 1.0 --dtype bfloat16 --enforce-eager --policy none --vote majority \
    --record-confidence --batch-problems 40 --output "$OOD_SC"
"${SP[@]}" replay --results "$OOD_SC" --output "$OOD_REPLAY" --kv-blocks 0,12,16,24,32,48,64 \
    --policies none,memory,memory:group_gap,memory:group_largest,threshold,relative,top_fraction,confidence
"$PY" -m stepprobe.training.release --run "$RUN" --dest stepprobe/released/smollm2-135m
scripts/calibrate_released.sh "$RUN/trust"   # the trust.json of the released scorer, on problems it never saw
