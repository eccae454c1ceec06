#!/usr/bin/env bash
# Train the three LoRA experts shipped in experts/ (make experts). Fixed seeds, CPU-friendly sizes:
# about 20-25 minutes on 2 cores. Each run ends by scoring 100 eval-split examples (greedy, exact match);
# the score is the "summary" line of experts/<task>/train_log.jsonl.
#
#   scripts/make_experts.sh                 # all three
#   scripts/make_experts.sh sorting json    # only some
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(arithmetic sorting json)

# task -> "steps batch lr": arithmetic and sorting need more updates than json, which is mostly copying
declare -A SETTINGS=(
  [arithmetic]="200 8 2e-3"
  [sorting]="160 8 2e-3"
  [json]="60 8 2e-3"
)

for task in "${TASKS[@]}"; do
  read -r steps batch lr <<<"${SETTINGS[$task]}"
  echo "== expert $task: $steps steps, batch $batch, lr $lr"
  start=$(date +%s)
  "$PY" -m xlora_core.cli.train --threads "$THREADS" expert \
    --task "$task" --base default --out "experts/$task" \
    --steps "$steps" --batch-size "$batch" --lr "$lr" --warmup-steps 20 \
    --rank 8 --alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj \
    --seed 1234 --log-every 10 --eval-n 100
  echo "== expert $task done in $(( $(date +%s) - start )) s"
done
