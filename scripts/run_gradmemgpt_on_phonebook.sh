#!/usr/bin/env bash
# GradMem on phonebook lookup (N entries per context) with a pretrained GPT-2: the reference preset (N8).
#   lr 1e-4, total batch 256 (64 per device x 4 accumulation on one GPU), 32 memory tokens, K=2 SGD inner steps,
#   inner lr 0.4, second order, no memory projection, write head, no inner loss in the outer loss, warmup 10k,
#   at most 200k steps, eval/checkpoint every 500 steps, patience 500 evaluations; bf16 autocast, fp32 master weights.
# The reference warm-started from a checkpoint on its authors' cluster; pass your own with INIT=<checkpoint folder>.
# Data: a local dataset generated on first use (phonebook_utils.py: 100k train, 1k valid, seed 142), or a hub
# dataset with DATASET=booydar/phonebook_N8. MODEL: hub id or local folder of the backbone (default gpt2).
#
# usage: N=8 SEEDS=1 NP=1 bash scripts/run_gradmemgpt_on_phonebook.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_gradmemgpt_on_phonebook.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NP=${NP:-1}
N=${N:-8}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
PER_DEVICE=${PER_DEVICE:-64}
TBS=${TBS:-256}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
DATASET=${DATASET:-./data/phonebook_N${N}}
if [[ "$DATASET" == ./* && ! -d "$DATASET" && -z "$DRY_RUN" ]]; then
    "$PY" phonebook_utils.py --n_entries "$N" --n_train 100000 --n_valid 1000 --seed 142 --output_path "$DATASET"
fi
INIT_ARGS=(); if [ -n "${INIT:-}" ]; then INIT_ARGS=(--init_checkpoint "$INIT"); fi

for S in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $((29700 + S)) \
        run_gradmemgpt_on_phonebook.py --pretrained_model "$MODEL" --dataset_name "$DATASET" --bf16 "${INIT_ARGS[@]}" \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
        --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + S)) \
        --n_mem_tokens 32 --K 2 --inner_lr 0.4 --grad_mode second --use_write_head --add_inner_loss_to_outer false \
        --attn_implementation auto --generation_max_new_tokens 16 "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
