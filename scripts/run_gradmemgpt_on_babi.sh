#!/usr/bin/env bash
# GradMem on bAbI (BABILong qa1-qa5 "0k") with a pretrained GPT-2: the reference preset (which ran qa2 only).
#   lr 1e-4, total batch 64 (16 per device x 4 accumulation on one GPU), 8 memory tokens, K=2 SGD inner steps,
#   inner lr 0.04, second order, shared memory projection, write head, no inner loss in the outer loss,
#   warmup 10k, at most 200k steps, eval/checkpoint every 500 steps, early-stopping patience 500 evaluations.
# Precision: bf16 autocast with fp32 master weights (the reference trained pure bf16).
# Missing data are downloaded with scripts/download_babi.sh (needs hub access; or see babi_utils.py for the
# original text files). The best checkpoint is evaluated on valid and test (runs/<data>/<run>/run_<seed>/all_results.json).
# MODEL: hub id or local folder of the backbone (default gpt2). DATA_DIR: where babilong_qa<T>_0k are (default
# ./data; missing ./data folders are downloaded).
#
# usage: TASKS="1 2 3 4 5" SEEDS="1 2 3" NP=1 bash scripts/run_gradmemgpt_on_babi.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_gradmemgpt_on_babi.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-1}
TASKS=${TASKS:-2}
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
        "${LAUNCH[@]}" \
            --main_process_port $((29500 + 10 * N + T)) \
            run_gradmemgpt_on_babi.py --pretrained_model "$MODEL" --data_path "$DATA" --bf16 \
            --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
            --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
            --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
            --n_mem_tokens 8 --K 2 --inner_lr 0.04 --grad_mode second --use_mem_proj --mem_proj_mode proj \
            --use_write_head --add_inner_loss_to_outer false --attn_implementation auto \
            --generation_max_new_tokens 8 "$@"
        if [ -n "$DRY_RUN" ]; then echo; fi
    done
done
