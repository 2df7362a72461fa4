"""Train GradMem on SQuAD v1.1 (three layouts) or on phonebook lookup, with generation-based SQuAD EM/F1.

    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_squad.py --pretrained_model gpt2 \\
        --layout c_q --per_device_batch_size 32 --total_batch_size 64 ...          (presets: scripts/*.sh)

Data (`--dataset_name`): `squad` (the hub dataset, a local save_to_disk copy of it, or the official JSON files with
`--squad_json DIR`) laid out by `--layout` (c_q, cq_a, qc_a; see squad_utils.py), or any name containing
`phonebook`: a hub dataset such as `booydar/phonebook_N8` or a local folder written by `python phonebook_utils.py`.
Hub ids are loaded with `datasets.load_dataset` only when no local folder of that name exists; without hub access
the error names the fix. `--data_path` is accepted because the reference's presets pass it; the reference never
read it, and neither does this script (it logs so).

Defaults are those of GradMemArgs (the paper's KV preset) except `--add_inner_loss_to_outer`, off here: the
reference's SQuAD script had no such option, so none of its SQuAD or phonebook runs added the inner loss.

Metrics at every evaluation: teacher-forced token accuracy / exact match of the target tokens (as the reference),
plus `squad_exact_match` / `squad_f1`: answers decoded greedily from [memory; read prompt] and scored with the
official SQuAD v1.1 metric against all gold answers. With `--eos_after_target` (default) the target is followed
by the tokenizer's EOS token, so the model learns where an answer ends and decoding stops there.
"""
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from grad_memgpt import GradMemArgs, build_grad_memgpt
from phonebook_utils import load_phonebook
from squad_utils import LAYOUTS, AnswerGenerationArgs, load_squad, train_answer_task
from training_args import BackboneArgs, TrainArgs, parse_cli, run_cli
from training_backbone import load_tokenizer
from training_checkpoints import load_init_checkpoint

logger = logging.getLogger("gradmem")


@dataclass
class SquadGradMemArgs(GradMemArgs):
    add_inner_loss_to_outer: bool = field(default=False, metadata={
        "help": "add the inner loss to the outer loss (off: the reference's SQuAD script had no such option)"})


@dataclass
class SquadDataArgs:
    """Which question-answering data: SQuAD v1.1 (hub or official JSON files, three layouts) or phonebook."""

    dataset_name: str = field(default="squad", metadata={
        "help": "'squad' (hub or --squad_json) or a name containing 'phonebook' (hub id or local folder)"})
    squad_json: Optional[str] = field(default=None, metadata={
        "help": "folder with the official train-v1.1.json and dev-v1.1.json (instead of the hub)"})
    layout: str = field(default="c_q", metadata={"help": f"SQuAD layout: {', '.join(LAYOUTS)}"})
    data_path: Optional[str] = field(default=None, metadata={
        "help": "not read (accepted for the reference's presets, which pass it; the reference ignored it too): the "
                "data come from --dataset_name / --squad_json"})

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown --layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.data_path is not None:
            logger.warning("--data_path %s is not read (as in the reference): the data come from --dataset_name %s%s",
                           self.data_path, self.dataset_name,
                           "" if self.squad_json is None else f" / --squad_json {self.squad_json}")


@dataclass
class SquadTaskArgs:
    init_base_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "safetensors file loaded into the backbone LM only (unused tensors are listed; every trainable backbone "
                "tensor must be in it unless --init_checkpoint_partial); not with --init_checkpoint"})


def load_qa_data(data_args: SquadDataArgs) -> tuple:
    """(splits, data_name) for SQuAD or phonebook; every split has context/query/target/answers."""
    if "phonebook" in data_args.dataset_name:
        if data_args.squad_json is not None or data_args.layout != "c_q":
            raise ValueError("--squad_json and --layout apply to SQuAD only, not to phonebook datasets")
        splits = load_phonebook(data_args.dataset_name)
        splits = splits.map(lambda row: {"answers": [row["target"]]}, desc="answers")
        return splits, os.path.basename(os.path.normpath(data_args.dataset_name))
    if data_args.dataset_name != "squad" and not os.path.isdir(data_args.dataset_name):
        raise ValueError(f"unknown --dataset_name {data_args.dataset_name!r}: use 'squad' (the hub dataset, or "
                         "--squad_json for the official files), a local save_to_disk copy of it, or a phonebook "
                         "dataset (a name containing 'phonebook')")
    splits = load_squad(data_args.layout, squad_json=data_args.squad_json, dataset_name=data_args.dataset_name)
    return splits, "squad" if data_args.layout == "c_q" else f"squad_{data_args.layout}"


def main(args=None) -> dict:
    train_args, backbone_args, model_args, data_args, answer_args, task_args = parse_cli(
        TrainArgs, BackboneArgs, SquadGradMemArgs, SquadDataArgs, AnswerGenerationArgs, SquadTaskArgs, args=args)
    if task_args.init_base_checkpoint is not None and train_args.init_checkpoint is not None:
        raise ValueError("--init_base_checkpoint and --init_checkpoint are mutually exclusive (the reference used "
                         "the base checkpoint only without a full one)")
    tokenizer = load_tokenizer(backbone_args)
    splits, data_name = load_qa_data(data_args)
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)
    if task_args.init_base_checkpoint is not None:
        load_init_checkpoint(model.model, task_args.init_base_checkpoint, partial=train_args.init_checkpoint_partial)
    return train_answer_task(train_args, backbone_args, model_args, answer_args, model, tokenizer, splits, data_name,
                             all_args=(backbone_args, model_args, data_args, answer_args, task_args))


def main_with_layout(layout: str, args=None) -> dict:
    """main() with a fixed --layout: the reference's run_gradmemgpt_on_squad_{cq_a,qc_a}.py command lines."""
    args = list(sys.argv[1:] if args is None else args)
    if any(arg == "--layout" or arg.startswith("--layout=") for arg in args):
        raise ValueError(f"this script's layout is {layout}; for another one run run_gradmemgpt_on_squad.py --layout")
    return main(["--layout", layout, *args])


if __name__ == "__main__":
    run_cli(main)
