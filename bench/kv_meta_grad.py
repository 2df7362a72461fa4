"""How large the meta-gradient is against the WRITE steps K and the inner lr, at a KV checkpoint, on the CPU.

Training backpropagates the READ loss (plus the weighted inner loss) through the K WRITE updates, second order. When
that gradient grows by orders of magnitude with K, training with that K diverges (the matrix's GradMem K=5 at N8 from
scratch logged gradient norms of 1e9-1e13). For each (K, inner lr) this prints the training loss and the norm of its
gradient over all weights (before clipping) on one batch of fresh test samples, with the checkpoint's weights or, with
--init, freshly initialised weights of the same configuration: whether a K is unstable at these weights, or only
where training takes them.

    python bench/kv_meta_grad.py results/kv_checkpoints/N8 --K 1 2 3 4 5 --inner_lr 0.04 0.3
    python bench/kv_meta_grad.py results/kv_checkpoints/N8 --init --K 1 2 5
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate_kv_checkpoints import folder_pairs, fresh_batches  # noqa: E402
from grad_memgpt import GradMemGPT  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def meta_gradient(model: GradMemGPT, batch: dict, K: int, inner_lr: float) -> dict:
    """Training loss and the norm of its gradient over every weight, with K WRITE steps at inner_lr (train mode, the
    model's own grad_mode); the model's settings are restored."""
    saved = model.config.K, model.config.lr
    model.config.K, model.config.lr = K, inner_lr
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        return {"K": K, "inner_lr": inner_lr, "loss": out.loss.item(),
                "target_loss": out.stats["target_loss"].item(), "grad_norm": norm}
    finally:
        model.config.K, model.config.lr = saved
        model.zero_grad(set_to_none=True)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a KV checkpoint folder (named N<pairs> unless --N is given)")
    parser.add_argument("--N", type=int, default=None, help="pairs per context (default: from the folder name)")
    parser.add_argument("--init", action="store_true",
                        help="freshly initialised weights of the checkpoint's configuration (seed --seed)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed with --init")
    parser.add_argument("--samples", type=int, default=32, help="samples in the one batch")
    parser.add_argument("--data_seed", type=int, default=1, help="generator seed of the fresh samples (training: 0)")
    parser.add_argument("--K", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--inner_lr", type=float, nargs="+", default=[None],
                        help="inner lrs (default: the checkpoint's)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    n_pairs = args.N or folder_pairs(folder)
    if n_pairs is None:
        parser.error(f"{folder}: name the pairs per context with --N (the folder is not named N<pairs>)")
    if min(args.K) < 1 or any(lr is not None and lr <= 0 for lr in args.inner_lr) or args.samples < 1:
        parser.error("--K takes integers >= 1, --inner_lr numbers > 0, --samples >= 1")
    model = GradMemGPT.from_pretrained(str(folder))
    if args.init:
        torch.manual_seed(args.seed)
        model = GradMemGPT(model.config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = next(fresh_batches(tokenizer, n_pairs, args.samples, args.data_seed, args.samples))
    weights = f"initialised (seed {args.seed})" if args.init else "trained"
    print(f"{folder}, {weights} weights, one batch of {args.samples} fresh N{n_pairs} samples, "
          f"grad_mode {model.config.grad_mode}, inner loss weight "
          f"{model.config.inner_loss_weight if model.config.add_inner_loss_to_outer else 0:g}")
    print("| K | inner lr | loss | READ loss | gradient norm | CPU s |\n|---|---|---|---|---|---|")
    rows = []
    for inner_lr in args.inner_lr:
        for K in args.K:
            started = time.time()
            row = meta_gradient(model, batch, K, model.config.lr if inner_lr is None else inner_lr)
            print(f"| {K} | {row['inner_lr']:g} | {row['loss']:.3f} | {row['target_loss']:.3f} | "
                  f"{row['grad_norm']:.3g} | {time.time() - started:.1f} |", flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
