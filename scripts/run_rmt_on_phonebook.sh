#!/usr/bin/env bash
# RMT2Segm baseline on phonebook lookup with a pretrained GPT-2: the reference preset (pb/run_rmt_on_phonebook.sh,
# sizes N = 2 ... 64). lr 1e-3 constant after 10k warmup steps, total batch 256 (128 per device x 2 accumulation on
# one GPU), 32 memory vectors, one forward write (K=1), write-side memory projection, at most 200k steps,
# eval/checkpoint every 500 steps, early-stopping patience 500 evaluations; bf16 autocast with fp32 master weights.
# The reference also passed --use_write_head, a head that nothing used without the reconstruction loss: left out.
# Data: ./data/phonebook_N<N>, generated on first use (phonebook_utils.py: 100k train, 1k valid, seed 142), or
# DATASET_PREFIX=booydar/phonebook_N for the hub datasets. MODEL: hub id or local folder (default gpt2).
#
# usage: SIZES="2 4 8 16 32 64" SEEDS=1 NP=1 bash scripts/run_rmt_on_phonebook.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_rmt_on_phonebook.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=${SIZES:-2 4 8 16 32 64}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
PER_DEVICE=${PER_DEVICE:-128}
TBS=${TBS:-256}
DATASET_PREFIX=${DATASET_PREFIX:-./data/phonebook_N}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi

for N in $SIZES; do
    DATASET=$DATASET_PREFIX$N
    if [[ "$DATASET" == ./* && ! -d "$DATASET" && -z "$DRY_RUN" ]]; then
        "$PY" phonebook_utils.py --n_entries "$N" --n_train 100000 --n_valid 1000 --seed 142 --output_path "$DATASET"
    fi
    for S in $SEEDS; do
        "${LAUNCH[@]}" --main_process_port $((29900 + S)) \
            run_rmt_on_phonebook.py --pretrained_model "$MODEL" --dataset_name "$DATASET" --bf16 \
            --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
            --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
            --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + S)) \
            --n_mem_tokens 32 --K 1 --n_ctrl_tokens 0 --use_mem_proj --mem_proj_mode proj --attn_implementation sdpa \
            --generation_max_new_tokens 16 "$@"
        if [ -n "$DRY_RUN" ]; then echo; fi
    done
done
