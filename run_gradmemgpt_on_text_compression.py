"""Text compression with GradMem: WRITE a span of up to L tokens of a book into M memory vectors, READ it back.

    python prepare_pg19_chunks.py ...                      (chunks; preset: scripts/prepare_pg19_chunks.sh)
    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_text_compression.py \\
        --dataset_path ./data/pg19_chunks_w8000 --pretrained_model EleutherAI/pythia-160m --per_device_batch_size 16

Data: a `prepare_pg19_chunks.py` DatasetDict. A span is the text of one chunk from a start sentence on, cut at
15 L characters, tokenised, and its first L = --max_context_length tokens kept. Training rows start at a random
sentence in [0, max(0, n - 1 - int(L / (1.2 * word_count / n)))] (n sentences; 1.2 tokens per word: late enough
starts would leave fewer than L tokens), drawn afresh every time the row is batched; evaluation rows start at the
chunk start, so evaluation is deterministic.

Task: context = query = the span; labels = the span's tokens (pads -100). WRITE reconstructs the span from
[memory; span] with the write-only parameters (write LoRA, write head) on top of the backbone; READ reproduces the
whole span, teacher-forced, from [memory; span] with the plain backbone and its LM head (the first token is
predicted from the last memory position). With the default --freeze_backbone only the memory init, the memory
projection, the write head and the write LoRA are trained.

Metrics (eval_ prefix): token_accuracy (over all span tokens), exact_match (whole span right), read_bits_per_token
(READ cross-entropy / ln 2; the mean over eval batches of each batch's token-weighted loss), span_tokens (mean
tokens per span) and compression_ratio (span tokens per memory vector = span_tokens / M), plus the inner-loop
statistics of the model (inner_loss, inner_grad_norm_*, mem_norm_*, ...).

Defaults are the reference script's: pythia-160m, M=8, K=2, inner lr 0.08, SGD, second order, memory projection,
write head, write LoRA (r 8, alpha 16), frozen backbone, L=256, 5000 eval samples. A from-scratch backbone
(--base_model with --tokenizer_path of a text tokenizer) is also possible; it must be trained
(--freeze_backbone false).
"""
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import datasets
import numpy as np
import torch

from grad_memgpt import PRESETS, GradMemArgs, GradMemGPT, build_grad_memgpt
from modeling_utils import max_positions
from training_args import BackboneArgs, TrainArgs, parse_cli, run_cli
from training_backbone import load_tokenizer
from training_collators import IGNORE_INDEX, make_compute_metrics, pad_right
from training_experiment import run_experiment
from training_runs import gradmem_text_run_name

logger = logging.getLogger("gradmem")

DEFAULT_PRETRAINED_MODEL = "EleutherAI/pythia-160m"
TOKENS_PER_WORD = 1.2  # the reference's estimate, used only to choose random start sentences
CHARS_PER_TOKEN_CAP = 15  # a span's text is cut at 15 L characters before tokenisation
EVAL_SPLIT_CANDIDATES = ("validation", "valid", "test")
CHUNK_COLUMNS = ("context", "word_count", "n_sentences", "sentence_boundaries")


# ----------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class TextCompressionTrainArgs(TrainArgs):
    max_eval_samples: Optional[int] = field(default=5000, metadata={"help": "evaluate on the first N eval chunks"})


@dataclass
class TextCompressionBackboneArgs(BackboneArgs):
    pretrained_model: Optional[str] = field(default=None, metadata={
        "help": f"HF name or local folder of a pretrained LM (default {DEFAULT_PRETRAINED_MODEL} unless --base_model)"})
    tokenizer_path: Optional[str] = field(default=None, metadata={
        "help": "tokenizer of a from-scratch backbone (--base_model): a text tokenizer folder"})

    def validate(self) -> None:
        if self.base_model is None and self.pretrained_model is None:
            self.pretrained_model = DEFAULT_PRETRAINED_MODEL
        if self.base_model is not None and self.tokenizer_path is None:
            raise ValueError(f"--base_model {self.base_model} needs --tokenizer_path (a text tokenizer folder)")
        if self.pretrained_model is not None and self.tokenizer_path is not None:
            raise ValueError("--tokenizer_path is for --base_model; a --pretrained_model brings its own tokenizer")
        super().validate()


def _other_default(name: str, default):
    """GradMemArgs' option `name`, with its help, and another default."""
    return field(default=default, metadata=GradMemArgs.__dataclass_fields__[name].metadata)


@dataclass
class TextCompressionModelArgs(GradMemArgs):
    """GradMem options with the reference text-compression script's defaults where they differ from the model's."""

    inner_lr: float = _other_default("inner_lr", 0.08)
    use_mem_proj: bool = _other_default("use_mem_proj", True)
    mem_proj_mode: Literal["none", "proj", "per_sample"] = _other_default("mem_proj_mode", "proj")
    use_write_head: bool = _other_default("use_write_head", True)
    use_write_lora: bool = _other_default("use_write_lora", True)
    freeze_backbone: bool = field(default=True, metadata={
        "help": "train only the memory init, memory projection, write head and write LoRA"})


@dataclass
class TextCompressionDataArgs:
    dataset_path: str = field(metadata={"help": "DatasetDict written by prepare_pg19_chunks.py"})
    train_split: str = field(default="train", metadata={"help": "split of --dataset_path to train on"})
    eval_split: Optional[str] = field(default=None, metadata={
        "help": f"default: the first of {', '.join(EVAL_SPLIT_CANDIDATES)} present"})
    max_context_length: int = field(default=256, metadata={"help": "L: tokens per span (WRITE and READ)"})
    debug_print_samples: int = field(default=5, metadata={"help": "decoded eval spans logged at each evaluation"})

    def validate(self) -> None:
        if self.max_context_length is None or self.max_context_length < 1:
            raise ValueError(f"--max_context_length must be an integer >= 1, got {self.max_context_length}")
        if self.debug_print_samples < 0:
            raise ValueError(f"--debug_print_samples must be >= 0, got {self.debug_print_samples}")
        if self.eval_split is not None and self.eval_split == self.train_split:
            raise ValueError(f"--eval_split {self.eval_split} is the training split; choose a held-out split")


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_chunk_splits(data_args: TextCompressionDataArgs) -> dict:
    """{"train", "valid"[, "test"]} chunk datasets; train rows get random starts, the others start at the chunk."""
    path = Path(data_args.dataset_path)
    if not path.exists():
        raise FileNotFoundError(f"--dataset_path {path} does not exist; build it with prepare_pg19_chunks.py "
                                f"(see scripts/prepare_pg19_chunks.sh)")
    saved = datasets.load_from_disk(str(path))
    if not isinstance(saved, datasets.DatasetDict):
        raise ValueError(f"--dataset_path {path} holds a single Dataset; expected prepare_pg19_chunks.py's DatasetDict")
    if data_args.train_split not in saved:
        raise ValueError(f"--dataset_path {path} has no split {data_args.train_split!r} (splits: {list(saved)}); "
                         f"set --train_split")
    eval_name = data_args.eval_split
    if eval_name is None:
        eval_name = next((s for s in EVAL_SPLIT_CANDIDATES if s in saved and s != data_args.train_split), None)
        if eval_name is None:
            raise ValueError(f"--dataset_path {path} has none of the eval splits {EVAL_SPLIT_CANDIDATES} "
                             f"(splits: {list(saved)}); set --eval_split")
    elif eval_name not in saved:
        raise ValueError(f"--dataset_path {path} has no split {eval_name!r} (splits: {list(saved)})")
    names = {"train": data_args.train_split, "valid": eval_name}
    if "test" in saved and "test" not in (data_args.train_split, eval_name):
        names["test"] = "test"
    splits = {}
    for role, name in names.items():
        split = saved[name]
        missing = [c for c in CHUNK_COLUMNS if c not in split.column_names]
        if missing:
            raise ValueError(f"split {name!r} of {path} lacks columns {missing}; build it with prepare_pg19_chunks.py")
        if len(split) == 0:
            raise ValueError(f"split {name!r} of {path} is empty")
        splits[role] = split.add_column("random_start", [role == "train"] * len(split))
    return splits


class TextCompressionCollator:
    """Chunk rows -> {context_input_ids [B, S], query_input_ids [B, S] (the same tensor), labels [B, S]}.

    S <= L is the longest span rounded up to a multiple of min(8, L); labels are the span ids, -100 on padding.
    Rows with `random_start` begin at a random sentence (torch's global RNG: seeded by the Trainer, and per
    dataloader worker), the others at the chunk start.
    """

    def __init__(self, tokenizer, max_context_length: int):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.max_context_length = max_context_length
        self.max_chars = CHARS_PER_TOKEN_CAP * max_context_length
        self.pad_to_multiple_of = min(8, max_context_length)

    def start_sentence(self, row) -> int:
        """A random start sentence that leaves about L tokens to the chunk end (0 if the chunk is short)."""
        n = row["n_sentences"]
        tokens_per_sentence = TOKENS_PER_WORD * row["word_count"] / n
        last = n - 1 - int(self.max_context_length / tokens_per_sentence) if tokens_per_sentence > 0 else 0
        return int(torch.randint(0, max(0, last) + 1, ()).item())

    def span_text(self, row) -> str:
        start = 0
        if row["random_start"]:
            start = row["sentence_boundaries"][self.start_sentence(row)][0]
        return row["context"][start : start + self.max_chars]

    def __call__(self, rows: list) -> dict:
        texts = [self.span_text(row) for row in rows]
        encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        span_ids = [ids[: self.max_context_length] for ids in encoded]  # right truncation: keep the first L
        context_ids = pad_right(span_ids, self.tokenizer.pad_token_id, self.pad_to_multiple_of)  # [B, S]
        labels = pad_right(span_ids, IGNORE_INDEX, self.pad_to_multiple_of)  # [B, S]
        return {"context_input_ids": context_ids, "query_input_ids": context_ids, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def make_text_compression_metrics(tokenizer, n_mem_tokens: int, n_print: int = 0):
    """token_accuracy / exact_match over whole spans (no ignored tokens), read_bits_per_token, span_tokens,
    compression_ratio, the model's stats; logs `n_print` decoded spans (target vs teacher-forced prediction)."""
    base_metrics = make_compute_metrics(tokenizer, ignore_tokens=())

    def compute_metrics(eval_pred) -> dict:
        metrics = base_metrics(eval_pred)
        labels = np.asarray(eval_pred.label_ids)  # [N, T]
        mask = labels != IGNORE_INDEX
        span_tokens = float(mask.sum(axis=1).mean())
        metrics["span_tokens"] = span_tokens
        metrics["compression_ratio"] = span_tokens / n_mem_tokens
        if "target_loss" in metrics:
            metrics["read_bits_per_token"] = metrics["target_loss"] / math.log(2)
        if n_print:
            predictions = eval_pred.predictions
            predictions = np.asarray(predictions[0] if isinstance(predictions, (tuple, list)) else predictions)
            for i in range(min(n_print, len(labels))):
                logger.warning("sample %d\n  t: %r\n  p: %r", i, tokenizer.decode(labels[i][mask[i]]),
                               tokenizer.decode(predictions[i][mask[i]]))
        return metrics

    return compute_metrics


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_model(backbone_args, model_args, tokenizer, max_context_length: int) -> GradMemGPT:
    if backbone_args.pretrained_model is None and model_args.freeze_backbone:
        raise ValueError(f"--base_model {backbone_args.base_model} builds a randomly initialised backbone, which "
                         "--freeze_backbone would keep random; pass --freeze_backbone false")
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)
    positions = max_positions(model.model.config)
    needed = model.mem_offset + max_context_length
    if positions is not None and needed > positions:
        raise ValueError(f"--max_context_length {max_context_length} + {model.mem_offset} memory/control positions "
                         f"= {needed} exceeds the backbone's {positions} positions; lower --max_context_length")
    return model


def main(args=None) -> dict:
    train_args, backbone_args, model_args, data_args = parse_cli(
        TextCompressionTrainArgs, TextCompressionBackboneArgs, TextCompressionModelArgs, TextCompressionDataArgs,
        args=args, presets=PRESETS)
    splits = load_chunk_splits(data_args)
    tokenizer = load_tokenizer(backbone_args)
    model = build_model(backbone_args, model_args, tokenizer, data_args.max_context_length)
    if train_args.run_name is None and train_args.exp_path is None:
        train_args.run_name = gradmem_text_run_name(train_args, backbone_args, model_args, data_args.max_context_length,
                                                    lora_and_frozen=True)
    return run_experiment(
        train_args, model, tokenizer, splits,
        TextCompressionCollator(tokenizer, data_args.max_context_length),
        make_text_compression_metrics(tokenizer, model_args.n_mem_tokens, data_args.debug_print_samples),
        data_name=os.path.basename(os.path.normpath(data_args.dataset_path)),
        all_args=(backbone_args, model_args, data_args),
        nonfinite_hint="The inner loop probably diverged: lower --inner_lr or set --inner_clip_norm.",
    )


if __name__ == "__main__":
    run_cli(main)
