"""Re-evaluate shipped KV checkpoints on freshly generated test samples (CPU is enough) and print the table.

    python evaluate_kv_checkpoints.py                               # every results/kv_checkpoints/N<n>/
    python evaluate_kv_checkpoints.py --samples 2000 --data_seed 7 results/kv_checkpoints/N16

Each folder is loaded with `GradMemGPT.from_pretrained(folder)` and its tokenizer from the same folder, nothing else.
Samples are new: the KV generator's test stream with `--data_seed` (the training data used seed 0), so no sample was
seen in training or selection. The number is the exact match of generated answers (greedy decoding from
[memory; query] after WRITE; `!` and `|` not scored), with its binomial standard error.
"""
import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer

import kv_dataset_utils
from evaluation import generated_exact_match
from grad_memgpt import GradMemGPT
from training_collators import MemoryModelCollator, single_token_ids

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_ROOT = REPO_DIR / "results" / "kv_checkpoints"


def folder_pairs(folder: Path) -> Optional[int]:
    """The pairs per context of a checkpoint folder named N<pairs> (None where no number follows its first letter)."""
    return int(folder.name[1:]) if folder.name[1:].isdigit() else None


def checkpoint_folders(paths) -> list:
    """The checkpoint folders named (or, for a folder of N<n>/ folders, inside it), sorted by N."""
    folders = []
    for path in map(Path, paths):
        if (path / "config.json").is_file():
            if folder_pairs(path) is None:
                raise ValueError(f"{path}: the folder's name must give the pairs per context its samples need, "
                                 f"N<pairs> (N96 for 96 pairs): copy or rename it")
            folders.append(path)
        elif path.is_dir():
            folders += [p for p in path.glob("N*") if (p / "config.json").is_file() and folder_pairs(p)]
        else:
            raise FileNotFoundError(f"{path}: no checkpoint folder (config.json, model.safetensors, tokenizer) here")
    if not folders:
        raise FileNotFoundError(f"no checkpoint folders under {', '.join(map(str, paths))}")
    return sorted(folders, key=folder_pairs)


def load_for_evaluation(folder: Path) -> GradMemGPT:
    """The checkpoint in eval mode with sdpa attention: evaluation writes with first-order inner gradients (no double
    backward), so the exact double-backward attention it trained with is not needed; same function, ~2.5x faster on
    the CPU."""
    model = GradMemGPT.from_pretrained(str(folder)).eval()
    model.model.set_attn_implementation("sdpa")
    return model


def fresh_samples(n_pairs: int, samples: int, data_seed: int) -> list:
    """`samples` fresh N<n_pairs>-K2V2-V62 samples (dicts of context, query, target) from the test stream with
    `data_seed`."""
    spec = kv_dataset_utils.parse_dataset_name(f"N{n_pairs}-K2V2-V62")
    data = kv_dataset_utils.generate_kv_samples(spec, samples, data_seed, kv_dataset_utils.TEST_STREAM)
    return [dict(zip(data, values)) for values in zip(*data.values())]


def collated_batches(tokenizer, rows: list, batch_size: int):
    """The rows collated as the trainer collates them, batch_size at a time, in order."""
    collator = MemoryModelCollator(tokenizer)
    return (collator(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size))


def fresh_batches(tokenizer, n_pairs: int, samples: int, data_seed: int, batch_size: int):
    """Collated batches of fresh_samples."""
    return collated_batches(tokenizer, fresh_samples(n_pairs, samples, data_seed), batch_size)


def evaluate_folder(folder: Path, samples: int, data_seed: int, batch_size: int, K: Optional[int] = None,
                    inner_lr: Optional[float] = None) -> dict:
    """`K` / `inner_lr` replace the checkpoint's WRITE steps / inner lr at evaluation (its eval_K / eval_lr)."""
    model = load_for_evaluation(folder)
    trained_K, trained_lr = model.config.K, model.config.lr
    if K is not None:
        model.config.eval_K = K
    if inner_lr is not None:
        model.config.eval_lr = inner_lr
    K, inner_lr = model.write_steps()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    n_pairs = folder_pairs(folder)
    batches = fresh_batches(tokenizer, n_pairs, samples, data_seed, batch_size)
    started = time.time()
    metrics = generated_exact_match(model, batches, single_token_ids(tokenizer, ("!", "|")))
    em = metrics["generated_exact_match"]
    provenance = folder / "provenance.json"
    return {"N": n_pairs, "K": K, "inner_lr": inner_lr, "trained_K": trained_K,
            "trained_inner_lr": trained_lr, "exact_match": em,
            "stderr": math.sqrt(em * (1 - em) / max(metrics["generated_samples"], 1)),
            "samples": metrics["generated_samples"], "seconds": time.time() - started,
            "provenance": json.loads(provenance.read_text()) if provenance.is_file() else {}}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=[str(DEFAULT_ROOT)], help="checkpoint folders, or their parent")
    parser.add_argument("--samples", type=int, default=150,
                        help="fresh test samples per checkpoint (150: the five shipped checkpoints N8-N96 in a few "
                             "minutes on 2 CPU cores; the 2000-sample test numbers are in their provenance.json)")
    parser.add_argument("--data_seed", type=int, default=1, help="generator seed of the fresh samples (training: 0)")
    parser.add_argument("--batch_size", type=int, default=25,
                        help="samples per WRITE batch (on 2 CPU cores 25 was 3x faster than 250 at N96: 40 s against "
                             "153 s, the larger batches spending their time in the kernel allocating memory)")
    parser.add_argument("--K", type=int, nargs="+", default=[None],
                        help="WRITE steps at test time, one evaluation each (default: the checkpoint's own K)")
    parser.add_argument("--inner_lr", type=float, nargs="+", default=[None],
                        help="inner lr at test time, one evaluation each (default: the checkpoint's own)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.data_seed < 1:
        parser.error("need --samples >= 1 and --data_seed >= 1 (seed 0 made the training, valid and test data)")
    if any(k is not None and k < 1 for k in args.K) or any(lr is not None and lr <= 0 for lr in args.inner_lr):
        parser.error("--K takes integers >= 1 and --inner_lr numbers > 0")
    folders = checkpoint_folders(args.paths)  # a wrong path fails here, before the table starts
    torch.manual_seed(0)
    rows = []
    print("| checkpoint | N | trained K / inner lr | test K / inner lr | generated exact match (fresh test) | samples | "
          "at training: valid / test | CPU s |\n|---|---|---|---|---|---|---|---|", flush=True)
    for folder in folders:
        for K, inner_lr in itertools.product(args.K, args.inner_lr):
            row = evaluate_folder(folder, args.samples, args.data_seed, args.batch_size, K, inner_lr)
            p = row["provenance"]
            trained = (f"{p['valid_exact_match']:.4f} / {p['test_generated_exact_match']:.4f}" if p else "-")
            print(f"| {folder} | {row['N']} | {row['trained_K']} / {row['trained_inner_lr']:g} | {row['K']} / "
                  f"{row['inner_lr']:g} | {row['exact_match']:.4f} ± {row['stderr']:.4f} | {row['samples']} | "
                  f"{trained} | {row['seconds']:.0f} |", flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
