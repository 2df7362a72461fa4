"""Benchmark a full GradMem training step of the paper's KV model: ms/step, steps/s, peak memory, gradient agreement.

Model (the paper's KV model): Llama 4 layers x 4 heads x width 128 (SwiGLU 512, vocab 70 from the KV tokenizer), 8 memory
tokens, K=2 inner SGD steps (inner lr 0.04), write head, inner loss added with weight 0.5, grad_mode=second; batch
B of random tokens: context C tokens (no padding), query 16 tokens whose last 4 are labels. One step = forward
(WRITE + READ), backward, gradient clipping at 1.0 and the AdamW step (lr 1e-3).

Rows (each optimisation alone, then together), for every context length C and batch size B:
    plain      the eager step as the trainer ran it before fast_step: transformers builds the masks (host syncs),
               torch AdamW (foreach), clip_grad_norm_          (attention: eager, exact_eager, fused_double_bwd)
    ckpt       the plain step with activation checkpointing of the backbone layers (--use_gradient_checkpointing:
               layer activations are recomputed in every backward, less memory, more time)
    recompute  the plain step with --recompute_write (write_recompute.py: the second-order WRITE steps keep no graph
               and are recomputed in the outer backward: one step's graph alive instead of K, more time)
    sync-free  CapturedTrainStep(use_cuda_graph=False): static causal mask, capturable AdamW, in-graph skipping
    graph      CapturedTrainStep: the whole step recorded in a CUDA graph and replayed
    graph-recompute  the graph step with --recompute_write (recordable: the paper model has no dropout)
    precision  fp32 (strict: TF32 off), tf32, bf16 (autocast, fp32 master weights)
    lean       optional fourth field: the model's lean_ops option on (lean_ops.py: SwiGLU fused with the down
               projection and RMSNorm that save only their inputs at both backward levels; on CUDA lean_ops runs
               them through lean_ops_triton's kernels, one per level and op); shown as "<mode> lean"
Time: median of CUDA-event times of `--steps` steps after `--warmup` steps (the first step of a graph row includes
recording it; it is not timed). Peak: the allocator's peak during the row (model, optimiser, graph pool included).
Agreement: the first step of every row starts from the same weights and batch; "loss err" and "grad err" are the
relative errors of the loss and of the clipped gradient vector (all parameters) against the plain eager-attention fp32
row ("vs eager fp32") and against the plain fp32 row of the same attention ("vs same attn"; graph/sync-free rows);
both references run without lean ops.

    python bench/bench_step.py --out bench/results/step_h100.md
    python bench/bench_step.py --contexts 128 --batches 64 --rows plain:eager:fp32 graph:fused_double_bwd:fp32
    python bench/bench_step.py --contexts 2048 --batches 64 --rows graph:fused_double_bwd:bf16 graph:fused_double_bwd:bf16:lean
    python bench/bench_step.py --contexts 512 --batches 64 --rows graph:fused_double_bwd:tf32:lean --profile --steps 3
        # and one profiled step of every row: kernels, host syncs, GPU-busy time by kernel kind, the costliest kernels
"""
import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import git_commit  # noqa: E402
from fast_step import CapturedTrainStep, autocast_for, precision_flags  # noqa: E402
from grad_memgpt import PRESETS, GradMemArgs, GradMemGPT, build_grad_memgpt  # noqa: E402

QUERY_LEN, LABELS = 16, 4
MODES = ("plain", "ckpt", "recompute", "sync-free", "graph", "graph-recompute")
DEFAULT_ROWS = [
    "plain:eager:fp32", "plain:exact_eager:fp32", "plain:fused_double_bwd:fp32", "plain:eager:tf32",
    "plain:eager:bf16", "sync-free:eager:fp32", "graph:eager:fp32", "graph:exact_eager:fp32",
    "graph:fused_double_bwd:fp32", "graph:fused_double_bwd:tf32", "graph:eager:tf32", "graph:eager:bf16",
    "graph:fused_double_bwd:fp32:lean", "graph:fused_double_bwd:tf32:lean", "graph:fused_double_bwd:bf16:lean",
]
LONG_ROWS = ["plain:eager:fp32", "plain:fused_double_bwd:fp32", "graph:fused_double_bwd:fp32",
             "graph:fused_double_bwd:tf32", "graph:fused_double_bwd:bf16", "ckpt:fused_double_bwd:tf32",
             "ckpt:fused_double_bwd:bf16", "graph:fused_double_bwd:fp32:lean", "graph:fused_double_bwd:tf32:lean",
             "graph:fused_double_bwd:bf16:lean", "recompute:fused_double_bwd:tf32:lean",
             "recompute:fused_double_bwd:bf16:lean", "graph-recompute:fused_double_bwd:tf32:lean",
             "graph-recompute:fused_double_bwd:bf16:lean"]


def paper_kv_model(attn: str, device="cuda", seed: int = 0, **overrides) -> GradMemGPT:
    """The paper's KV GradMem model as `--preset paper_kv` builds it (grad_memgpt.PRESETS; see the module docstring)
    with attention `attn`, freshly initialised with `seed`; `overrides` are other options by their command-line names
    (e.g. inner_lr=0.08, use_gradient_checkpointing=True)."""
    from training_args import BackboneArgs, parse_cli
    from training_backbone import load_tokenizer

    options = {"attn_implementation": attn, **overrides}
    args = ["--preset", "paper_kv"] + [word for name, value in options.items() for word in (f"--{name}", str(value))]
    backbone_args, gradmem_args = parse_cli(BackboneArgs, GradMemArgs, args=args, presets=PRESETS)
    tokenizer = load_tokenizer(backbone_args)
    torch.manual_seed(seed)
    return build_grad_memgpt(backbone_args, gradmem_args, tokenizer).to(device).train()


def random_batch(B: int, C: int, vocab: int = 70, seed: int = 0, device="cuda") -> dict:
    g = torch.Generator().manual_seed(seed)
    query = torch.randint(3, vocab, (B, QUERY_LEN), generator=g)
    labels = torch.full_like(query, -100)
    labels[:, -LABELS:] = query[:, -LABELS:]
    return {"context_input_ids": torch.randint(3, vocab, (B, C), generator=g).to(device),
            "query_input_ids": query.to(device), "labels": labels.to(device)}


def plain_step(model, optimizer, batch, precision, max_grad_norm=1.0):
    """The eager step as the HF Trainer runs it (loss.backward, clip_grad_norm_, AdamW.step)."""
    optimizer.zero_grad(set_to_none=True)
    with precision_flags(precision):
        with autocast_for(precision):
            loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return loss.detach(), norm


def parse_row(row: str) -> tuple:
    """'mode:attention:precision[:lean]' -> (mode, attention, precision, lean ops); SystemExit for a bad row."""
    parts = row.split(":")
    mode, attn, precision = (parts + ["", "", ""])[:3]
    if (len(parts) not in (3, 4) or mode not in MODES or precision not in ("fp32", "tf32", "bf16") or not attn
            or (len(parts) == 4 and parts[3] != "lean")):
        raise SystemExit(f"bad row {row!r}: use mode:attention:precision[:lean], mode in {'/'.join(MODES)}, "
                         "precision in fp32/tf32/bf16, lean: the lean_ops option on")
    return mode, attn, precision, len(parts) == 4


def row_step(row: str, base_state: dict, batch: dict, use_cuda_graph: bool = True):
    """(step() -> (loss, gradient norm), the trained parameters) of a row, its model at base_state; graph rows
    without the graph when not use_cuda_graph (the same kernels, launched one by one)."""
    mode, attn, precision, lean = parse_row(row)
    model = paper_kv_model(attn, use_gradient_checkpointing=mode == "ckpt",
                           recompute_write=mode in ("recompute", "graph-recompute"), lean_ops=lean)
    model.load_state_dict(base_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    if mode in ("plain", "ckpt", "recompute"):
        def step():
            return plain_step(model, optimizer, batch, precision)
    else:
        fast = CapturedTrainStep(model, optimizer, max_grad_norm=1.0, precision=precision,
                                 use_cuda_graph=mode in ("graph", "graph-recompute") and use_cuda_graph)

        def step():
            out = fast(batch)
            return out.loss, out.grad_norm
    return step, params


def run_row(row: str, base_state: dict, batch: dict, steps: int, warmup: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step, params = row_step(row, base_state, batch)
    loss, _ = step()  # first step from the shared initial weights: agreement
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    result = {"loss": loss.float().item(), "grads": torch.cat([g.flatten().double() for g in grads])}
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    result["ms"] = statistics.median(times)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if torch.is_tensor(a) else abs(a - b) / max(abs(b), 1e-30)


KERNEL_KINDS = (  # by kernel name, the first kind that matches; the lean ops' Triton kernels before attention's
    ("lean ops", ("_swiglu_", "_rms_norm_")),
    ("attention", ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd2_", "flash", "fmha")),
    ("matmul", ("gemm", "cutlass", "matmul", "xmma", "cublas", "nvjet")),
    ("reduction", ("reduce", "norm", "softmax", "cross_entropy", "nll", "log_softmax")),
    ("elementwise", ("elementwise", "vectorized", "fill", "copy", "where", "cat", "index")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def kernel_split(kernels) -> tuple:
    """({kind: [ms, count]} over KERNEL_KINDS and "other", [(ms, count, name)] by kernel name, costliest first) of
    (name, ms) pairs, one per kernel launch."""
    by_kind = {kind: [0.0, 0] for kind in [k for k, _ in KERNEL_KINDS] + ["other"]}
    by_name = {}
    for name, ms in kernels:
        for table, key in ((by_kind, kernel_kind(name)), (by_name, name)):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += ms
            entry[1] += 1
    return by_kind, sorted(((ms, n, name) for name, (ms, n) in by_name.items()), key=lambda t: -t[0])


def device_kernels(events) -> list:
    """[(kernel name, ms)] of a profile's CUDA events, without user annotations: a record_function range (the
    optimizer's `Optimizer.step#AdamW.step`) shows on the GPU timeline as one event spanning the kernels it launched,
    not as a kernel of its own."""
    return [(e.name, e.device_time_total / 1e3) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile_one(row: str, base_state: dict, batch: dict) -> tuple:
    """([(kernel name, ms)] of one step of the row after 3 warm-up steps, host syncs of another step)."""
    step, _ = row_step(row, base_state, batch, use_cuda_graph=False)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    return device_kernels(prof.events()), syncs


def failure_text(error: Exception) -> str:
    """A failed row's table cell."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return "failed: " + f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:160]


def profile_rows(C: int, B: int, rows: list, base_state: dict, top: int = 12) -> str:
    """One step of each row profiled: CUDA kernels, host syncs, GPU-busy time, its split by kernel kind (ms, share,
    launches) and the `top` costliest kernels. Graph rows run without the graph: the kernels a replay launches are
    the same, so their summed time is what a replay cannot go below."""
    batch = random_batch(B, C)
    kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
    lines = [f"### Profile of one training step, C={C}, B={B}", "",
             "| row | CUDA kernels | host syncs | GPU busy ms | " + " | ".join(f"{k}: ms, share (n)" for k in kinds)
             + " |", "|---" * (4 + len(kinds)) + "|"]
    top_lines = []
    for row in rows:
        try:
            kernels, syncs = profile_one(row, base_state, batch)
        except Exception as e:  # noqa: BLE001 - a failing row (out of memory, ...) is reported, the others still run
            lines.append(f"| {row} | {failure_text(e)} |" + " |" * (2 + len(kinds)))
            torch.cuda.empty_cache()
            continue
        by_kind, by_name = kernel_split(kernels)
        busy = sum(ms for ms, _ in by_kind.values())
        lines.append(f"| {row} | {len(kernels)} | {syncs} | {busy:.2f} | " + " | ".join(
            f"{by_kind[k][0]:.2f}, {by_kind[k][0] / max(busy, 1e-9):.0%} ({by_kind[k][1]})" for k in kinds) + " |")
        top_lines += ["", f"Top kernels of `{row}` (ms total, share of GPU busy, launches x mean us):", ""]
        top_lines += [f"- {ms:.2f} ms, {ms / max(busy, 1e-9):.1%}, {n} x {1e3 * ms / n:.1f} us: `{name[:110]}`"
                      for ms, n, name in by_name[:top]]
        torch.cuda.empty_cache()
    lines += ["", "GPU busy = sum of kernel times: a replayed graph of the same kernels cannot be faster. Kinds by "
              "kernel name: " + "; ".join(f"{k}: {', '.join(keys)}" for k, keys in KERNEL_KINDS) + "."]
    return "\n".join(lines + top_lines + [""])


def header(args) -> str:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    device = torch.cuda.get_device_name(0)
    return (f"# GradMem training step, paper KV model\n\n- card: {device}\n- versions: "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f"\n- git commit: {git_commit()}\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
            + f"\n- command: `python {' '.join(sys.argv)}`\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="mode:attention:precision")
    parser.add_argument("--long_context", type=int, default=None, help="also C=this at B=64 with the LONG_ROWS")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time_budget", type=float, default=None, help="seconds; rows after it are not run")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of every row at every context (the first batch size)")
    parser.add_argument("--out", default=None, help="write the markdown here (also printed)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_step.py needs a CUDA device")
    for row in args.rows:
        parse_row(row)
    started = time.time()
    out = [header(args)]

    def emit(text):
        print(text, flush=True)
        out.append(text)
        if args.out:
            Path(args.out).write_text("\n".join(out) + "\n")

    emit("| C | B | mode | attention | precision | ms/step | steps/s | peak GiB | loss err vs eager fp32 | "
         "grad err vs eager fp32 | grad err vs same attn |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|")
    cells = [(C, B, args.rows) for C in args.contexts for B in args.batches]
    if args.long_context:
        cells.append((args.long_context, 64, LONG_ROWS))
    for C, B, rows in cells:
        base_state = copy.deepcopy(paper_kv_model("eager").state_dict())
        batch = random_batch(B, C)
        reference = {}  # attention -> plain fp32 result
        for row in rows:
            mode, attn, precision, lean = parse_row(row)
            shown = f"{mode} lean" if lean else mode
            if args.time_budget is not None and time.time() - started > args.time_budget:
                emit(f"| {C} | {B} | {shown} | {attn} | {precision} | not run (time budget) | | | | | |")
                continue
            try:
                r = run_row(row, base_state, batch, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001 - a failing row (out of memory, ...) is reported, the others run
                emit(f"| {C} | {B} | {shown} | {attn} | {precision} | {failure_text(e)} | | | | | |")
                torch.cuda.empty_cache()
                continue
            if mode == "plain" and precision == "fp32" and not lean:
                reference[attn] = r
            ref = reference.get("eager")
            same = reference.get(attn) if mode != "plain" else None
            errs = [f"{rel(r['loss'], ref['loss']):.1e}" if ref else "", f"{rel(r['grads'], ref['grads']):.1e}" if ref else "",
                    f"{rel(r['grads'], same['grads']):.1e}" if same else ""]
            emit(f"| {C} | {B} | {shown} | {attn} | {precision} | {r['ms']:.1f} | {1000 / r['ms']:.1f} | "
                 f"{r['peak_gib']:.2f} | " + " | ".join(errs) + " |")
            torch.cuda.empty_cache()
    if args.profile:
        for C in args.contexts:
            emit("")
            if args.time_budget is not None and time.time() - started > args.time_budget:
                emit(f"### Profile at C={C}: not run (time budget)")
                continue
            emit(profile_rows(C, args.batches[0], args.rows, copy.deepcopy(paper_kv_model("eager").state_dict())))
    emit(f"\nTotal benchmark time {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
