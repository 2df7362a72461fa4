"""Train the RMT2Segm baseline (rmt.py) on a saved {context, query, target} dataset (KV retrieval, bAbI, phonebook).

    python run_rmt_on_kv_retrieval.py --data_path ./data/N16-K2V2-V62_1M --mem_proj_mode proj --use_mem_proj
    accelerate launch --config_file accelerate.yaml run_rmt_on_kv_retrieval.py ...   (see scripts/run_rmt_on_kv_retrieval.sh)

From scratch (`--base_model llama|gpt2|pythia`, default llama) or from a pretrained LM (`--pretrained_model NAME`,
which the reference script rejected). A missing --data_path whose folder name is a KV dataset name (e.g.
N16-K2V2-V62_1M) is generated on the spot. `python run_rmt_on_kv_retrieval.py --help` lists every option.
"""
import logging
from pathlib import Path
from typing import Optional, Sequence

from evaluation import SampleLogArgs, answer_sample_callbacks, make_generated_answer_metrics
from kv_dataset_utils import build_named_dataset
from rmt import RMTArgs, build_rmt, check_backbone
from training_args import BackboneArgs, DataArgs, TrainArgs, launched_world_size, parse_cli, run_cli
from training_backbone import load_tokenizer
from training_collators import MemoryModelCollator, make_compute_metrics, single_token_ids
from training_data import check_data, load_splits
from training_experiment import run_experiment
from training_runs import rmt_run_name

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def main(args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, rmt_args, data_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, RMTArgs, DataArgs, SampleLogArgs, args=args)
    check_backbone(backbone_args)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path, build_missing=build_named_dataset)
    check_data(tokenizer, splits)
    model = build_rmt(backbone_args, rmt_args, tokenizer)
    if train_args.run_name is None:
        train_args.run_name = rmt_run_name(train_args, backbone_args, rmt_args, launched_world_size())
    collator = MemoryModelCollator(tokenizer, max_context_length=data_args.max_context_length)
    ignore_ids = single_token_ids(tokenizer, ("!", "|"))  # the KV target's structural tokens are not scored
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=collator,
        compute_metrics=make_compute_metrics(tokenizer),
        answer_metrics=make_generated_answer_metrics(collator, ignore_ids),
        extra_callbacks=answer_sample_callbacks(sample_args, collator, tokenizer, ignore_ids),
        data_name=Path(data_args.data_path.rstrip("/")).name,
        all_args=(backbone_args, rmt_args, data_args, sample_args),
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
    )


if __name__ == "__main__":
    run_cli(main)
