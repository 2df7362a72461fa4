"""Train GradMem on bAbI question answering (BABILong qa1-qa5 "0k"); the test split is reported at the end.

    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_babi.py --pretrained_model gpt2 \\
        --data_path ./data/babilong_qa2_0k ...                                  (preset: scripts/run_gradmemgpt_on_babi.sh)

Data: `--data_path` = a save_to_disk folder (scripts/download_babi.sh; BABILong input/question/target or prepared
context/query/target columns), or `--babi_dir` + `--babi_task` = the original bAbI text files (babi_utils.py).
WRITE reads the story, READ reads `question + ' ' + answer` (as the reference implementation does).

Metrics: teacher-forced token accuracy / exact match of the answer tokens (the reference's metrics), and the
answers decoded greedily from [memory; question] scored with the official SQuAD v1.1 exact match / F1
(`squad_exact_match`, `squad_f1`). The best checkpoint (by --metric_for_best_model on valid) is evaluated on valid
and on test (`test_*` in all_results.json); the reference never looked at the test split.
"""
from typing import Optional, Sequence

from answer_task_runs import train_gradmem
from answer_tasks import BabiDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_gradmem(BabiDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
