"""Train GradMem on phonebook lookup (N names with their numbers per context; query a name, answer its number).

    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_phonebook.py --pretrained_model gpt2 \\
        --dataset_name ./data/phonebook_N8 ...                             (preset: scripts/run_gradmemgpt_on_phonebook.sh)

Data (`--dataset_name`): a local folder written by `python phonebook_utils.py`, or a hub id such as
booydar/phonebook_N8. WRITE reads the phone book, READ reads '\\n' + name + ': ' + number (phonebook_utils.py).
Options and metrics as run_gradmemgpt_on_squad.py (which also takes phonebook datasets, as the reference did):
teacher-forced token accuracy / exact match, and `squad_exact_match` / `squad_f1` of greedily decoded numbers.
"""
from typing import Optional, Sequence

from answer_task_runs import train_gradmem
from answer_tasks import PhonebookDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_gradmem(PhonebookDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
