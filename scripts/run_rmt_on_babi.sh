#!/usr/bin/env bash
# RMT2Segm baseline on bAbI (BABILong qa1-qa5 "0k") with a pretrained GPT-2. The reference has no such preset:
# the settings of the GradMem bAbI preset where they apply (lr 1e-4, total batch 64 = 16 per device x 4
# accumulation on one GPU, 8 memory vectors, memory projection, warmup 10k, at most 200k steps, eval/checkpoint
# every 500 steps, patience 500 evaluations) and the reference RMT's one forward write (K=1); bf16 autocast, fp32
# master weights. The best checkpoint is evaluated on valid and test.
# Data: DATA_DIR/babilong_qa<T>_0k (default ./data; missing ./data folders are downloaded by scripts/download_babi.sh).
# MODEL: hub id or local folder of the backbone (default gpt2).
#
# usage: TASKS="1 2 3 4 5" SEEDS=1 NP=1 bash scripts/run_rmt_on_babi.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_rmt_on_babi.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-1 2 3 4 5}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
PER_DEVICE=${PER_DEVICE:-16}
TBS=${TBS:-64}
DATA_DIR=${DATA_DIR:-./data}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi

for N in $SEEDS; do
    for T in $TASKS; do
        DATA=$DATA_DIR/babilong_qa${T}_0k
        [ -d "$DATA" ] || [ -n "$DRY_RUN" ] || bash scripts/download_babi.sh "$T"
        "${LAUNCH[@]}" --main_process_port $((29550 + 10 * N + T)) \
            run_rmt_on_babi.py --pretrained_model "$MODEL" --data_path "$DATA" --bf16 \
            --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
            --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
            --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
            --n_mem_tokens 8 --K 1 --n_ctrl_tokens 0 --use_mem_proj --mem_proj_mode proj --attn_implementation sdpa \
            --generation_max_new_tokens 8 "$@"
        if [ -n "$DRY_RUN" ]; then echo; fi
    done
done
