"""Evaluate a trained model on a dataset split, without training: metrics json and the generated answers.

    python evaluate_model.py --model runs/N8-K2V2-V62_1M/<run_name>/run_142 --data_path data/N8-K2V2-V62_1M --split test \
        --out eval/N8_test

--model is a run folder (its selected model at the root; runs of older code: the best checkpoint named in its
all_results.json) or any checkpoint folder. Writes <out>/metrics.json with the teacher-forced metrics of training
(`<split>_loss`, `<split>_token_accuracy`, `<split>_exact_match`, the model's stats) and, for memory models (GradMem,
RMT), the exact match of generated answers (`<split>_generated_exact_match`, evaluation.py), and <out>/answers.jsonl
with one line per sample: query, target, the generated answer and whether it is right.
"""
import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import grad_memgpt  # noqa: F401  (registers GradMemGPT with AutoModel)
import rmt  # noqa: F401  (registers RMT2Segm with AutoModel)
from evaluation import generated_exact_match, keep_answer_texts
from kv_dataset_utils import build_named_dataset
from mamba_scan import use_parallel_scan
from training_args import add_log_level_argument, run_cli, setup_logging
from training_collators import (CausalLMCollator, MemoryModelCollator, make_compute_metrics,
                                reduce_logits_to_predictions, single_token_ids)
from training_data import load_splits

logger = logging.getLogger("gradmem")
MEMORY_MODEL_TYPES = ("grad_memgpt", "rmt_2segm")
KV_IGNORE_TOKENS = ("!", "|")  # the KV target's structural tokens: not scored, as in training


def model_folder(path: str) -> Path:
    """The folder that holds the model: `path` itself when it has a model config, else (a run folder of older code)
    the best checkpoint named in its all_results.json."""
    folder = Path(path)
    config = folder / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text()):
        return folder
    results = folder / "all_results.json"
    if results.is_file() and json.loads(results.read_text()).get("best_model_checkpoint"):
        return Path(json.loads(results.read_text())["best_model_checkpoint"])
    raise FileNotFoundError(f"{path} holds no model (config.json with a model_type) and no all_results.json naming "
                            "a best checkpoint; give a run folder or a checkpoint folder")


def load_trained_model(path: str, device: Optional[str] = None) -> tuple:
    """(model in eval mode on `device`, right-padding tokenizer) of a run or checkpoint folder."""
    folder = model_folder(path)
    if not any(folder.glob("tokenizer*")):
        raise FileNotFoundError(f"{folder} holds no tokenizer (checkpoints of the reference implementation carry none): "
                                f"python convert_reference_checkpoint.py {folder} <new folder> --tokenizer <the run's "
                                "tokenizer> writes a folder with one")
    model_type = AutoConfig.from_pretrained(folder).model_type
    model_class = AutoModel if model_type in MEMORY_MODEL_TYPES else AutoModelForCausalLM
    model = model_class.from_pretrained(folder)
    use_parallel_scan(model)  # Mamba's scan as in training (a no-op for other models)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def is_memory_model(model) -> bool:
    return getattr(model.config, "model_type", None) in MEMORY_MODEL_TYPES


def teacher_forced_metrics(model, tokenizer, split, collator, batch_size: int, prefix: str) -> dict:
    """The training's evaluation (loss, token accuracy, exact match, model stats) through a Trainer that trains nothing."""
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none",
                                 remove_unused_columns=False, label_names=["labels"], disable_tqdm=True,
                                 use_cpu=next(model.parameters()).device.type == "cpu", dataloader_num_workers=0)
        next_token = not is_memory_model(model)
        trainer = Trainer(model=model, args=args, data_collator=collator, compute_metrics=make_compute_metrics(tokenizer),
                          preprocess_logits_for_metrics=lambda logits, labels: reduce_logits_to_predictions(
                              logits, labels, next_token_logits=next_token))
        trainer.remove_callback(PrinterCallback)  # main() logs the result once
        return trainer.evaluate(split, metric_key_prefix=prefix)


def generated_answers(model, tokenizer, split, collator, batch_size: int, prefix: str) -> tuple:
    """({prefix_generated_exact_match, ...}, one answer record per sample): WRITE each context, decode greedily."""
    decoded = []
    collated = (collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
                for start in range(0, len(split), batch_size))
    metrics = generated_exact_match(model, collated, single_token_ids(tokenizer, KV_IGNORE_TOKENS),
                                    keep_answer_texts(tokenizer, decoded))
    answers = [{"query": row["query"], "target": row["target"], "answer": answer, "correct": correct}
               for row, (answer, correct) in zip(split, decoded)]
    return {f"{prefix}_{k}": v for k, v in metrics.items()}, answers


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--data_path", required=True, help="dataset folder (save_to_disk; columns context, query, "
                                                            "target); a missing KV dataset name is generated")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", required=True, help="folder for metrics.json and answers.jsonl")
    parser.add_argument("--batch_size", type=int, default=64, help="evaluation batch size (default: 64)")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--max_context_length", type=int, default=None,
                        help="memory models: keep the first N context tokens (give the run's value if it had one)")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logging(args.log_level)
    model, tokenizer = load_trained_model(args.model)
    split = load_splits(args.data_path, required=(args.split,), build_missing=build_named_dataset)[args.split]
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    memory_model = is_memory_model(model)
    collator = (MemoryModelCollator(tokenizer, max_context_length=args.max_context_length) if memory_model
                else CausalLMCollator(tokenizer))
    metrics = teacher_forced_metrics(model, tokenizer, split, collator, args.batch_size, args.split)
    answers = []
    if memory_model:
        generated, answers = generated_answers(model, tokenizer, split, collator, args.batch_size, args.split)
        metrics.update(generated)
    metrics.update(model=str(model_folder(args.model)), data_path=args.data_path, split=args.split, samples=len(split))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "answers.jsonl", "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    logger.info("%s %s: %s -> %s", args.data_path, args.split,
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.endswith("exact_match")), out)
    return metrics


if __name__ == "__main__":
    run_cli(main)
