#!/usr/bin/env bash
# Build the paper's KV-retrieval datasets locally, deterministically, under the reference's names (no hub needed):
#   N{4,8,16,32,64,96,128}-K2V2-V62_1M and the noise family N{8,16}-K2V2-V62_noise_{0.25,0.5,0.75}_1M
# into ./data/<name> (DatasetDict train/valid, columns context/query/target; see kv_dataset_utils.py).
# Existing folders are kept (delete one to rebuild it).
#
# usage: bash scripts/make_kv_datasets.sh [NAME ...]     (default: all 13 datasets above)
#   N_TRAIN=10000 bash scripts/make_kv_datasets.sh      smaller train splits (the names then end in _10K)
#   N_VALID (default 5000) and SEED (default 0) likewise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N_TRAIN=${N_TRAIN:-1000000}
N_VALID=${N_VALID:-5000}
SEED=${SEED:-0}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for N in 4 8 16 32 64 96 128; do names+=("N${N}-K2V2-V62"); done
    for N in 8 16; do
        for P in 0.25 0.5 0.75; do names+=("N${N}-K2V2-V62_noise_${P}"); done
    done
fi
for name in "${names[@]}"; do
    # default output folder: ./data/<name with the size suffix of N_TRAIN>
    "$PY" kv_dataset_utils.py --name "$name" --n_train "$N_TRAIN" --n_valid "$N_VALID" --seed "$SEED" --skip_existing
done
