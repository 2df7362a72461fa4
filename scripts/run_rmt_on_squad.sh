#!/usr/bin/env bash
# RMT2Segm baseline on SQuAD v1.1 with a pretrained GPT-2: the reference preset (squad/run_rmt_on_squad.sh).
#   lr 3e-4 constant after 10k warmup steps, total batch 64 (16 per device x 4 accumulation on one GPU), 64 memory
#   vectors, one forward write (K=1), write-side memory projection, at most 75k steps, eval/checkpoint every 500
#   steps, early-stopping patience 500 evaluations; bf16 autocast with fp32 master weights (the reference: pure bf16).
#   The reference also passed --use_write_head, a head that nothing used without the reconstruction loss: left out.
# Layout c_q (WRITE context, READ question + answer; LAYOUT=cq_a|qc_a for the others). Metrics: token accuracy /
# exact match (teacher forced) and the official SQuAD EM/F1 of greedily decoded answers (first 1000 dev questions
# during training, all for the best checkpoint). Attention: sdpa (same function as the reference's eager, faster).
# Data: the hub dataset `squad`, or SQUAD_JSON=<folder with train-v1.1.json and dev-v1.1.json>.
# MODEL: hub id or local folder of the backbone (default gpt2).
#
# usage: SEEDS=1 NP=1 bash scripts/run_rmt_on_squad.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_rmt_on_squad.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
LAYOUT=${LAYOUT:-c_q}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
PER_DEVICE=${PER_DEVICE:-16}
TBS=${TBS:-64}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
DATA_ARGS=(--dataset_name squad)
if [ -n "${SQUAD_JSON:-}" ]; then DATA_ARGS+=(--squad_json "$SQUAD_JSON"); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $((29800 + N)) \
        run_rmt_on_squad.py --pretrained_model "$MODEL" "${DATA_ARGS[@]}" --layout "$LAYOUT" --bf16 \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate 3e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 75000 \
        --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
        --n_mem_tokens 64 --K 1 --n_ctrl_tokens 0 --use_mem_proj --mem_proj_mode proj --attn_implementation sdpa \
        --generation_max_new_tokens 32 --generation_eval_samples 1000 "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
