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
import os
from dataclasses import dataclass, field
from typing import Optional

from babi_utils import load_babi_from_disk, load_babi_text
from grad_memgpt import GradMemArgs, build_grad_memgpt
from squad_utils import AnswerGenerationArgs, train_answer_task
from training_args import BackboneArgs, TrainArgs, parse_cli, run_cli
from training_backbone import load_tokenizer


@dataclass
class BabiDataArgs:
    data_path: Optional[str] = field(default=None, metadata={
        "help": "save_to_disk folder with train/valid/test, e.g. ./data/babilong_qa2_0k (scripts/download_babi.sh)"})
    babi_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of original bAbI text files (e.g. tasks_1-20_v1-2/en-valid-10k), with --babi_task"})
    babi_task: Optional[str] = field(default=None, metadata={"help": "qa1 ... qa20, with --babi_dir"})

    def validate(self) -> None:
        if (self.data_path is None) == (self.babi_dir is None):
            raise ValueError("give exactly one of --data_path (a save_to_disk folder) and --babi_dir (original "
                             "bAbI text files, with --babi_task)")
        if (self.babi_dir is None) != (self.babi_task is None):
            raise ValueError("--babi_dir and --babi_task go together")


def load_babi(data_args: BabiDataArgs) -> tuple:
    """(splits with context/query/target/answers, data name)."""
    if data_args.data_path is not None:
        splits = load_babi_from_disk(data_args.data_path)
        name = os.path.basename(os.path.normpath(data_args.data_path))
    else:
        splits = load_babi_text(data_args.babi_dir, data_args.babi_task)
        name = f"babi_{data_args.babi_task}_{os.path.basename(os.path.normpath(data_args.babi_dir))}"
    return splits.map(lambda row: {"answers": [row["target"]]}, desc="answers"), name


def main(args=None) -> dict:
    train_args, backbone_args, model_args, data_args, answer_args = parse_cli(
        TrainArgs, BackboneArgs, GradMemArgs, BabiDataArgs, AnswerGenerationArgs, args=args)
    tokenizer = load_tokenizer(backbone_args)
    splits, data_name = load_babi(data_args)
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)
    return train_answer_task(train_args, backbone_args, model_args, answer_args, model, tokenizer, splits, data_name,
                             all_args=(backbone_args, model_args, data_args, answer_args))


if __name__ == "__main__":
    run_cli(main)
