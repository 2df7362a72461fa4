"""Full-context baseline: a plain causal LM reads `context + query + target`; loss and metrics on the target tokens.

    python run_gpt2_on_kv_retrieval.py --data_path ./data/N16-K2V2-V62_1M --base_model llama --max_position_embeddings 1024
    accelerate launch --config_file accelerate.yaml run_gpt2_on_kv_retrieval.py ...   (see scripts/run_gpt_on_kv_retrieval.sh)

No memory: the model attends to the whole context (the "upper bound" with Llama; Mamba is the recurrent baseline).
After training, the selected (and the final) checkpoint is evaluated on valid and test as the memory models are: the
teacher-forced metrics and the exact match of answers generated greedily after `context + query`
(`test_generated_exact_match`, evaluation.py).
Backbones from scratch (`--base_model llama|gpt2|pythia|mamba`, local configs, see
training_backbone.build_backbone_config) or pretrained (`--pretrained_model NAME`). `--max_input_length N` keeps the LAST N tokens of each sequence, i.e. drops
the START of the context (query and target are never cut), as the reference did. `--init_checkpoint` warm-starts
from a .safetensors file or checkpoint folder; re-running the same command resumes (see training_run_folder.py).

The reference's run-folder switches work too: `--do_eval_only` evaluates without training (the run folder's best
checkpoint; in a folder without checkpoints, `--init_checkpoint`) on valid (and test if present) and writes
`eval_only_results.json` into the run folder; `--overwrite_output_dir` meant "continue in the existing folder from
its last checkpoint" there, which every run does here (`--overwrite` starts over).
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from evaluation import make_generated_answer_metrics
from full_context_lm import (FullContextArgs, build_full_context_lm, check_full_context_fits,
                             check_full_context_options)
from kv_dataset_utils import build_named_dataset
from training_args import BackboneArgs, DataArgs, TrainArgs, launched_world_size, parse_cli, run_cli
from training_backbone import load_tokenizer
from training_checkpoints import checkpoint_problem, load_init_checkpoint, newest_usable_checkpoint
from training_collators import (CausalLMCollator, make_compute_metrics, reduce_logits_to_predictions,
                                single_token_ids)
from training_data import check_data, load_splits
from training_experiment import evaluate_splits, run_experiment
from training_run_folder import resolve_run_dir
from training_runs import full_context_run_name, read_json_file

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
logger = logging.getLogger("gradmem")
EVAL_ONLY_RESULTS = "eval_only_results.json"


@dataclass
class RunFolderArgs:
    """The reference script's run-folder switches. Not kept in the run record: they do not change what is trained
    (so adding or dropping one does not stop a run from resuming)."""

    do_eval_only: bool = field(default=False, metadata={
        "help": f"evaluate without training: the run folder's best checkpoint (a folder without checkpoints: "
                f"--init_checkpoint); metrics go to <run folder>/{EVAL_ONLY_RESULTS}"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "the reference's switch to continue an existing run folder from its last checkpoint, which every run "
                "does here (accepted for its command lines); --overwrite starts over"})


def check_options(backbone_args: BackboneArgs, args: FullContextArgs, data_args: DataArgs, train_args: TrainArgs,
                  folder_args: RunFolderArgs) -> None:
    if train_args.overwrite and (folder_args.do_eval_only or folder_args.overwrite_output_dir):
        other = "--do_eval_only" if folder_args.do_eval_only else "--overwrite_output_dir (continue the run folder)"
        raise ValueError(f"--overwrite (delete the run folder and start over) contradicts {other}: drop one")
    if folder_args.overwrite_output_dir and not folder_args.do_eval_only:
        logger.warning("--overwrite_output_dir: an existing run folder is continued from its last checkpoint, as in "
                       "the reference (every run does that here; --overwrite starts over)")
    if data_args.max_context_length is not None:
        raise ValueError("--max_context_length is for the memory models; the full-context baseline truncates the "
                         "whole sequence from the start with --max_input_length")
    check_full_context_options(backbone_args, args)


def checkpoint_to_evaluate(run_dir: Path, init_checkpoint: Optional[str]) -> Path:
    """--do_eval_only's weights: the run folder's selected checkpoint (all_results.json of a finished run, else the
    best so far in the newest checkpoint's trainer state, else the newest checkpoint), as the reference did; a run
    folder without checkpoints: --init_checkpoint. Recorded paths are looked up by name inside run_dir, so a moved
    run folder still works."""
    newest = newest_usable_checkpoint(run_dir) if run_dir.is_dir() else None
    if newest is None:
        if init_checkpoint is None:
            raise ValueError(f"--do_eval_only: {run_dir} holds no usable checkpoint to evaluate; train first (the "
                             "same command without --do_eval_only), or pass --init_checkpoint")
        return Path(init_checkpoint)
    if init_checkpoint is not None:
        logger.warning("--do_eval_only: evaluating the run's checkpoint, not --init_checkpoint %s (it is what the run "
                       "started from)", init_checkpoint)
    results = run_dir / "all_results.json"
    best = read_json_file(results if results.is_file() else newest / "trainer_state.json").get("best_model_checkpoint")
    if best is None:
        return newest
    best = run_dir / Path(best).name
    problem = checkpoint_problem(best) if best.is_dir() else f"{best} is missing"
    if problem:
        raise ValueError(f"--do_eval_only: the best checkpoint cannot be evaluated: {problem}. Evaluate the newest "
                         f"one with --exp_path <new folder> --init_checkpoint {newest}")
    return best


def generated_answer_metrics(tokenizer, collator: CausalLMCollator):
    """(model, split) -> exact match of greedily generated answers; the KV target's `!` and `|` are not scored."""
    return make_generated_answer_metrics(collator, single_token_ids(tokenizer, ("!", "|")))


def evaluate_only(train_args: TrainArgs, model, tokenizer, splits, collator: CausalLMCollator, data_name: str) -> dict:
    """--do_eval_only: load the weights (see checkpoint_to_evaluate), evaluate on valid (and test), write
    <run folder>/eval_only_results.json. Nothing is trained and no other file is touched."""
    from transformers import Trainer, TrainingArguments

    run_dir = resolve_run_dir(train_args, data_name)
    checkpoint = checkpoint_to_evaluate(run_dir, train_args.init_checkpoint)
    load_init_checkpoint(model, str(checkpoint))
    eval_split = splits["valid"]
    if train_args.max_eval_samples is not None:
        eval_split = eval_split.select(range(min(train_args.max_eval_samples, len(eval_split))))
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_eval_batch_size=train_args.per_device_eval_batch_size
        or train_args.per_device_batch_size, bf16=train_args.mixed_precision() == "bf16", use_cpu=train_args.use_cpu,
        report_to="none", remove_unused_columns=False, label_names=["labels"], seed=train_args.seed,
        dataloader_num_workers=train_args.dataloader_num_workers, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, data_collator=collator, processing_class=tokenizer,
                      compute_metrics=make_compute_metrics(tokenizer),
                      preprocess_logits_for_metrics=lambda logits, labels: reduce_logits_to_predictions(
                          logits, labels, next_token_logits=True))
    test_split = splits["test"] if "test" in splits and len(splits["test"]) > 0 else None
    metrics = {**evaluate_splits(trainer, eval_split, test_split, generated_answer_metrics(tokenizer, collator)),
               "evaluated_checkpoint": str(checkpoint)}
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / EVAL_ONLY_RESULTS).write_text(json.dumps(metrics, indent=2))
        logger.warning("evaluated %s without training: %s (written to %s)", checkpoint, json.dumps(metrics),
                       run_dir / EVAL_ONLY_RESULTS)
    return metrics


def main(args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, lm_args, data_args, folder_args = parse_cli(
        TrainArgs, BackboneArgs, FullContextArgs, DataArgs, RunFolderArgs, args=args)
    check_options(backbone_args, lm_args, data_args, train_args, folder_args)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path, build_missing=build_named_dataset)
    check_data(tokenizer, splits)
    model = build_full_context_lm(backbone_args, lm_args, tokenizer)
    collator = CausalLMCollator(tokenizer, max_input_length=lm_args.max_input_length)
    check_full_context_fits(model, collator, splits)
    if train_args.run_name is None:
        train_args.run_name = full_context_run_name(train_args, backbone_args, lm_args, launched_world_size())
    data_name = Path(data_args.data_path.rstrip("/")).name
    if folder_args.do_eval_only:
        return evaluate_only(train_args, model, tokenizer, splits, collator, data_name)
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=collator,
        compute_metrics=make_compute_metrics(tokenizer),
        answer_metrics=generated_answer_metrics(tokenizer, collator),
        data_name=data_name,
        all_args=(backbone_args, lm_args, data_args),
        next_token_logits=True,
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
    )


if __name__ == "__main__":
    run_cli(main)
