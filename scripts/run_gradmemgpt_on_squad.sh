#!/usr/bin/env bash
# GradMem on SQuAD v1.1 with a pretrained GPT-2, one of the reference's three layouts:
#   c_q  (reference run_gradmemgpt_on_squad.sh):       WRITE context,             READ question + answer, inner lr 0.25
#   cq_a (reference run_gradmemgpt_on_squad_cq_a.sh):  WRITE context + question,  READ 'Answer: ' + answer, inner lr 0.03
#   qc_a (no reference preset; cq_a's settings):       WRITE question + context,  READ 'Answer: ' + answer, inner lr 0.03
# Common: lr 1e-4, total batch 64 (32 per device x 2 accumulation on one GPU), 8 memory tokens, K=2 SGD inner
# steps, second order, shared memory projection, write head, no inner loss in the outer loss, warmup 10k, at most
# 200k steps, eval/checkpoint every 500 steps, patience 500 evaluations; bf16 autocast, fp32 master weights.
# Metrics: token accuracy / exact match (teacher forced, as the reference) and the official SQuAD v1.1 EM/F1 of
# greedily decoded answers (first 1000 dev questions during training, all 10570 for the best checkpoint).
# Data: the hub dataset `squad`, or SQUAD_JSON=<folder with train-v1.1.json and dev-v1.1.json>.
# MODEL: hub id or local folder of the backbone (default gpt2).
#
# usage: LAYOUT=c_q SEEDS=1 NP=1 bash scripts/run_gradmemgpt_on_squad.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_gradmemgpt_on_squad.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-1}
LAYOUT=${LAYOUT:-c_q}
SEEDS=${SEEDS:-1}
MODEL=${MODEL:-gpt2}
PER_DEVICE=${PER_DEVICE:-32}
TBS=${TBS:-64}
DRY_RUN=${DRY_RUN:-}
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
case "$LAYOUT" in
    c_q) LAYOUT_ARGS=(--inner_lr 0.25) ;;
    cq_a | qc_a) LAYOUT_ARGS=(--inner_lr 0.03 --last_K_second_order 2) ;;
    *) echo "unknown LAYOUT=$LAYOUT (c_q, cq_a or qc_a)" >&2; exit 2 ;;
esac
DATA_ARGS=(--dataset_name squad)
if [ -n "${SQUAD_JSON:-}" ]; then DATA_ARGS+=(--squad_json "$SQUAD_JSON"); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $((29600 + N)) \
        run_gradmemgpt_on_squad.py --pretrained_model "$MODEL" "${DATA_ARGS[@]}" --layout "$LAYOUT" --bf16 \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000 \
        --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed $((142 + N)) \
        --n_mem_tokens 8 --K 2 "${LAYOUT_ARGS[@]}" --grad_mode second --use_mem_proj --mem_proj_mode proj \
        --use_write_head --add_inner_loss_to_outer false --attn_implementation auto \
        --generation_max_new_tokens 32 --generation_eval_samples 1000 "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
