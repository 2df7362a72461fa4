"""Full-context baseline on bAbI (BABILong qa1-qa5 "0k"): a plain causal LM (GPT-2, Llama, Pythia, Mamba) reads
story + question + answer; loss and metrics on the answer.

    accelerate launch --config_file accelerate.yaml run_gpt2_on_babi.py \\
        --pretrained_model gpt2 --data_path ./data/babilong_qa1_0k ...
    (preset: scripts/run_gpt_on_babi.sh)

Data: `--data_path` = a save_to_disk folder (scripts/download_babi.sh), or `--babi_dir` + `--babi_task` = the
original bAbI text files (babi_utils.py). The best checkpoint is evaluated on valid and test.
Backbone: `--pretrained_model` (hub id or local folder; e.g. gpt2, state-spaces/mamba-130m-hf) or from scratch
(`--base_model llama|gpt2|pythia|mamba`). `--max_input_length N` keeps the last N tokens of each sequence.

Metrics at every evaluation: teacher-forced token accuracy / exact match of the answer tokens (as the reference), and
`squad_exact_match` / `squad_f1`: answers decoded greedily from context + query and scored with the official SQuAD
v1.1 metric against all gold answers (answer_tasks.py). `python run_gpt2_on_babi.py --help` lists every option.
"""
from typing import Optional, Sequence

from answer_task_runs import train_full_context
from answer_tasks import BabiDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_full_context(BabiDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
