#!/usr/bin/env bash
# Train the three LoRA experts shipped in experts/ (make experts). Fixed seeds, CPU-sized: about
# 32 minutes for arithmetic, 42 for sorting and 13 for json with 1 torch thread each on a 2-core
# machine (two tasks at once in two shells use both cores). Each run ends by scoring 100 eval-split
# examples (greedy, exact match): the "summary" line of experts/<task>/train_log.jsonl.
#
#   scripts/make_experts.sh                 # all three
#   scripts/make_experts.sh sorting json    # only some
#   THREADS=2 scripts/make_experts.sh       # 2 torch threads: faster on an idle machine; on a busy
#                                           # one they ran 10-40x slower per step than 1 thread did
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(arithmetic sorting json)

# LoRA on every linear layer: with attention only, arithmetic stalled near 70% (the MLPs do the sums)
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

# task -> "steps batch lr". On 2k examples arithmetic stalled at 73% and sorting at 48% (eval split);
# 14k took arithmetic to 99%, 11k took sorting to 72%. json (mostly copying) needs the fewest.
declare -A SETTINGS=(
  [arithmetic]="900 16 2e-3"
  [sorting]="700 16 2e-3"
  [json]="240 8 2e-3"
)

for task in "${TASKS[@]}"; do
  [ -n "${SETTINGS[$task]:-}" ] || { echo "unknown task $task (arithmetic, sorting, json)" >&2; exit 2; }
  read -r steps batch lr <<<"${SETTINGS[$task]}"
  echo "== expert $task: $steps steps, batch $batch, lr $lr"
  start=$(date +%s)
  "$PY" -m xlora_core.cli.train --threads "$THREADS" expert \
    --task "$task" --base default --out "experts/$task" \
    --steps "$steps" --batch-size "$batch" --lr "$lr" --warmup-steps 30 \
    --rank 8 --alpha 16 --target-modules "$TARGETS" \
    --seed 1234 --log-every 10 --eval-n 100
  echo "== expert $task done in $(($(date +%s) - start)) s"
done
