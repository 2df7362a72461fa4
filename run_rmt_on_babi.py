"""Train the RMT2Segm baseline (rmt.py) on bAbI (BABILong qa1-qa5 "0k"): WRITE the story, READ question + answer.

    accelerate launch --config_file accelerate.yaml run_rmt_on_babi.py \\
        --pretrained_model gpt2 --data_path ./data/babilong_qa1_0k ...
    (preset: scripts/run_rmt_on_babi.sh)

Data: `--data_path` = a save_to_disk folder (scripts/download_babi.sh), or `--babi_dir` + `--babi_task` = the
original bAbI text files (babi_utils.py). The best checkpoint is evaluated on valid and test.
Backbone: `--pretrained_model` (hub id or local folder) or from scratch (`--base_model llama|gpt2|pythia`).

Metrics at every evaluation: teacher-forced token accuracy / exact match of the answer tokens (as the reference), and
`squad_exact_match` / `squad_f1`: answers decoded greedily from [memory; query] and scored with the official SQuAD
v1.1 metric against all gold answers (answer_tasks.py). `python run_rmt_on_babi.py --help` lists every option.
"""
from typing import Optional, Sequence

from answer_task_runs import train_rmt
from answer_tasks import BabiDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_rmt(BabiDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
