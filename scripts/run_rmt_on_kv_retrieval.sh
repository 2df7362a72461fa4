#!/usr/bin/env bash
# RMT2Segm baseline on KV retrieval: the reference preset (llama L4 H4 D128 from scratch, 8 memory vectors, one
# forward write, write-side memory projection, fp32, total batch 64, lr 1e-4 constant after 2000 warmup steps, at
# most 1M steps, eval/checkpoint every 500 steps, early-stopping patience 500 evaluations), seeds 142+N.
# A missing ./data/<DATA_NAME> whose name is a KV dataset name is generated on the spot (see kv_dataset_utils.py).
# Attention: sdpa (the same function as the reference's eager, faster; RMT needs first-order gradients only).
#
# usage: bash scripts/run_rmt_on_kv_retrieval.sh [extra run-script args, e.g. --K 2 --use_reconstruction_loss]
#   settings below can be overridden from the environment, e.g. a short check:
#   DATA_NAME=N8-K2V2-V62_100K MAX_STEPS=500 EVAL_STEPS=100 SEEDS=1 bash scripts/run_rmt_on_kv_retrieval.sh
#   NP=2 bash scripts/run_rmt_on_kv_retrieval.sh      (DDP on 2 GPUs, same total batch; see scripts/_launch.sh)
#   DRY_RUN=1 bash scripts/run_rmt_on_kv_retrieval.sh   prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_NAME=${DATA_NAME:-N16-K2V2-V62_1M}      # the reference's task (RMT fails at N16: ~0.014 EM; N8: 0.96 at best)
DATA_DIR=${DATA_DIR:-./data}
TBS=${TBS:-64}                               # total batch size of one optimizer step
PER_DEVICE=${PER_DEVICE:-64}                 # the largest micro-batch of one GPU
LR=${LR:-1e-4}
ADAM_BETA2=${ADAM_BETA2:-0.999}              # the reference also swept 0.95 and 0.98
MAX_STEPS=${MAX_STEPS:-1000000}
WARMUP=${WARMUP:-2000}
EVAL_STEPS=${EVAL_STEPS:-500}                # evaluate, checkpoint and log every EVAL_STEPS
PATIENCE=${PATIENCE:-500}                    # early stopping: evaluations without improvement
SEEDS=${SEEDS:-"1 2"}                        # run N uses seed 142+N
INIT_CHECKPOINT=${INIT_CHECKPOINT:-}         # warm start (.safetensors or checkpoint folder), e.g. from a smaller N
DRY_RUN=${DRY_RUN:-}

source scripts/_launch.sh && launch_setup
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $(( 29500 + N )) run_rmt_on_kv_retrieval.py \
        --data_path "$DATA_DIR/$DATA_NAME" \
        --base_model llama --n_layer 4 --n_head 4 --n_embd 128 --tokenizer_path ./tokenizers/kv_alphabet_62/ \
        --n_mem_tokens 8 --K 1 --n_ctrl_tokens 0 --use_mem_proj --mem_proj_mode proj --attn_implementation sdpa \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate "$LR" --adam_beta2 "$ADAM_BETA2" --lr_scheduler_type constant_with_warmup \
        --warmup_steps "$WARMUP" --max_steps "$MAX_STEPS" \
        --eval_steps "$EVAL_STEPS" --logging_steps "$EVAL_STEPS" --early_stopping_patience "$PATIENCE" \
        --seed $(( 142 + N )) \
        ${INIT_CHECKPOINT:+--init_checkpoint "$INIT_CHECKPOINT"} "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
