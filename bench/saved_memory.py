"""Where the memory of a second-order GradMem step goes: bytes the autograd graph keeps for the outer backward.

Counts every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage once) while the paper
KV model (bench_step.paper_kv_model: Llama 4x4x128, 8 memory tokens, K=2 second order) runs one training forward:
the K inner steps with their create_graph backward, READ and the losses. All of it is alive when the outer backward
starts, so it is the floor of the step's peak memory. Each saved tensor is grouped by its last dimension, which names
the layer piece that keeps it (width 128: hidden states and projections; 512: the SwiGLU intermediate; 32: per-head
q/k/v; 70: logits; a context length: attention scores).

Per context length C the script prints saved bytes per sample and fits bytes = a C + b C^2 + c over the lengths, then
extrapolates to --target_context x --target_batch: the linear term a is the non-attention part (norms, RoPE, SwiGLU,
projections); the quadratic term b is attention storing L x L tensors (exact_eager does; the fused kernel does not).

    python bench/saved_memory.py                                  # CPU, exact_eager attention, C 128 256 512
    python bench/saved_memory.py --contexts 512 1024 --attn fused_double_bwd --device cuda
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import paper_kv_model, random_batch  # noqa: E402


def saved_bytes(model, batch) -> tuple:
    """(total bytes saved for backward by one training forward, {last dimension: bytes}); parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by_dim = set(), defaultdict(int)

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            by_dim[t.shape[-1] if t.dim() else 0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    return sum(by_dim.values()), dict(by_dim)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attn", default="exact_eager")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target_context", type=int, default=2048)
    parser.add_argument("--target_batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="last dimensions listed for the longest context")
    args = parser.parse_args(argv)
    if len(args.contexts) < 3:
        raise SystemExit("--contexts needs at least 3 lengths for the a C + b C^2 + c fit")

    model = paper_kv_model(args.attn, device=args.device)
    per_sample, by_dim = [], {}
    print(f"| C | saved MiB per sample ({args.attn}, fp32, batch {args.batch}) |\n|---|---|")
    for C in args.contexts:
        total, by_dim = saved_bytes(model, random_batch(args.batch, C, device=args.device))
        per_sample.append(total / args.batch)
        print(f"| {C} | {per_sample[-1] / 2**20:.1f} |")
    a, b, c = np.linalg.lstsq(np.array([[C, C * C, 1.0] for C in args.contexts]), np.array(per_sample), rcond=None)[0]
    T, B = args.target_context, args.target_batch
    print(f"\nfit per sample: {a / 1024:.1f} KiB x C + {b:.1f} B x C^2 + {c / 2**20:.1f} MiB")
    print(f"at C={T}, batch {B}: linear part {a * T * B / 2**30:.1f} GiB, quadratic part {b * T * T * B / 2**30:.1f} GiB, "
          f"constant {c * B / 2**30:.2f} GiB")
    print(f"\nby last dimension at C={args.contexts[-1]} (MiB per sample):")
    for dim, nbytes in sorted(by_dim.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"- {dim}: {nbytes / args.batch / 2**20:.1f}")

if __name__ == "__main__":
    main()
