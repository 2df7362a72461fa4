#!/usr/bin/env bash
# Full-context baseline on bAbI (BABILong qa1-qa5 "0k"): the reference preset (run_gpt_on_babi.sh), which despite
# its name trains the pretrained Mamba-130m (MODEL, default state-spaces/mamba-130m-hf; MODEL=gpt2 for GPT-2).
# lr 1e-4 constant after 10k warmup steps, total batch 64 (64 per device on one GPU), at most 200k steps,
# eval/checkpoint every 500 steps, early-stopping patience 500 evaluations; bf16 autocast with fp32 master weights.
# The best checkpoint is evaluated on valid and test, with the SQuAD EM/F1 of greedily decoded answers.
# Data: DATA_DIR/babilong_qa<T>_0k (default ./data; missing ./data folders are downloaded by scripts/download_babi.sh).
#
# usage: TASKS="1 2 3 4 5" SEEDS=1 NP=1 bash scripts/run_gpt_on_babi.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_gpt_on_babi.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-1 2 3 4 5}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-state-spaces/mamba-130m-hf}
PER_DEVICE=${PER_DEVICE:-64}
TBS=${TBS:-64}
DATA_DIR=${DATA_DIR:-./data}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi

for N in $SEEDS; do
    for T in $TASKS; do
        DATA=$DATA_DIR/babilong_qa${T}_0k
        [ -d "$DATA" ] || [ -n "$DRY_RUN" ] || bash scripts/download_babi.sh "$T"
        "${LAUNCH[@]}" --main_process_port $((29650 + 10 * N + T)) \
            run_gpt2_on_babi.py --pretrained_model "$MODEL" --data_path "$DATA" --bf16 \
            --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
            --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
            --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
            --generation_max_new_tokens 8 "$@"
        if [ -n "$DRY_RUN" ]; then echo; fi
    done
done
