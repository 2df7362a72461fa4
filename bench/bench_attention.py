"""Benchmark attention alone: forward, backward and double backward time, peak memory and error vs float64.

For each implementation, dtype and sequence length:
  fwd   o = attn(q, k, v)                                         (graph recorded, as in training)
  bwd   (dq, dk, dv) = grad(o, (q, k, v), dO, create_graph=True)  (first order, differentiable again)
  dbwd  grad(<gq, dq> + <gk, dk> + <gv, dv>, (dO, q, k, v))        (the double backward)
Times are CUDA-event medians; "peak GiB" is the allocator's peak above the inputs for one fwd + bwd + dbwd.
Errors are relative Frobenius errors against the float64 exact implementation on one batch element and two query
heads (same kernels, smaller problem), max over the outputs of each level.
dbwd TFLOP/s is given for two matmul counts: the 22 [L x L x D] products the fused kernels execute (three passes
that each recompute their tiles) and the 12 products a double backward needs at least without storing an L x L
matrix (S, dP, Bbar (2), dO gv^T, then 7 output products); causal counts half.

    python bench/bench_attention.py --out bench/results/attention_h100.md
    python bench/bench_attention.py --lengths 512 1024 --dtypes bf16 --impls exact_eager fused_double_bwd
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import git_commit  # noqa: E402
from attn_double_bwd import exact_attention  # noqa: E402
from attn_double_bwd.verify import attention_and_derivatives, make_case, rel_err  # noqa: E402

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_attention(q, k, v, is_causal=False):
    """What transformers' eager attention computes: repeated k/v, materialised scores, float32 softmax."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        Lq, Lk = s.shape[-2:]
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def sdpa_attention(q, k, v, is_causal=False):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)


def fused(q, k, v, is_causal=False):
    from attn_double_bwd.triton_attention import fused_attention

    return fused_attention(q, k, v, is_causal=is_causal)


def exact(q, k, v, is_causal=False):
    return exact_attention(q, k, v, is_causal=is_causal)


IMPLS = {"eager": eager_attention, "sdpa": sdpa_attention, "exact_eager": exact, "fused_double_bwd": fused}


def cuda_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_and_memory(fn, B, Hq, Hkv, L, D, dtype, causal, warmup, repeats):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v = rnd(B, Hq, L, D).requires_grad_(), rnd(B, Hkv, L, D).requires_grad_(), rnd(B, Hkv, L, D).requires_grad_()
    do, gq, gk, gv = rnd(B, Hq, L, D).requires_grad_(), rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
    row = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = fn(q, k, v, causal)
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    phi = sum((x * c).sum() for x, c in zip(grads, (gq, gk, gv)))
    try:
        torch.autograd.grad(phi, (do, q, k, v), retain_graph=True)
        has_dbwd = True
    except RuntimeError:  # e.g. sdpa: no double backward
        has_dbwd = False
    torch.cuda.synchronize()
    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    row["fwd_ms"] = cuda_ms(lambda: fn(q, k, v, causal), warmup, repeats)
    row["bwd_ms"] = cuda_ms(
        lambda: torch.autograd.grad(o, (q, k, v), do, create_graph=True, retain_graph=True), warmup, repeats
    )
    row["dbwd_ms"] = (
        cuda_ms(lambda: torch.autograd.grad(phi, (do, q, k, v), retain_graph=True), warmup, repeats)
        if has_dbwd else None
    )
    return row


def errors(fn, Hq, Hkv, L, D, dtype, causal):
    """Max relative errors per level vs float64 exact_attention on one batch element and two query heads."""
    Hq_s, Hkv_s = 2, max(1, 2 * Hkv // Hq)
    t, masks = make_case(1, Hq_s, Hkv_s, L, L, D, "cuda", mask="causal" if causal else None)
    args = (t["q"], t["k"], t["v"], t["do"], t["gq"], t["gk"], t["gv"])
    ref = attention_and_derivatives(exact_attention, *args, torch.float64, **masks)
    got = attention_and_derivatives(lambda q, k, v, is_causal=False: fn(q, k, v, is_causal), *args, dtype, **masks)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    return {"err_out": errs[0], "err_bwd": max(errs[1:4]), "err_dbwd": max(errs[4:])}


def fused_breakdown(B, Hq, Hkv, L, D, dtype, causal, warmup, repeats):
    """Milliseconds per fused kernel launch (forward, backward, the three double-backward passes)."""
    from attn_double_bwd import triton_attention as ta

    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v, do, gq = rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D), rnd(B, Hq, L, D), rnd(B, Hq, L, D)
    gk, gv = rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
    meta = ta._Meta(q, k, None, None, causal, D**-0.5)
    o, lse = ta._forward(q, k, v, meta)
    dq, dk, dv, delta = ta._backward(do, q, k, v, o, lse, meta)
    beta, gamma = torch.empty_like(delta), torch.empty_like(delta)
    dq2, ddo, dk2, dv2 = torch.empty_like(q), torch.empty_like(do), torch.empty_like(k), torch.empty_like(v)
    common = (*meta.args(), *meta.sizes(), meta.qk_scale, meta.sm_scale, meta.lq_bucket)
    rows = (q, k, v, do, gq, gk, gv, lse, delta, beta, gamma, dq2, ddo)
    launches = {
        "fwd": lambda: ta._forward(q, k, v, meta),
        "bwd (dk dv + dq)": lambda: ta._backward(do, q, k, v, o, lse, meta),
        "dbwd pass 1 (beta, gamma)": lambda: ta._launch(
            "bwd2_rows", ta._row_grid(meta), q, *rows, *common, REDUCE=True, **meta.flags()),
        "dbwd pass 2 (dq2, d dO)": lambda: ta._launch(
            "bwd2_rows", ta._row_grid(meta), q, *rows, *common, REDUCE=False, **meta.flags()),
        "dbwd pass 3 (dk2, dv2)": lambda: ta._launch(
            "bwd2_cols", ta._col_grid(meta), q, q, k, v, do, gq, gk, gv, lse, delta, beta, gamma, dk2, dv2,
            *common, **meta.flags()),
    }
    out = {name: cuda_ms(fn, warmup, repeats) for name, fn in launches.items()}
    tuned = {name: str(t.best_config) for name, t in ta._TUNED.items() if getattr(t, "best_config", None) is not None}
    return out, tuned


def matmul_tflops(dtype=torch.bfloat16, n=8192):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_ms(lambda: a @ b, 3, 10)
    return 2 * n**3 / ms / 1e9


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "exact_eager", "fused_double_bwd"],
                        choices=sorted(IMPLS))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32", "tf32"], choices=sorted(DTYPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--error-max-len", type=int, default=4096, help="skip the float64 error check above this")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--breakdown", nargs="*", type=int, default=[],
                        help="lengths at which to time each fused kernel separately (first dtype)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    Hq, Hkv, D, B = args.heads, args.kv_heads or args.heads, args.head_dim, args.batch
    causal = not args.no_causal
    mm = matmul_tflops()

    lines = [
        "| impl | dtype | L | fwd ms | bwd ms | dbwd ms | peak GiB | dbwd TFLOP/s (22 / 12 matmuls) "
        "| err out | err bwd | err dbwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype_name in args.dtypes:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if dtype_name == "tf32" else "ieee"
        dtype = DTYPES[dtype_name]
        for L in args.lengths:
            for impl in args.impls:
                fn = IMPLS[impl]
                try:
                    row = time_and_memory(fn, B, Hq, Hkv, L, D, dtype, causal, args.warmup, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    row = None
                torch.cuda.empty_cache()
                err = None
                if row is not None and row["dbwd_ms"] is not None and L <= args.error_max_len:
                    try:
                        err = errors(fn, Hq, Hkv, L, D, dtype, causal)
                    except (torch.cuda.OutOfMemoryError, RuntimeError):
                        err = None
                    torch.cuda.empty_cache()
                if row is None:
                    line = f"| {impl} | {dtype_name} | {L} | out of memory (80 GB) | | | | | | | |"
                else:
                    pairs = B * Hq * L * L * (0.5 if causal else 1.0)
                    rate = lambda n: None if row["dbwd_ms"] is None else 2 * n * pairs * D / row["dbwd_ms"] / 1e9  # noqa: E731
                    err = err or {}
                    dbwd = "no double backward" if row["dbwd_ms"] is None else f"{row['dbwd_ms']:.2f}"
                    line = (
                        f"| {impl} | {dtype_name} | {L} | {row['fwd_ms']:.2f} | {row['bwd_ms']:.2f} | {dbwd} "
                        f"| {row['peak_gib']:.2f} | {fmt(rate(22), '.0f')} / {fmt(rate(12), '.0f')} "
                        f"| {fmt(err.get('err_out'), '.1e')} | {fmt(err.get('err_bwd'), '.1e')} "
                        f"| {fmt(err.get('err_dbwd'), '.1e')} |"
                    )
                lines.append(line)
                print(line, flush=True)
                if args.out is not None:  # keep what was measured even if the run is cut short
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text("\n".join(lines) + "\n")

    breakdown = []
    if args.breakdown:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if args.dtypes[0] == "tf32" else "ieee"
        breakdown = ["", f"Fused kernels one by one ({args.dtypes[0]}, ms):", "",
                     "| L | " + " | ".join(["fwd", "bwd (dk dv + dq)", "dbwd pass 1 (beta, gamma)",
                                              "dbwd pass 2 (dq2, d dO)", "dbwd pass 3 (dk2, dv2)"]) + " |",
                     "|---|---|---|---|---|---|"]
        for L in args.breakdown:
            ms, tuned = fused_breakdown(B, Hq, Hkv, L, D, DTYPES[args.dtypes[0]], causal, args.warmup, args.repeats)
            breakdown.append(f"| {L} | " + " | ".join(f"{x:.2f}" for x in ms.values()) + " |")
            print(breakdown[-1], flush=True)
        if tuned:
            breakdown += ["", "Autotuned configs (last key): " + "; ".join(f"{k}: {v}" for k, v in tuned.items())]

    versions = (
        f"torch {torch.__version__}, triton {_version('triton')}, transformers {_version('transformers')}, "
        f"python {platform.python_version()}"
    )
    header = [
        f"# Attention alone: forward / backward / double backward ({'causal' if causal else 'no mask'})",
        "",
        f"- card: {torch.cuda.get_device_name()}; {versions}",
        f"- date: {datetime.date.today().isoformat()}; commit {git_commit()}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}`",
        f"- shape: batch {B}, {Hq} query heads, {Hkv} key/value heads, head_dim {D}; "
        f"GRADMEM_ATTN_AUTOTUNE={os.environ.get('GRADMEM_ATTN_AUTOTUNE', '0')}",
        f"- dense bf16 matmul (8192^3, torch) on this card in this run: {mm:.0f} TFLOP/s",
        "- tf32 = float32 inputs with torch.backends.cuda.matmul.fp32_precision = 'tf32' (torch matmuls and the fused kernels)",
        "",
    ]
    text = "\n".join(header + lines + breakdown) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _version(pkg):
    try:
        return __import__(pkg).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
