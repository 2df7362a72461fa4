"""Convert a checkpoint of the reference implementation (GradMem or RMT2Segm) into a model folder of ours.

    python convert_reference_checkpoint.py runs/N32-K2V2-V62_1M/<run_name>/run_1/checkpoint-95500 converted/N32 \
        --tokenizer ./tokenizers/kv_alphabet_62

IN is a reference checkpoint folder (its config.json and model.safetensors, or the shards of a large one) or that
model.safetensors. The reference
names GradMem's control tokens `write_st`/`read_st` and keeps the backbone of a write-LoRA model under
`model.base_model.model.` (peft's wrapper); they are renamed to ours, and the LoRA adapters stay adapters, active in
WRITE only, as the reference computes them. The model options come from the reference's config.json (same names as
ours); a checkpoint whose tensors do not all fit the model that config describes is refused, naming the tensors.

OUT gets config.json and model.safetensors in our naming (and the tokenizer with --tokenizer: a tokenizer folder or
hub name, e.g. the run's --tokenizer_path or --pretrained_model; reference checkpoints carry none), so that
`from_pretrained(OUT)`, `evaluate_model.py --model OUT`, `predict.py --model OUT` and `--init_checkpoint OUT` work.
(from_pretrained and --init_checkpoint also read reference checkpoints directly.)
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from transformers import AutoModel, AutoTokenizer

import grad_memgpt  # noqa: F401  (registers GradMemGPT with AutoModel)
import rmt  # noqa: F401  (registers RMT2Segm with AutoModel)
from modeling_utils import safetensors_files
from training_args import add_log_level_argument, run_cli, setup_logging

logger = logging.getLogger("gradmem")
MODEL_TYPES = ("grad_memgpt", "rmt_2segm")


def reference_folder(path: str) -> Path:
    """The checkpoint folder: `path`, or the folder of a model.safetensors; it must hold config.json and the weights
    (model.safetensors, or the shards of model.safetensors.index.json)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "config.json").is_file() or not safetensors_files(folder):
        raise FileNotFoundError(f"{folder} lacks config.json or its weights: give a reference checkpoint folder "
                                "(config.json and model.safetensors or its shards, e.g. "
                                "runs/<data>/<run_name>/run_1/checkpoint-<step>)")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{folder}/config.json is a {model_type!r} model; this converts {' and '.join(MODEL_TYPES)} "
                         "checkpoints (a plain causal LM checkpoint loads with transformers as it is)")
    return folder


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="reference checkpoint folder (config.json, model.safetensors) or its "
                                           "model.safetensors")
    parser.add_argument("out", help="folder to write (must not exist or be empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub name to save with the model (the run's --tokenizer_path or "
                             "--pretrained_model)")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging(args.log_level)
    folder = reference_folder(args.checkpoint)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new folder")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer is not None else None
    model = AutoModel.from_pretrained(folder)  # renames reference tensors; refuses a checkpoint that does not fit
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("%s -> %s (%s, %d tensors%s)", folder, out, model.config.model_type, len(model.state_dict()),
                   "" if tokenizer is not None else "; no tokenizer: pass --tokenizer for evaluate_model.py")
    return out


if __name__ == "__main__":
    run_cli(main)
