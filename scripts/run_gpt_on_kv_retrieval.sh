#!/usr/bin/env bash
# Full-context baseline on KV retrieval: the reference preset (llama L4 H4 D128 from scratch with 1024 positions and
# plain RoPE, total batch 64, lr 5e-5 constant after 10000 warmup steps, adam beta2 0.98, at most 200k steps,
# eval/checkpoint every 500 steps, early-stopping patience 500 evaluations), seeds 142+N.
# Precision: bf16 autocast with fp32 master weights (the reference trained pure bf16); PRECISION=fp32 for strict fp32
# (TF32 off), PRECISION=tf32 for fp32 with TF32 matmuls.
# The reference warm-started N96 from its N64 run: INIT_CHECKPOINT=runs/N64-K2V2-V62_1M/llama_L4H4D128_L1024_bs_64_
# lr_5e-05_b2_0.98/run_<seed>/checkpoint-<step> with RUN_NAME=llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98_init_N64.
# A missing ./data/<DATA_NAME> whose name is a KV dataset name is generated on the spot (see kv_dataset_utils.py).
#
# usage: bash scripts/run_gpt_on_kv_retrieval.sh [extra run-script args, e.g. --max_input_length 512]
#   DATA_NAME=N32-K2V2-V62_1M MAX_STEPS=500 EVAL_STEPS=100 SEEDS=1 bash scripts/run_gpt_on_kv_retrieval.sh
#   BASE_MODEL=mamba LR=3e-4 ADAM_BETA2=0.999 bash scripts/run_gpt_on_kv_retrieval.sh    (the Mamba baseline)
#   NP=2 bash scripts/run_gpt_on_kv_retrieval.sh       (DDP on 2 GPUs, same total batch; see scripts/_launch.sh)
#   DRY_RUN=1 bash scripts/run_gpt_on_kv_retrieval.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_NAME=${DATA_NAME:-N96-K2V2-V62_1M}
DATA_DIR=${DATA_DIR:-./data}
BASE_MODEL=${BASE_MODEL:-llama}             # llama | gpt2 | pythia | mamba
MAX_POSITIONS=${MAX_POSITIONS:-1024}        # llama/gpt2/pythia positions (llama: plain RoPE, theta 1e4)
TBS=${TBS:-64}
PER_DEVICE=${PER_DEVICE:-64}
LR=${LR:-5e-5}
ADAM_BETA2=${ADAM_BETA2:-0.98}
MAX_STEPS=${MAX_STEPS:-200000}
WARMUP=${WARMUP:-10000}
EVAL_STEPS=${EVAL_STEPS:-500}
PATIENCE=${PATIENCE:-500}
PRECISION=${PRECISION:-bf16}                # fp32 (strict) | tf32 | bf16
SEEDS=${SEEDS:-"1 2"}
INIT_CHECKPOINT=${INIT_CHECKPOINT:-}
RUN_NAME=${RUN_NAME:-}
DRY_RUN=${DRY_RUN:-}

source scripts/_launch.sh && precision_args "$PRECISION" && launch_setup  # PRECISION_ARGS, LAUNCH, batches
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
POSITIONS=(--max_position_embeddings "$MAX_POSITIONS")
if [ "$BASE_MODEL" = mamba ]; then POSITIONS=(); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" --main_process_port $(( 29600 + N )) run_gpt2_on_kv_retrieval.py \
        --data_path "$DATA_DIR/$DATA_NAME" \
        --base_model "$BASE_MODEL" --n_layer 4 --n_head 4 --n_embd 128 "${POSITIONS[@]}" \
        --tokenizer_path ./tokenizers/kv_alphabet_62/ "${PRECISION_ARGS[@]}" \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate "$LR" --adam_beta2 "$ADAM_BETA2" --lr_scheduler_type constant_with_warmup \
        --warmup_steps "$WARMUP" --max_steps "$MAX_STEPS" \
        --eval_steps "$EVAL_STEPS" --logging_steps "$EVAL_STEPS" --early_stopping_patience "$PATIENCE" \
        --seed $(( 142 + N )) \
        ${INIT_CHECKPOINT:+--init_checkpoint "$INIT_CHECKPOINT"} ${RUN_NAME:+--run_name "$RUN_NAME"} "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
