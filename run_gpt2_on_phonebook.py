"""Full-context baseline on phonebook lookup: a plain causal LM (GPT-2, Llama, Pythia, Mamba) reads the phone book,
the name and the number; loss and metrics on the number.

    accelerate launch --config_file accelerate.yaml run_gpt2_on_phonebook.py \\
        --pretrained_model gpt2 --dataset_name ./data/phonebook_N8 ...
    (presets: scripts/run_gpt_on_phonebook.sh, scripts/run_mamba_on_phonebook.sh)

Data: `--dataset_name` = a local folder written by `python phonebook_utils.py`, or a hub id such as
booydar/phonebook_N8.
Backbone: `--pretrained_model` (hub id or local folder; e.g. gpt2, state-spaces/mamba-130m-hf) or from scratch
(`--base_model llama|gpt2|pythia|mamba`). `--max_input_length N` keeps the last N tokens of each sequence.

Metrics at every evaluation: teacher-forced token accuracy / exact match of the answer tokens (as the reference), and
`squad_exact_match` / `squad_f1`: answers decoded greedily from context + query and scored with the official SQuAD
v1.1 metric against all gold answers (answer_tasks.py). `python run_gpt2_on_phonebook.py --help` lists every option.
"""
from typing import Optional, Sequence

from answer_task_runs import train_full_context
from answer_tasks import PhonebookDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_full_context(PhonebookDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
