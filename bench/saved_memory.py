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
run and prints them side by side; `--recompute_write compare` the same for recompute_write (write_recompute.py: the
second-order WRITE steps keep no graph and are recomputed in the backward). With recomputation what the forward saves
is not what is alive at the peak, so each variant's peak over forward and backward is measured too
(`peak_saved_bytes`).

    python bench/saved_memory.py                                  # CPU, exact_eager attention, C 128 256 512
    python bench/saved_memory.py --lean_ops compare               # the same without and with lean ops (lean_ops.py)
    python bench/saved_memory.py --contexts 512 1024 2048 --attn fused_double_bwd --device cuda --lean_ops compare
    python bench/saved_memory.py --K 5 --lean_ops on --recompute_write compare  # K=5, lean ops, without / with
"""
import argparse
import sys
import weakref
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


def peak_saved_bytes(model, batch) -> int:
    """The most bytes saved for backward alive at once over one training forward and its backward (each storage
    once, parameters not counted). A saved tensor stays counted until its graph releases it: a backward through it
    does (the WRITE steps' inner gradients, the recomputation of write_recompute in the outer backward); a graph only
    dropped is freed by the garbage collector, later."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live, now, peak = {}, 0, 0  # storage -> [bytes, holders]

    class Held:  # one packed tensor: counted until the graph drops it
        __slots__ = ("tensor", "__weakref__")

    def release(key):
        nonlocal now
        live[key][1] -= 1
        if live[key][1] == 0:
            now -= live.pop(key)[0]

    def pack(t):
        nonlocal now, peak
        key = t.untyped_storage().data_ptr()
        if key in params:
            return t
        held = Held()
        held.tensor = t
        if key not in live:
            live[key] = [t.untyped_storage().nbytes(), 0]
            now += live[key][0]
            peak = max(peak, now)
        live[key][1] += 1
        weakref.finalize(held, release, key)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: getattr(held, "tensor", held)):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return peak


def measure(args, options: dict) -> dict:
    """Bytes saved for backward per sample by the paper model (with `options`) at each context length: the peak
    alive over forward and backward with its fit a C + b C^2 + c, and what the forward saves per last dimension (the
    attention's L = C + memory positions as one group "L") with the same fit."""
    model = paper_kv_model(args.attn, device=args.device, **options, **({"K": args.K} if args.K else {}))
    peaks, groups = [], defaultdict(lambda: [0.0] * len(args.contexts))
    for i, C in enumerate(args.contexts):
        batch = random_batch(args.batch, C, device=args.device)
        peaks.append(peak_saved_bytes(model, batch) / args.batch)
        # what the forward saves: everything alive at the peak, unless steps are recomputed in the backward
        by_dim = {} if options["recompute_write"] else saved_bytes(model, batch)[1]
        for dim, nbytes in by_dim.items():
            groups["L" if dim == C + model.mem_offset else dim][i] += nbytes / args.batch
    design = np.array([[C, C * C, 1.0] for C in args.contexts])

    def fit(values):
        return np.linalg.lstsq(design, np.array(values), rcond=None)[0]

    return {"peaks": peaks, "peak_fit": fit(peaks), "groups": {g: (v, fit(v)) for g, v in groups.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attn", default="exact_eager")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--K", type=int, default=None, help="inner steps (default: the preset's 2)")
    for option in ("lean_ops", "recompute_write"):
        parser.add_argument(f"--{option}", choices=("off", "on", "compare"), default="off",
                            help=f"the model's {option} option: off, on, or compare (both, side by side)")
    parser.add_argument("--target_context", type=int, default=2048)
    parser.add_argument("--target_batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="last dimensions listed for the longest context")
    args = parser.parse_args(argv)
    if len(args.contexts) < 3:
        raise SystemExit("--contexts needs at least 3 lengths for the a C + b C^2 + c fit")

    choices = {"off": [False], "on": [True], "compare": [False, True]}
    settings = [{"lean_ops": lean, "recompute_write": recompute}
                for lean in choices[args.lean_ops] for recompute in choices[args.recompute_write]]
    names = [("lean ops" if o["lean_ops"] else "eager ops") + (", recompute" if o["recompute_write"] else "")
             for o in settings]
    results = [measure(args, options) for options in settings]
    print(f"bytes saved for backward per sample ({args.attn} attention, fp32, batch {args.batch}): the most alive at "
          "once over one training forward and its backward (without recomputation: all the forward saved)\n")
    print("| C | " + " | ".join(f"MiB, {n} | KiB per token, {n}" for n in names) + " |")
    print("|---" + "|---|---" * len(names) + "|")
    for i, C in enumerate(args.contexts):
        print(f"| {C} | " + " | ".join(f"{r['peaks'][i] / 2**20:.1f} | {r['peaks'][i] / C / 1024:.1f}"
                                       for r in results) + " |")
    T, B = args.target_context, args.target_batch
    for name, r in zip(names, results):
        a, b, c = r["peak_fit"]
        print(f"\n{name}: fit per sample: {a / 1024:.1f} KiB x C + {b:.1f} B x C^2 + {c / 2**20:.1f} MiB")
        print(f"at C={T}, batch {B}: linear part {a * T * B / 2**30:.1f} GiB, quadratic part {b * T * T * B / 2**30:.1f} "
              f"GiB, constant {c * B / 2**30:.2f} GiB")
    kept = [(n, r) for n, r, o in zip(names, results, settings) if not o["recompute_write"]]
    if not kept:
        return
    names, results = [n for n, _ in kept], [r for _, r in kept]
    C = args.contexts[-1]
    order = sorted(results[0]["groups"], key=lambda g: -results[0]["groups"][g][0][-1])[:args.top]
    print(f"\nsaved by the forward, by last dimension (variants without recomputation; L: attention scores, C + memory "
          f"positions): MiB per sample at C={C}; KiB per context token and sample (the linear term of the group's fit)")
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
