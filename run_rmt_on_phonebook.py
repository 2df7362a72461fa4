"""Train the RMT2Segm baseline (rmt.py) on phonebook lookup: WRITE the phone book, READ name + number.

    accelerate launch --config_file accelerate.yaml run_rmt_on_phonebook.py \\
        --pretrained_model gpt2 --dataset_name ./data/phonebook_N8 ...
    (preset: scripts/run_rmt_on_phonebook.sh)

Data: `--dataset_name` = a local folder written by `python phonebook_utils.py`, or a hub id such as
booydar/phonebook_N8.
Backbone: `--pretrained_model` (hub id or local folder) or from scratch (`--base_model llama|gpt2|pythia`).

Metrics at every evaluation: teacher-forced token accuracy / exact match of the answer tokens (as the reference), and
`squad_exact_match` / `squad_f1`: answers decoded greedily from [memory; query] and scored with the official SQuAD
v1.1 metric against all gold answers (answer_tasks.py). `python run_rmt_on_phonebook.py --help` lists every option.
"""
from typing import Optional, Sequence

from answer_task_runs import train_rmt
from answer_tasks import PhonebookDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_rmt(PhonebookDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
