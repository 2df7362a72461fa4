"""Train GradMem on a saved {context, query, target} dataset (KV retrieval; also bAbI with a pretrained GPT-2).

    python run_gradmemgpt_on_kv_retrieval.py --preset paper_kv --data_path ./data/N8-K2V2-V62_1M
    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_kv_retrieval.py ...   (see scripts/*.sh)

GradMem options default to the reference config's (grad_memgpt.GradMemOptions); `--preset paper_kv` selects the
paper's KV model (grad_memgpt.PRESETS; flags given as well win). A missing --data_path whose folder name is a KV dataset
name (e.g. N8-K2V2-V62_1M) is generated on the spot. `python run_gradmemgpt_on_kv_retrieval.py --help` lists every
option.
"""
import logging
from pathlib import Path
from typing import Optional, Sequence

from evaluation import SampleLogArgs, answer_sample_callbacks, make_generated_answer_metrics
from grad_memgpt import PRESETS, GradMemArgs, build_grad_memgpt
from kv_dataset_utils import build_named_dataset
from modeling_utils import max_positions
from training_args import BackboneArgs, DataArgs, TrainArgs, launched_world_size, parse_cli, run_cli
from training_backbone import load_tokenizer
from training_collators import MemoryModelCollator, make_compute_metrics, single_token_ids
from training_data import check_data, check_memory_inputs_fit, load_splits
from training_experiment import run_experiment
from training_runs import gradmem_run_name

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def main(args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, gradmem_args, data_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, GradMemArgs, DataArgs, SampleLogArgs, args=args, presets=PRESETS)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path, build_missing=build_named_dataset)
    check_data(tokenizer, splits)
    model = build_grad_memgpt(backbone_args, gradmem_args, tokenizer)
    check_memory_inputs_fit(tokenizer, splits, max_positions(model.model.config), model.mem_offset,
                            data_args.max_context_length)
    if train_args.run_name is None:
        train_args.run_name = gradmem_run_name(train_args, backbone_args, gradmem_args, launched_world_size())
    hint = (f"The inner loop probably diverged: lower --inner_lr (now {gradmem_args.inner_lr:g}) or bound the inner "
            f"step with --inner_clip_norm; a lower --learning_rate (now {train_args.learning_rate:g}) may also help.")
    collator = MemoryModelCollator(tokenizer, max_context_length=data_args.max_context_length)
    ignore_ids = single_token_ids(tokenizer, ("!", "|"))  # the KV target's structural tokens are not scored
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=collator,
        compute_metrics=make_compute_metrics(tokenizer),
        answer_metrics=make_generated_answer_metrics(collator, ignore_ids),
        extra_callbacks=answer_sample_callbacks(sample_args, collator, tokenizer, ignore_ids),
        data_name=Path(data_args.data_path.rstrip("/")).name,
        all_args=(backbone_args, gradmem_args, data_args, sample_args),
        nonfinite_hint=hint,
    )


if __name__ == "__main__":
    run_cli(main)
