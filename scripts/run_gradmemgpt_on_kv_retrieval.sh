#!/usr/bin/env bash
# Paper preset: GradMem on KV retrieval, 3 seeds, through `accelerate launch` with NP processes (one per GPU).
# Model: `--preset paper_kv` (grad_memgpt.PRESETS: Llama L4 H4 D128 from scratch, 8 memory vectors, K=2 inner SGD
# steps at inner lr 0.04, second order through both steps, write head, inner loss added to the outer loss with
# weight 0.5) with the kv_alphabet_62 tokenizer; AdamW lr 1e-4, constant with 10k warmup steps, total batch 64, fp32;
# eval/checkpoint every 500 steps, early stopping after 500 evaluations without improvement, stop at exact match 1.0.
# Seeds 142+N for N in SEEDS. PRECISION: fp32 (strict, TF32 off; default), tf32 (TF32 matmuls) or bf16 (autocast,
# fp32 master weights).
#
#   bash scripts/run_gradmemgpt_on_kv_retrieval.sh                      # 3 seeds, one after the other, 1 process
#   NP=2 bash scripts/run_gradmemgpt_on_kv_retrieval.sh                 # 2 GPUs per run (gradient accumulation adapts)
#   SEEDS=1 MAX_STEPS=300 bash scripts/run_gradmemgpt_on_kv_retrieval.sh --eval_steps 100   # a quick check
#   DATA_NAME=N16-K2V2-V62_1M INIT_CHECKPOINT=runs/.../checkpoint-198000 bash scripts/...  # curriculum warm start
#   DRY_RUN=1 bash scripts/run_gradmemgpt_on_kv_retrieval.sh            # print the commands, run nothing
# Extra arguments are passed to run_gradmemgpt_on_kv_retrieval.py (they override the preset's).
# A missing ./data/$DATA_NAME is generated on the spot (KV names only). Re-running resumes each seed's run folder.
set -euo pipefail
cd "$(dirname "$0")/.."

NP=${NP:-1}
SEEDS=${SEEDS:-"1 2 3"}
DATA_NAME=${DATA_NAME:-N8-K2V2-V62_1M}
TBS=${TBS:-64}
PER_DEVICE=${PER_DEVICE:-64}  # the largest micro-batch of one GPU (see scripts/_launch.sh)
MAX_STEPS=${MAX_STEPS:-1000000}
PRECISION=${PRECISION:-fp32}  # fp32 (strict), tf32 or bf16
PORT=${PORT:-$((29500 + RANDOM % 1000))}
DRY_RUN=${DRY_RUN:-}

# fp32 and bf16 go to accelerate launch's --mixed_precision (no / bf16), as this preset always passed them, so that
# its run records stay the same (and resume); tf32 adds the run script's --tf32
case "$PRECISION" in
    fp32) MIXED_PRECISION=no; PRECISION_ARGS=() ;;
    tf32) MIXED_PRECISION=no; PRECISION_ARGS=(--tf32) ;;
    bf16) MIXED_PRECISION=bf16; PRECISION_ARGS=() ;;
    *) echo "PRECISION must be fp32, tf32 or bf16, got $PRECISION" >&2; exit 2 ;;
esac
source scripts/_launch.sh && launch_setup  # PER_DEVICE_BATCH, GRAD_ACC and LAUNCH from NP, TBS, PER_DEVICE
LAUNCH+=(--main_process_port "$PORT" --mixed_precision "$MIXED_PRECISION")
if [ -n "$DRY_RUN" ]; then LAUNCH=(printf '%q ' "${LAUNCH[@]}"); fi
INIT=()
if [ -n "${INIT_CHECKPOINT:-}" ]; then INIT=(--init_checkpoint "$INIT_CHECKPOINT"); fi

for N in $SEEDS; do
    "${LAUNCH[@]}" run_gradmemgpt_on_kv_retrieval.py \
        --data_path "./data/$DATA_NAME" \
        --preset paper_kv --base_model llama --tokenizer_path ./tokenizers/kv_alphabet_62/ \
        --last_K_second_order 2 --use_adam false --n_ctrl_tokens 0 --attn_implementation auto "${PRECISION_ARGS[@]}" \
        --per_device_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC" --total_batch_size "$TBS" \
        --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps "$MAX_STEPS" \
        --weight_decay 0.0 --max_grad_norm 1.0 \
        --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 \
        --stop_metric exact_match --stop_metric_value 1.0 \
        --seed $((142 + N)) "${INIT[@]}" "$@"
    if [ -n "$DRY_RUN" ]; then echo; fi
done
