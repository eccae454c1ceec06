#!/usr/bin/env bash
# Train the three LoRA experts shipped in experts/ (make experts). Fixed seeds, CPU-sized, 1 torch
# thread per run on a 2-core machine (two tasks at once in two shells use both cores): about 32
# minutes for arithmetic, 13 for json and 5 hours for sorting (five stages). Each run ends by
# scoring 100 eval-split examples (greedy, exact match): the "summary" line of its train_log.jsonl.
#
#   scripts/make_experts.sh                 # all three
#   scripts/make_experts.sh sorting json    # only some
#   THREADS=2 scripts/make_experts.sh       # 2 torch threads: faster on an idle machine; on a busy
#                                           # one they ran 10-40x slower per step than 1 thread did
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
STAGES=build/experts  # intermediate sorting adapters (not committed; their logs are)
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(arithmetic sorting json)

# LoRA on every linear layer: with attention only, arithmetic stalled near 70% (the MLPs do the sums)
LORA=(--rank 8 --alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)

train() {  # train TASK OUT ARGS...
  local task=$1 out=$2 start
  shift 2
  echo "== expert $task -> $out: $*"
  start=$(date +%s)
  "$PY" -m xlora_core.cli.train --threads "$THREADS" expert --task "$task" --base default --out "$out" \
    --warmup-steps 30 --log-every 10 --eval-n 100 "$@"
  echo "== expert $task -> $out done in $(($(date +%s) - start)) s"
}

# On 2k examples arithmetic stalled at 73%; 14k took it to 99%. json (mostly copying) needs the fewest.
arithmetic() { train arithmetic experts/arithmetic --steps 900 --batch-size 16 --lr 2e-3 --seed 1234 "${LORA[@]}"; }
json() { train json experts/json --steps 240 --batch-size 8 --lr 2e-3 --seed 1234 "${LORA[@]}"; }

# Sorting in five stages, each continuing the last: (1) 11k lists of vocabulary words (72% on the
# eval split); (2) 19k more at half the lr, in bfloat16 (1.4x faster on this CPU): 92% on train-split
# words but 71% on unseen ones; (3) 10k lists with half their words made up (--pseudo-words), so the
# expert reads an unseen word's initial off its letters instead of recalling the word; (4) 14k more
# of those at half that lr (at 1e-3 it did not improve on stage 3); (5) 14k more at half that again.
sorting() {
  train sorting "$STAGES/sorting-1" --steps 700 --batch-size 16 --lr 2e-3 --seed 1234 "${LORA[@]}"
  train sorting "$STAGES/sorting-2" --init-from "$STAGES/sorting-1" \
    --steps 1200 --batch-size 16 --lr 1e-3 --seed 4321 --dtype bfloat16
  train sorting "$STAGES/sorting-3" --init-from "$STAGES/sorting-2" \
    --steps 600 --batch-size 16 --lr 1e-3 --seed 777 --dtype bfloat16 --pseudo-words 0.5
  train sorting "$STAGES/sorting-4" --init-from "$STAGES/sorting-3" \
    --steps 900 --batch-size 16 --lr 5e-4 --seed 2718 --dtype bfloat16 --pseudo-words 0.5
  train sorting experts/sorting --init-from "$STAGES/sorting-4" \
    --steps 900 --batch-size 16 --lr 2.5e-4 --seed 3141 --dtype bfloat16 --pseudo-words 0.5
  for stage in 1 2 3 4; do
    cp "$STAGES/sorting-$stage/train_log.jsonl" "experts/sorting/train_log.stage$stage.jsonl"
  done
}

for task in "${TASKS[@]}"; do
  case $task in
    arithmetic | sorting | json) "$task" ;;
    *) echo "unknown task $task (arithmetic, sorting, json)" >&2; exit 2 ;;
  esac
done
