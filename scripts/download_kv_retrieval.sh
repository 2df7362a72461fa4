#!/usr/bin/env bash
# Download the reference's KV-retrieval datasets from the Hugging Face hub (yurakuratov/<name>) into ./data/<name>.
# Needs hub access. The same tasks can be built locally without it: bash scripts/make_kv_datasets.sh
# (locally built data has the same format and names but other random samples; the reference's noise datasets were
# made by an unpublished procedure, so the locally built *_noise_* sets follow kv_dataset_utils' own definition).
#
# usage: bash scripts/download_kv_retrieval.sh [NAME ...]     (default: the 13 datasets below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for N in 4 8 16 32 64 96 128; do names+=("N${N}-K2V2-V62_1M"); done
    for N in 8 16; do
        for P in 0.25 0.5 0.75; do names+=("N${N}-K2V2-V62_noise_${P}_1M"); done
    done
fi
mkdir -p ./data
for name in "${names[@]}"; do
    if [ -e "./data/${name}" ]; then
        echo "./data/${name} exists, skipping"
        continue
    fi
    "$PY" -c "import sys, datasets; datasets.load_dataset('yurakuratov/' + sys.argv[1]).save_to_disk('./data/' + sys.argv[1])" "$name"
    echo "saved ./data/${name}"
done
