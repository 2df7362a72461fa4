#!/usr/bin/env bash
# Download the bAbI QA datasets the reference trained on (BABILong qa1-qa5 without haystack, "0k") from the
# Hugging Face hub and save them where run_gradmemgpt_on_babi.py looks for them: ./data/babilong_qa{N}_0k
# (splits train / valid / test; columns context, query, target). Needs hub access.
#
# Without hub access, use the original bAbI text files instead (tasks_1-20_v1-2, folder en-valid-10k):
#   python babi_utils.py --babi_dir tasks_1-20_v1-2/en-valid-10k --task qa2 --output_path ./data/babilong_qa2_0k
# or pass --babi_dir/--babi_task to run_gradmemgpt_on_babi.py directly.
#
# usage: bash scripts/download_babi.sh [TASK ...]     (default: 1 2 3 4 5)
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${@:-1 2 3 4 5}
mkdir -p ./data
for N in $TASKS; do
    NAME="babilong_qa${N}_0k"
    if [ -e "./data/${NAME}" ]; then
        echo "./data/${NAME} exists, skipping"
        continue
    fi
    "${PYTHON:-python3}" -c "from datasets import load_dataset; load_dataset('yurakuratov/${NAME}').save_to_disk('./data/${NAME}')"
    echo "saved ./data/${NAME}"
done
