#!/usr/bin/env bash
# How far run/bench/serve trust the released scorer of the embedded default model: its
# trust.json (the risk-controlled memory cutoff and the earned vote), and the evidence.
#
#   scripts/calibrate_released.sh [RUN_DIR]        (default RUN_DIR: runs/released-trust)
#
# 1. calibration problems: builtin:n=480,seed=1 (whose first 320 are the main job's held-out
#    problems) minus every question the released scorer was trained on (329 problems);
# 2. one self-consistency pass with the released scorer on them (per-trace seeds, step scores kept);
# 3. `stepprobe calibrate` -> stepprobe/released/smollm2-135m/trust.json;
# 4. `stepprobe replay` on those problems (the risk-controlled rows cross-fitted: each fold's
#    cutoff chosen on the other fold);
# 5. the out-of-template set (builtin-ood:n=160,seed=0, never used for a choice): one SC pass and
#    the replay with the shipped cutoff (calibrated elsewhere).
# Resumable: every step keeps what it finished. About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/released-trust}"
PY="${PYTHON:-.venv/bin/python}"
SP=("$PY" -m stepprobe.cli)
SCORER=stepprobe/released/smollm2-135m
GEN=(--n 8 --max-tokens 192 --temperature 0.7 --top-p 1.0 --dtype bfloat16 --enforce-eager --policy none
     --vote majority --record-confidence --batch-problems 40)
BUDGETS=12,16,24,32,48,64
POLICIES=none,memory,memory:group_gap,memory:group_largest,threshold,relative,top_fraction,confidence
mkdir -p "$RUN"
"$PY" - "$RUN/calibration_problems.jsonl" <<'EOF'
import json, sys
from stepprobe.data_collection.problems import load_problem_source
import yaml

out = sys.argv[1]
trained = yaml.safe_load(open("configs/released-smollm2-135m.yaml"))["pipeline"]["problems"]  # its recipe
seen = {p.question.strip() for p in load_problem_source(trained)}
kept = [p for p in load_problem_source("builtin:n=480,seed=1") if p.question.strip() not in seen]
with open(out, "w") as fh:
    for p in kept:
        fh.write(json.dumps({"id": p.problem_id, "question": p.question, "answer": p.gold}) + "\n")
print(f"{len(kept)} calibration problems (not trained on) -> {out}")
EOF
"${SP[@]}" run --problems "$RUN/calibration_problems.jsonl" --scorer "$SCORER" "${GEN[@]}" --output "$RUN/sc"
"${SP[@]}" calibrate --results "$RUN/sc" --kv-blocks "$BUDGETS" --output "$SCORER/trust.json"
"${SP[@]}" replay --results "$RUN/sc" --output "$RUN/replay" --kv-blocks "0,$BUDGETS" --policies "$POLICIES"
"${SP[@]}" run --problems "builtin-ood:n=160,seed=0" --scorer "$SCORER" "${GEN[@]}" --output "$RUN/ood-sc"
"${SP[@]}" replay --results "$RUN/ood-sc" --output "$RUN/ood-replay" --kv-blocks "0,$BUDGETS" --policies "$POLICIES"
"$PY" -c "from pathlib import Path; from stepprobe.training.release import add_trust_to_card; add_trust_to_card(Path('$SCORER'))"
cp "$RUN/ood-replay/replay.md" "$SCORER/replay-ood.md"
