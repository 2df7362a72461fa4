"""Train the RMT2Segm baseline (rmt.py) on SQuAD v1.1: WRITE the context into memory by forward passes, READ
question + answer.

    accelerate launch --config_file accelerate.yaml run_rmt_on_squad.py \\
        --pretrained_model gpt2 --dataset_name squad ...
    (preset: scripts/run_rmt_on_squad.sh)

Data as run_gradmemgpt_on_squad.py: `--dataset_name squad` (hub, local copy, or `--squad_json DIR`), `--layout`
c_q (the reference's), cq_a or qc_a; a phonebook dataset too, as the reference's phonebook command lines pass it.
Backbone: `--pretrained_model` (hub id or local folder) or from scratch (`--base_model llama|gpt2|pythia`).

Metrics at every evaluation: teacher-forced token accuracy / exact match of the answer tokens (as the reference), and
`squad_exact_match` / `squad_f1`: answers decoded greedily from [memory; query] and scored with the official SQuAD
v1.1 metric against all gold answers (answer_tasks.py). `python run_rmt_on_squad.py --help` lists every option.
"""
from typing import Optional, Sequence

from answer_task_runs import train_rmt
from answer_tasks import SquadDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_rmt(SquadDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
