"""Train GradMem on SQuAD v1.1 (three layouts), with generation-based SQuAD EM/F1.

    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_squad.py --pretrained_model gpt2 \\
        --layout c_q --per_device_batch_size 32 --total_batch_size 64 ...   (preset: scripts/run_gradmemgpt_on_squad.sh)

Data (`--dataset_name`): `squad` (the hub dataset, a local save_to_disk copy of it, or the official JSON files with
`--squad_json DIR`) laid out by `--layout` (c_q, cq_a, qc_a; see squad_utils.py). A phonebook dataset (a hub id
booydar/phonebook_N*, or a local folder of phonebook rows) is trained too, as the reference's phonebook command
lines do through this script; run_gradmemgpt_on_phonebook.py is its own entry. Hub ids are loaded with
`datasets.load_dataset` only when no local folder of that name exists; without hub access the error names the fix.
`--data_path` is accepted because the reference's presets pass it; the reference never read it, and neither does
this script (it logs so).

GradMem options default to the reference config's (grad_memgpt.GradMemOptions), so the inner loss is not added, as in
the reference's SQuAD script, which had no such option. The presets (scripts/run_gradmemgpt_on_squad.sh, ..._phonebook.sh)
give the model options explicitly.

Metrics at every evaluation: teacher-forced token accuracy / exact match of the target tokens (as the reference),
plus `squad_exact_match` / `squad_f1`: answers decoded greedily from [memory; read prompt] and scored with the
official SQuAD v1.1 metric against all gold answers (answer_tasks.py). With `--eos_after_target` (default) the
target is followed by the tokenizer's EOS token, so the model learns where an answer ends and decoding stops there.
"""
from typing import Optional, Sequence

from answer_task_runs import train_gradmem
from answer_tasks import SquadDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_gradmem(SquadDataArgs, args)


if __name__ == "__main__":
    run_cli(main)
