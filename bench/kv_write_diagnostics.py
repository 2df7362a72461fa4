"""Where the WRITE's reconstruction loss goes on KV contexts, per role of the context token.

A KV context is `!k1k2:v1v2!` per pair, then `|`, one token per character. READ needs each value given its key; the
WRITE's loss also asks for the keys and the separators. For each checkpoint, on fresh test samples (as
evaluate_kv_checkpoints.py draws them), this prints the mean per-token loss of key characters, value characters and
separators with the initial memory (no WRITE) and with the memory after the checkpoint's own K steps (or --K /
--inner_lr), on the CPU. `--by_position B` also prints the exact match of the generated answers by where the queried
pair sits in the context (B equal groups of pair positions): whether the pairs a WRITE loses are the early, the late
or any.

    python bench/kv_write_diagnostics.py results/kv_checkpoints/N96 --samples 50
    python bench/kv_write_diagnostics.py results/kv_checkpoints/N64 results/kv_checkpoints/N96 --K 5 8
    python bench/kv_write_diagnostics.py results/kv_checkpoints/N96 --samples 400 --by_position 4
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate_kv_checkpoints import (collated_batches, folder_pairs, fresh_batches, fresh_samples,  # noqa: E402
                                     load_for_evaluation)
from evaluation import generated_exact_match  # noqa: E402
from training_collators import single_token_ids  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

PAIR_ROLES = ("separator", "key", "key", "separator", "value", "value", "separator")  # ! k k : v v !
ROLES = ("key", "value", "separator")


def context_roles(length: int) -> torch.Tensor:
    """Role index (into ROLES) of each of a context's `length` tokens: 7 per pair, then the closing `|`."""
    roles = [ROLES.index(PAIR_ROLES[p % 7]) for p in range(length - 1)] + [ROLES.index("separator")]
    return torch.tensor(roles)


def role_losses(model, context_input_ids: torch.Tensor, pad_id: int) -> dict:
    """{'before': {role: mean loss}, 'after': {...}} for one batch: the initial memory, then the model's WRITE."""
    roles = context_roles(context_input_ids.shape[1]).expand_as(context_input_ids)
    real = context_input_ids != pad_id
    out = {}
    K = model.config.eval_K
    with torch.no_grad():
        embeds = model.get_input_embeddings()(context_input_ids)
    for name, steps in (("before", 0), ("after", K)):
        model.config.eval_K = steps
        with torch.no_grad():  # the WRITE takes its inner gradients itself
            memory, _ = model.write(context_input_ids)
            ce = model.reconstruction_token_losses(memory, embeds, context_input_ids)
        out[name] = {role: (ce[(roles == i) & real].sum().item(), int(((roles == i) & real).sum()))
                     for i, role in enumerate(ROLES)}
    model.config.eval_K = K
    return out


def load(folder: Path, K=None, inner_lr=None):
    """(model writing with K steps at inner_lr, default the checkpoint's own; its tokenizer)."""
    model = load_for_evaluation(folder)
    model.config.eval_K = model.write_steps()[0] if K is None else K
    if inner_lr is not None:
        model.config.eval_lr = inner_lr
    return model, AutoTokenizer.from_pretrained(str(folder))


def queried_position(sample: dict) -> int:
    """The 0-based position in its context of the pair a sample's query asks for (a context is 7 characters per
    pair, a query `?!kk:`)."""
    return sample["context"].index(sample["query"][1:]) // 7


def exact_match_by_position(folder: Path, n_pairs: int, samples: int, data_seed: int, batch_size: int, groups: int,
                            K=None, inner_lr=None) -> list:
    """[(first pair, last pair (1-based), answers right, samples)] for `groups` equal groups of queried positions."""
    model, tokenizer = load(folder, K, inner_lr)
    rows, rights = fresh_samples(n_pairs, samples, data_seed), []
    generated_exact_match(model, collated_batches(tokenizer, rows, batch_size), single_token_ids(tokenizer, ("!", "|")),
                          on_batch=lambda _batch, _generated, right: rights.extend(right.tolist()))
    # position p (0-based) is in group p * groups // n_pairs: group g holds positions ceil(g n / groups) and on
    table = [[-(-g * n_pairs // groups) + 1, -(-(g + 1) * n_pairs // groups), 0, 0] for g in range(groups)]
    for position, right in zip(map(queried_position, rows), rights, strict=True):
        row = table[position * groups // n_pairs]
        row[2] += int(right)
        row[3] += 1
    return [tuple(row) for row in table]


def diagnose(folder: Path, n_pairs: int, samples: int, data_seed: int, batch_size: int, K=None, inner_lr=None) -> dict:
    model, tokenizer = load(folder, K, inner_lr)
    totals = {when: {role: [0.0, 0] for role in ROLES} for when in ("before", "after")}
    for batch in fresh_batches(tokenizer, n_pairs, samples, data_seed, batch_size):
        if ((batch["context_input_ids"] != tokenizer.pad_token_id).sum(dim=1) != 7 * n_pairs + 1).any():
            raise SystemExit(f"{folder}: its tokenizer is not one token per character; the roles assume it is")
        for when, by_role in role_losses(model, batch["context_input_ids"], tokenizer.pad_token_id).items():
            for role, (loss_sum, count) in by_role.items():
                totals[when][role][0] += loss_sum
                totals[when][role][1] += count
    K, lr = model.write_steps()
    return {"K": K, "inner_lr": lr,
            **{when: {role: s / max(n, 1) for role, (s, n) in by_role.items()} for when, by_role in totals.items()}}


def sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a WRITE analysis on fresh KV samples: checkpoints, pairs per context, samples, inner lr."""
    parser.add_argument("folders", nargs="+", help="KV checkpoint folders (named N<pairs> unless --N is given)")
    parser.add_argument("--N", type=int, default=None, help="pairs per context (default: from the folder name)")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--data_seed", type=int, default=1, help="generator seed of the fresh samples (training: 0)")
    parser.add_argument("--batch_size", type=int, default=25)
    parser.add_argument("--inner_lr", type=float, default=None, help="inner lr (default: the checkpoint's)")


def checkpoint_pairs(parser: argparse.ArgumentParser, args) -> list:
    """[(folder, pairs per context)] of the folders named; refused where the pairs are not known."""
    folders = []
    for folder in map(Path, args.folders):
        n_pairs = args.N or folder_pairs(folder)
        if n_pairs is None:
            parser.error(f"{folder}: name the pairs per context with --N (the folder is not named N<pairs>)")
        folders.append((folder, n_pairs))
    return folders


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample_arguments(parser)
    parser.add_argument("--K", type=int, nargs="+", default=[None], help="WRITE steps (default: the checkpoint's)")
    parser.add_argument("--by_position", type=int, default=None, metavar="GROUPS",
                        help="also the generated exact match by the queried pair's position, in GROUPS equal groups")
    args = parser.parse_args(argv)
    if any(K is not None and K < 1 for K in args.K):
        parser.error(f"--K must be >= 1 (the loss without a WRITE is printed anyway), got {args.K}")
    folders = checkpoint_pairs(parser, args)
    for folder, n_pairs in folders:
        if args.by_position is not None and not 1 <= args.by_position <= n_pairs:
            parser.error(f"--by_position must be between 1 and the {n_pairs} pairs of {folder}, got {args.by_position}")
    print("| checkpoint | K / inner lr | " + " | ".join(f"{r} loss: no WRITE -> after" for r in ROLES) + " |")
    print("|---|---|" + "---|" * len(ROLES))
    rows = []
    for folder, n_pairs in folders:
        for K in args.K:
            r = diagnose(folder, n_pairs, args.samples, args.data_seed, args.batch_size, K, args.inner_lr)
            cells = " | ".join(f"{r['before'][role]:.3f} -> {r['after'][role]:.3f}" for role in ROLES)
            print(f"| {folder} | {r['K']} / {r['inner_lr']:g} | {cells} |", flush=True)
            rows.append({**r, "folder": folder, "N": n_pairs})
    if args.by_position is not None:
        print("\n| checkpoint | K / inner lr | generated exact match (right / samples) by queried pair position |")
        print("|---|---|---|")
        for r in rows:
            r["by_position"] = exact_match_by_position(r["folder"], r["N"], args.samples, args.data_seed,
                                                       args.batch_size, args.by_position, r["K"], r["inner_lr"])
            cells = ", ".join(f"pairs {first}-{last}: {right / max(n, 1):.3f} ({right}/{n})"
                              for first, last, right, n in r["by_position"])
            print(f"| {r['folder']} | {r['K']} / {r['inner_lr']:g} | {cells} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
