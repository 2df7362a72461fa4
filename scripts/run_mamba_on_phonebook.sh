#!/usr/bin/env bash
# Full-context Mamba baseline on phonebook lookup: the reference preset (pb/run_mamba_on_phonebook.sh), i.e.
# scripts/run_gpt_on_phonebook.sh with the pretrained Mamba-130m (hub id state-spaces/mamba-130m-hf, or MODEL=<local
# folder>), sizes N = 4 ... 64 and a per-device batch of 512 / N (total batch 256, lr 3e-4 as there).
#
# usage: SIZES="4 8 16 32 64" SEEDS=1 NP=1 bash scripts/run_mamba_on_phonebook.sh [extra run-script args]
#   DRY_RUN=1 bash scripts/run_mamba_on_phonebook.sh    prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-4 8 16 32 64}
MODEL=${MODEL:-state-spaces/mamba-130m-hf}
for N in $SIZES; do
    MODEL="$MODEL" SIZES="$N" PER_DEVICE=${PER_DEVICE:-$(( 512 / N ))} bash scripts/run_gpt_on_phonebook.sh "$@"
done
