#!/usr/bin/env bash
# The main job (README command 1: `bash scripts/setup.sh && bash scripts/quickstart.sh`). Installs nothing.
# Trains a small GradMem (Llama L2 H2 D64 from scratch, 8 memory vectors, K=2 second-order inner SGD steps, write
# head) on a small KV-retrieval dataset generated locally (N2-K2V2-V62: 2 key-value pairs of 2+2 characters per
# context, 20,000 train samples), on the GPU when there is one and on the CPU otherwise, then prints a results
# table. The learning curve (exact match and loss vs step) is written to runs/quickstart/learning_curve.png.
# Extra arguments are passed on to run_gradmemgpt_on_kv_retrieval.py (e.g. --max_steps 300 for a shorter run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/quickstart}
# Tiny matrices gain little from more CPU threads, and oversubscribed OpenMP threads slow down badly on a busy
# machine; one thread per process unless the caller chose otherwise (no effect on GPU speed).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PY" run_gradmemgpt_on_kv_retrieval.py \
    --data_path ./data/N2-K2V2-V62_20K --exp_path "$OUT" --overwrite \
    --base_model llama --n_layer 2 --n_head 2 --n_embd 64 \
    --n_mem_tokens 8 --K 2 --inner_lr 0.04 --grad_mode second --use_write_head \
    --add_inner_loss_to_outer --inner_loss_weight 0.5 \
    --per_device_batch_size 32 --learning_rate 1e-3 --warmup_steps 100 --max_steps 1500 \
    --eval_steps 100 --logging_steps 50 --max_eval_samples 512 --early_stopping_patience 5 \
    --stop_metric exact_match --stop_metric_value 0.9 --dataloader_num_workers 0 --report_to tensorboard "$@"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
results = json.loads((run / "all_results.json").read_text())
history = json.loads((run / "trainer_state.json").read_text())["log_history"]
evals = [r for r in history if "eval_exact_match" in r]
train_time = next((r["train_runtime"] for r in history if "train_runtime" in r), float("nan"))
print("\nGradMem quickstart: N2-K2V2-V62 key-value retrieval, Llama L2 H2 D64, 8 memory vectors, K=2")
print(f"{'step':>6} {'exact match':>12} {'token acc':>10} {'eval loss':>10}")
for r in evals:
    print(f"{r['step']:>6} {r['eval_exact_match']:>12.3f} {r['eval_token_accuracy']:>10.3f} {r['eval_loss']:>10.3f}")
print(f"final (best checkpoint, {results.get('global_step')} steps, {train_time:.0f} s of training): "
      f"exact match {results['eval_exact_match']:.3f}, token accuracy {results['eval_token_accuracy']:.3f}")
print(f"run folder: {run}   learning curve: {run / 'learning_curve.png'}")
PYEOF
