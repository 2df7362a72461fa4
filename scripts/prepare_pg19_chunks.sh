#!/usr/bin/env bash
# PG19 -> sentence-aligned chunks of >= MIN_WORDS words for run_gradmemgpt_on_text_compression.py.
# Reference preset: 8000-word chunks, 5000 randomly started validation chunks, seed 144.
#   bash scripts/prepare_pg19_chunks.sh                                   # hub dataset deepmind/pg19
#   INPUT_DIR=/path/to/books bash scripts/prepare_pg19_chunks.sh          # <dir>/<split>/<book_id>.txt
#   DATASET_PATH=/path/to/saved_dict bash scripts/prepare_pg19_chunks.sh  # save_to_disk DatasetDict (text, book id)
# Any further arguments are passed on (e.g. --overwrite, --num_proc 16, --book_id_field id).
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_WORDS=${MIN_WORDS:-8000}
SAMPLE_N_VALID_CHUNKS=${SAMPLE_N_VALID_CHUNKS:-5000}
SEED=${SEED:-144}
SPLITS=${SPLITS:-train,validation,test}
OUTPUT_PATH=${OUTPUT_PATH:-./data/pg19_chunks_w${MIN_WORDS}}

if [ -n "${INPUT_DIR:-}" ]; then
    source_args=(--input_dir "$INPUT_DIR")
elif [ -n "${DATASET_PATH:-}" ]; then
    source_args=(--dataset_path "$DATASET_PATH")
else
    source_args=(--dataset_name "${DATASET_NAME:-deepmind/pg19}")
fi

"${PYTHON:-python3}" prepare_pg19_chunks.py "${source_args[@]}" \
    --splits "$SPLITS" \
    --output_path "$OUTPUT_PATH" \
    --min_words "$MIN_WORDS" \
    --sample_n_valid_chunks "$SAMPLE_N_VALID_CHUNKS" \
    --seed "$SEED" \
    "$@"
