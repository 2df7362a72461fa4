#!/usr/bin/env bash
# Short GPU runs of every preset through `accelerate launch`, in two lanes that share nothing (one GPU each when
# the machine has two; one after the other on one GPU). Each run's log, all_results.json and trainer_state.json go
# to $OUT; bench/summarize_runs.py turns them into bench/results/gpu_presets_<card>.md.
#
#   OUT=/tmp/acc bash bench/gpu_acceptance.sh            (about 3-5 minutes on two H100s)
#
# Lane A (GPU 0): GradMem paper preset (N8), RMT preset (N8), full-context Llama preset (N8), 300 steps each.
# Lane B (GPU 1): GradMem on the local phonebook generator with a local GPT-2 backbone, then text compression on
#                 the PG19 fixture corpus; 300 steps each.
# Presets run as they are, except steps/eval cadence (and the total batch for phonebook, 64 instead of 256).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the logs}
mkdir -p "$OUT" data
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0)
STEPS=${STEPS:-300} EVAL=${EVAL:-100}  # override for a quick CPU check of the wiring
SHORT=(--max_eval_samples 1000 --report_to none --dataloader_num_workers 2)

run() {  # run NAME EXP_DIR command...
    local name=$1 exp=$2; shift 2
    local start=$SECONDS
    "$@" --exp_path "$exp" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall_s=$((SECONDS - start))" | tee -a "$OUT/status.txt"
    cp "$exp/all_results.json" "$OUT/$name.all_results.json" 2>/dev/null
    cp "$exp/trainer_state.json" "$OUT/$name.trainer_state.json" 2>/dev/null
}

lane_a() {
    export CUDA_VISIBLE_DEVICES=0
    SEEDS=1 MAX_STEPS=$STEPS DATA_NAME=N8-K2V2-V62_100K run gradmem_kv runs/acc/gradmem_kv \
        bash scripts/run_gradmemgpt_on_kv_retrieval.sh --eval_steps $EVAL --logging_steps 50 "${SHORT[@]}"
    SEEDS=1 MAX_STEPS=$STEPS EVAL_STEPS=$EVAL DATA_NAME=N8-K2V2-V62_100K run rmt_kv runs/acc/rmt_kv \
        bash scripts/run_rmt_on_kv_retrieval.sh --logging_steps 50 "${SHORT[@]}"
    SEEDS=1 MAX_STEPS=$STEPS EVAL_STEPS=$EVAL DATA_NAME=N8-K2V2-V62_100K run gpt_kv runs/acc/gpt_kv \
        bash scripts/run_gpt_on_kv_retrieval.sh --logging_steps 50 "${SHORT[@]}"
}

lane_b() {
    if (( GPUS > 1 )); then export CUDA_VISIBLE_DEVICES=1; else export CUDA_VISIBLE_DEVICES=0; fi
    python3 phonebook_utils.py --n_entries 8 --n_train 100000 --n_valid 1000 --seed 142 \
        --output_path data/phonebook_N8 > "$OUT/phonebook_data.log" 2>&1
    python3 make_local_gpt2.py --texts data/phonebook_N8 --out data/gpt2_phonebook --overwrite \
        --n_layer 4 --n_head 4 --n_embd 256 --n_positions 512 --vocab_size 2000 >> "$OUT/phonebook_data.log" 2>&1
    N=8 SEEDS=1 TBS=64 MODEL=data/gpt2_phonebook run phonebook runs/acc/phonebook \
        bash scripts/run_gradmemgpt_on_phonebook.sh --max_steps $STEPS --eval_steps $EVAL --logging_steps 50 \
        --warmup_steps 100 --learning_rate 1e-3 --generation_eval_samples 200 "${SHORT[@]}"
    python3 prepare_pg19_chunks.py --input_dir tests/data/pg19_fixture --output_path data/pg19_fixture_w40 \
        --min_words 40 --sample_n_valid_chunks 8 --seed 144 --overwrite > "$OUT/pg19_data.log" 2>&1
    python3 make_local_gpt2.py --texts tests/data/pg19_fixture --out data/gpt2_pg19 --overwrite \
        --n_layer 4 --n_head 4 --n_embd 256 --n_positions 512 --vocab_size 2000 >> "$OUT/pg19_data.log" 2>&1
    run text_compression runs/acc/text_compression \
        accelerate launch --config_file accelerate.yaml --num_processes 1 --main_process_port 29811 \
        run_gradmemgpt_on_text_compression.py --dataset_path data/pg19_fixture_w40 \
        --pretrained_model data/gpt2_pg19 --freeze_backbone false --max_context_length 64 \
        --per_device_batch_size 16 --learning_rate 1e-3 --warmup_steps 50 --max_steps $STEPS --eval_steps $EVAL \
        --logging_steps 50 --report_to none --dataloader_num_workers 2
}

: > "$OUT/status.txt"
if (( GPUS > 1 )); then
    lane_a & lane_b & wait
else
    lane_a; lane_b
fi
python3 bench/summarize_runs.py "$OUT" > "$OUT/summary.md"
cat "$OUT/status.txt" "$OUT/summary.md"
