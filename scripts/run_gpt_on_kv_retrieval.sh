#!/usr/bin/env bash
# Full-context baseline on KV retrieval: the reference preset (llama L4 H4 D128 from scratch with 1024 positions and
# plain RoPE, bf16 autocast, batch 64, lr 5e-5, adam beta2 0.98, warmup 10000, 200k steps), seeds 142+N.
# The reference warm-started N96 from its N64 run (INIT_CHECKPOINT=runs/N64-K2V2-V62_1M/llama_L4H4D128_L1024_bs_64_
# lr_5e-05_b2_0.98/run_<seed>/checkpoint-<step>, run name suffix _init_N64: set RUN_NAME for that).
# A missing ./data/<DATA_NAME> whose name is a KV dataset name is generated on the spot (see kv_dataset_utils.py).
#
# usage: bash scripts/run_gpt_on_kv_retrieval.sh
#   DATA_NAME=N32-K2V2-V62_1M MAX_STEPS=500 EVAL_STEPS=100 SEEDS=1 bash scripts/run_gpt_on_kv_retrieval.sh
#   BASE_MODEL=mamba LR=3e-4 ADAM_BETA2=0.999 bash scripts/run_gpt_on_kv_retrieval.sh     (the Mamba baseline)
#   EXTRA="--max_input_length 512"   appends options (see run_gpt2_on_kv_retrieval.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."

NP=${NP:-1}
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
PRECISION=${PRECISION:-bf16}                # bf16 autocast with fp32 master weights (the reference: pure bf16)
SEEDS=${SEEDS:-"1 2"}
INIT_CHECKPOINT=${INIT_CHECKPOINT:-}
RUN_NAME=${RUN_NAME:-}
EXTRA=${EXTRA:-}
DRY_RUN=${DRY_RUN:-}                         # 1: print the commands instead of running them

if (( TBS % (PER_DEVICE * NP) != 0 )); then
    echo "TBS=$TBS is not a multiple of PER_DEVICE=$PER_DEVICE x NP=$NP" >&2; exit 1
fi
GRAD_ACC=$(( TBS / (PER_DEVICE * NP) ))
LAUNCH=(accelerate launch --config_file accelerate.yaml --num_processes "$NP" --mixed_precision "$PRECISION")
if (( NP > 1 )); then LAUNCH+=(--multi_gpu); fi
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
POSITIONS=(--max_position_embeddings "$MAX_POSITIONS")
if [ "$BASE_MODEL" = mamba ]; then POSITIONS=(); fi

for N in $SEEDS; do
    # shellcheck disable=SC2086
    "${LAUNCH[@]}" --main_process_port $(( 29600 + N )) run_gpt2_on_kv_retrieval.py \
        --data_path "$DATA_DIR/$DATA_NAME" \
        --base_model "$BASE_MODEL" --n_layer 4 --n_head 4 --n_embd 128 "${POSITIONS[@]}" \
        --tokenizer_path ./tokenizers/kv_alphabet_62/ \
        --per_device_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate "$LR" --adam_beta2 "$ADAM_BETA2" --lr_scheduler_type constant_with_warmup \
        --warmup_steps "$WARMUP" --max_steps "$MAX_STEPS" \
        --eval_steps "$EVAL_STEPS" --logging_steps "$EVAL_STEPS" --early_stopping_patience "$PATIENCE" \
        --seed $(( 142 + N )) \
        ${INIT_CHECKPOINT:+--init_checkpoint "$INIT_CHECKPOINT"} ${RUN_NAME:+--run_name "$RUN_NAME"} $EXTRA
    if [ -n "$DRY_RUN" ]; then echo; fi
done
