"""Where the memory of a second-order GradMem step goes: bytes the autograd graph keeps for the outer backward.

Counts every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage once) while the paper
KV model (bench_step.paper_kv_model: Llama 4x4x128, 8 memory tokens, K=2 second order) runs one training forward:
the K inner steps with their create_graph backward, READ and the losses. All of it is alive when the outer backward
starts, so it is the floor of the step's peak memory. Each saved tensor is grouped by its last dimension, which names
the layer piece that keeps it (width 128: hidden states and projections; 512: the SwiGLU intermediate; 32: per-head
q/k/v; 70: logits; L = C + 8 memory positions: attention scores).

Per context length C the script prints saved bytes per sample and fits bytes = a C + b C^2 + c over the lengths, then
extrapolates to --target_context x --target_batch: the linear term a is the non-attention part (norms, RoPE, SwiGLU,
projections); the quadratic term b is attention storing L x L tensors (exact_eager does; the fused kernel does not).
The same fit per last dimension gives each group's bytes per context token and sample. `--lean_ops compare` measures
the model without and with the lean_ops option (lean_ops.py: SwiGLU and RMSNorm that save only their inputs) in one
run and prints them side by side.

    python bench/saved_memory.py                                  # CPU, exact_eager attention, C 128 256 512
    python bench/saved_memory.py --lean_ops compare               # the same without and with lean ops (lean_ops.py)
    python bench/saved_memory.py --contexts 512 1024 2048 --attn fused_double_bwd --device cuda --lean_ops compare
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


def measure(args, lean_ops: bool) -> dict:
    """Saved bytes per sample of the paper model (with or without lean ops) at each context length: totals, the fit
    a C + b C^2 + c, and per last dimension (the attention's L = C + memory positions as one group "L") the same fit."""
    model = paper_kv_model(args.attn, device=args.device, lean_ops=lean_ops)
    totals, groups = [], defaultdict(lambda: [0.0] * len(args.contexts))
    for i, C in enumerate(args.contexts):
        total, by_dim = saved_bytes(model, random_batch(args.batch, C, device=args.device))
        totals.append(total / args.batch)
        for dim, nbytes in by_dim.items():
            groups["L" if dim == C + model.mem_offset else dim][i] += nbytes / args.batch
    design = np.array([[C, C * C, 1.0] for C in args.contexts])

    def fit(values):
        return np.linalg.lstsq(design, np.array(values), rcond=None)[0]

    return {"totals": totals, "fit": fit(totals), "groups": {g: (v, fit(v)) for g, v in groups.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attn", default="exact_eager")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lean_ops", choices=("off", "on", "compare"), default="off",
                        help="the model's lean_ops option: off, on, or compare (both, side by side)")
    parser.add_argument("--target_context", type=int, default=2048)
    parser.add_argument("--target_batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="last dimensions listed for the longest context")
    args = parser.parse_args(argv)
    if len(args.contexts) < 3:
        raise SystemExit("--contexts needs at least 3 lengths for the a C + b C^2 + c fit")

    settings = {"off": [False], "on": [True], "compare": [False, True]}[args.lean_ops]
    names = ["lean ops" if lean else "eager ops" for lean in settings]
    results = [measure(args, lean) for lean in settings]
    print(f"saved per sample ({args.attn} attention, fp32, batch {args.batch}); per token: divided by C\n")
    print("| C | " + " | ".join(f"MiB, {name} | KiB per token, {name}" for name in names) + " |")
    print("|---" + "|---|---" * len(names) + "|")
    for i, C in enumerate(args.contexts):
        print(f"| {C} | " + " | ".join(f"{r['totals'][i] / 2**20:.1f} | {r['totals'][i] / C / 1024:.1f}"
                                       for r in results) + " |")
    T, B = args.target_context, args.target_batch
    for name, r in zip(names, results):
        a, b, c = r["fit"]
        print(f"\n{name}: fit per sample: {a / 1024:.1f} KiB x C + {b:.1f} B x C^2 + {c / 2**20:.1f} MiB")
        print(f"at C={T}, batch {B}: linear part {a * T * B / 2**30:.1f} GiB, quadratic part {b * T * T * B / 2**30:.1f} "
              f"GiB, constant {c * B / 2**30:.2f} GiB")
    C = args.contexts[-1]
    order = sorted(results[0]["groups"], key=lambda g: -results[0]["groups"][g][0][-1])[:args.top]
    print(f"\nby last dimension (L: attention scores, C + memory positions): MiB per sample at C={C}; KiB per context "
          "token and sample (the linear term of the group's fit)")
    print("\n| last dim | " + " | ".join(f"MiB at C={C}, {n} | KiB per token, {n}" for n in names) + " |")
    print("|---" + "|---|---" * len(names) + "|")
    for group in order:
        cells = []
        for r in results:
            values, (a, _, _) = r["groups"].get(group, ([0.0] * len(args.contexts), (0.0, 0.0, 0.0)))
            cells.append(f"{values[-1] / 2**20:.1f} | {a / 1024:.1f}")
        print(f"| {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
