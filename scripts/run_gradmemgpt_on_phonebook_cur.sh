#!/usr/bin/env bash
# Curriculum over phonebook sizes N = 2, 4, 8, 16, 32, 64 (reference pb/run_gradmemgpt_on_phonebook_cur.sh):
# each N starts from the best checkpoint of the previous N's run (read from its all_results.json; the reference
# passed a run folder where a file was needed). Settings as scripts/run_gradmemgpt_on_phonebook.sh.
#
# usage: SIZES="2 4 8 16 32 64" SEED=1 bash scripts/run_gradmemgpt_on_phonebook_cur.sh [extra run-script args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=${SIZES:-2 4 8 16 32 64}
SEED=${SEED:-1}
INIT=${INIT:-}
for N in $SIZES; do
    RUN_NAME="gradmem_phonebook_cur_N${N}"
    INIT="$INIT" N="$N" SEEDS="$SEED" bash scripts/run_gradmemgpt_on_phonebook.sh --run_name "$RUN_NAME" "$@"
    RESULTS="./runs/phonebook_N${N}/${RUN_NAME}/run_$((142 + SEED))/all_results.json"
    INIT=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['best_model_checkpoint'])" "$RESULTS")
    echo "N=${N} done; next size starts from ${INIT}"
done
