#!/usr/bin/env bash
# Train the three LoRA experts shipped in experts/ (make experts). Fixed seeds, CPU-friendly sizes:
# about 20-25 minutes on 2 idle cores (steps of 1-2 s). Each run ends by scoring 100 eval-split examples
# (greedy, exact match); the score is the "summary" line of experts/<task>/train_log.jsonl.
#
#   scripts/make_experts.sh                 # all three
#   scripts/make_experts.sh sorting json    # only some
#   THREADS=1 scripts/make_experts.sh       # on a busy machine: 2 torch threads sharing 2 cores with other
#                                           # jobs ran 10-40x slower per step than 1 thread did
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(arithmetic sorting json)

# LoRA on every linear layer: with attention only, arithmetic stalled near 70% (the MLPs do the sums)
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

# task -> "steps batch lr": arithmetic needs the most updates, json (mostly copying) the fewest
declare -A SETTINGS=(
  [arithmetic]="250 8 2e-3"
  [sorting]="300 8 2e-3"
  [json]="80 8 2e-3"
)

for task in "${TASKS[@]}"; do
  read -r steps batch lr <<<"${SETTINGS[$task]}"
  echo "== expert $task: $steps steps, batch $batch, lr $lr"
  start=$(date +%s)
  "$PY" -m xlora_core.cli.train --threads "$THREADS" expert \
    --task "$task" --base default --out "experts/$task" \
    --steps "$steps" --batch-size "$batch" --lr "$lr" --warmup-steps 20 \
    --rank 8 --alpha 16 --target-modules "$TARGETS" \
    --seed 1234 --log-every 10 --eval-n 100
  echo "== expert $task done in $(( $(date +%s) - start )) s"
done
