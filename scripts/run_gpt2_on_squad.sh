#!/usr/bin/env bash
# Full-context baseline on SQuAD v1.1: a pretrained GPT-2 reads context + question + answer; the reference preset
# (squad/run_gpt2_on_squad.sh). lr 1e-4 constant after 10k warmup steps, total batch 64 (32 per device x 2
# accumulation on one GPU), at most 200k steps, eval/checkpoint every 500 steps, early-stopping patience 500
# evaluations; bf16 autocast with fp32 master weights. Metrics: token accuracy / exact match (teacher forced) and
# the official SQuAD EM/F1 of greedily decoded answers (first 1000 dev questions during training, all for the best
# checkpoint). Data: the hub dataset `squad`, or SQUAD_JSON=<folder with train-v1.1.json and dev-v1.1.json>.
# MODEL: hub id or local folder of the backbone (default gpt2; MODEL=state-spaces/mamba-130m-hf for Mamba).
#
# usage: SEEDS=1 NP=1 bash scripts/run_gpt2_on_squad.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_gpt2_on_squad.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
LR=${LR:-1e-4}
PER_DEVICE=${PER_DEVICE:-32}
TBS=${TBS:-64}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
DATA_ARGS=(--dataset_name squad)
if [ -n "${SQUAD_JSON:-}" ]; then DATA_ARGS+=(--squad_json "$SQUAD_JSON"); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $((29850 + N)) \
        run_gpt2_on_squad.py --pretrained_model "$MODEL" "${DATA_ARGS[@]}" --bf16 \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate "$LR" --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
        --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
        --generation_max_new_tokens 32 --generation_eval_samples 1000 "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
