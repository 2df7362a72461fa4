"""Compare the fused Triton attention with the float64 exact reference: output, first-order grads and the four
double-backward outputs (d dO, d q, d k, d v) for random cotangents.

    TRITON_INTERPRET=1 python -m attn_double_bwd.verify --suite interpret   # tiny shapes on CPU
    python -m attn_double_bwd.verify --suite gpu                            # real sizes on CUDA

Prints one JSON object per case (relative Frobenius errors) and exits non-zero if any exceeds its tolerance.
"""
import argparse
import json
import sys

import torch

from .reference import exact_attention

NAMES = ("out", "dq", "dk", "dv", "d_dout", "d2q", "d2k", "d2v")
# Relative-error tolerances per dtype (fp32 is IEEE unless TF32 is switched on; TF32 has a 10-bit mantissa).
TOLERANCE = {torch.float32: 1e-5, "tf32": 5e-3, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attention_and_derivatives(fn, q, k, v, do, gq, gk, gv, dtype, **masks):
    """fn's output, (dq, dk, dv) for cotangent do, and the gradient of <gq,dq>+<gk,dk>+<gv,dv> w.r.t. (do,q,k,v)."""
    q, k, v, do = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v, do)]
    out = fn(q, k, v, **masks)
    grads = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
    phi = sum((g * c.to(dtype)).sum() for g, c in zip(grads, (gq, gk, gv)))
    second = torch.autograd.grad(phi, (do, q, k, v))
    return [out.detach(), *[g.detach() for g in grads], *second]


def make_case(B, Hq, Hkv, Lq, Lk, D, device, seed=0, mask=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    tensors = dict(q=q, k=k, v=v, do=rnd(B, Hq, Lq, D), gq=rnd(B, Hq, Lq, D), gk=rnd(B, Hkv, Lk, D),
                   gv=rnd(B, Hkv, Lk, D))
    masks = {}
    if mask == "causal":
        masks["is_causal"] = True
    elif mask == "padding":  # right padding, a different length per sequence
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        masks["key_padding_mask"] = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
    elif mask == "causal+padding":
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        masks["is_causal"] = True
        masks["key_padding_mask"] = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
    elif mask == "bool4d":  # as transformers' sdpa_mask builds it: [B, 1, Lq, Lk], causal and left padding
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        keep = torch.arange(Lk)[None, :] >= (Lk - lengths[:, None])
        causal = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        masks["attn_mask"] = (causal[None] & keep[:, None, :])[:, None].to(device)
    elif mask is not None:
        raise ValueError(f"unknown mask kind {mask!r}")
    return tensors, masks


def compare(B, Hq, Hkv, Lq, Lk, D, dtype, mask=None, device="cpu", seed=0):
    from .triton_attention import fused_attention

    t, masks = make_case(B, Hq, Hkv, Lq, Lk, D, device, seed, mask)
    args = (t["q"], t["k"], t["v"], t["do"], t["gq"], t["gk"], t["gv"])
    ref = attention_and_derivatives(exact_attention, *args, torch.float64, **masks)
    got = attention_and_derivatives(fused_attention, *args, dtype, **masks)
    return {name: rel_err(a, b) for name, a, b in zip(NAMES, got, ref)}


INTERPRET_SUITE = [
    # (B, Hq, Hkv, Lq, Lk, D, dtype, mask)
    (1, 2, 2, 13, 13, 16, torch.float32, "causal"),
    (1, 2, 1, 37, 37, 16, torch.float32, "causal"),  # GQA, several blocks, ragged tail
    (1, 2, 2, 13, 37, 16, torch.float32, "causal"),  # Lq < Lk (bottom-right causal)
    (1, 2, 1, 37, 13, 16, torch.float32, "causal"),  # Lq > Lk: leading rows see nothing
    (2, 2, 1, 13, 13, 16, torch.float32, "causal+padding"),
    (2, 2, 2, 13, 21, 16, torch.float32, "padding"),
    (2, 2, 2, 13, 13, 16, torch.float32, "bool4d"),
    (1, 2, 2, 13, 13, 32, torch.float32, None),
    (1, 2, 1, 37, 29, 16, torch.float32, None),  # no mask, ragged tails on both sides
    (1, 2, 1, 13, 13, 16, torch.float16, "causal"),
    # No bfloat16 here: the interpreter's tl.dot on bfloat16 operands returns garbage (measured with triton 3.9 on
    # a 16x16 product, errors ~1e10); bfloat16 is covered by the GPU suite.
]

# Kept small: every (head dim, dtype, mask kind) combination compiles its own kernels.
GPU_SUITE = [
    *[(2, 4, 2, 1000, 1000, 64, dtype, mask) for dtype in (torch.float32, torch.bfloat16, torch.float16)
      for mask in ("causal", "causal+padding", "bool4d")],
    (2, 4, 4, 777, 777, 64, torch.bfloat16, None),
    (2, 4, 2, 200, 700, 64, torch.float32, "causal"),  # Lq < Lk
    (2, 4, 2, 700, 200, 64, torch.bfloat16, "causal"),  # Lq > Lk
    (2, 4, 2, 257, 257, 128, torch.float32, "causal"),
    (2, 4, 2, 257, 257, 128, torch.bfloat16, "causal"),
    (4, 4, 4, 513, 513, 32, torch.bfloat16, "causal+padding"),
    (2, 4, 1, 300, 300, 16, torch.float16, "bool4d"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["interpret", "gpu"], required=True)
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 (torch.backends.cuda.matmul.fp32_precision); runs the float32 cases only")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th case starting at i (parallel compiles)")
    args = parser.parse_args(argv)
    matmul = torch.backends.cuda.matmul
    saved_precision = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if args.tf32 else "ieee"
    try:  # restore the flag: main() also runs inside pytest, where later tests expect strict fp32
        return _run_suite(args)
    finally:
        matmul.fp32_precision = saved_precision


def _run_suite(args) -> int:
    device = "cuda" if args.suite == "gpu" else "cpu"
    suite = INTERPRET_SUITE if args.suite == "interpret" else GPU_SUITE
    if args.tf32:
        suite = [case for case in suite if case[6] == torch.float32]
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    failed = 0
    for B, Hq, Hkv, Lq, Lk, D, dtype, mask in suite[shard::n_shards]:
        errors = compare(B, Hq, Hkv, Lq, Lk, D, dtype, mask, device=device)
        tol = TOLERANCE["tf32" if args.tf32 and dtype == torch.float32 else dtype]
        ok = max(errors.values()) <= tol
        failed += not ok
        case = dict(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=str(dtype).removeprefix("torch."), mask=mask)
        print(json.dumps({**case, "tol": tol, "ok": ok, **{k: float(f"{e:.3g}") for k, e in errors.items()}}))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
