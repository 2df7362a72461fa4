"""Benchmark one training step of the full-context Mamba baseline: transformers' torch path vs mamba_scan's.

Model: `--base_model mamba` as training_backbone builds it (4 layers, width 128, d_inner 4 x width, state 16, the
KV tokenizer's vocabulary), random weights and tokens, no padding. One step = forward with labels + backward
(no optimiser). Rows, in the same run from the same weights and batch: "transformers" (without mamba_ssm: its
per-position loop, whose backward is O(L^2) in memory traffic) and "parallel scan" (mamba_scan.use_parallel_scan).
Time: median of `--steps` steps after `--warmup`; peak memory on CUDA. Agreement: |loss difference| and the largest
relative difference of a parameter's gradient (max |g_scan - g_hf| / max |g_hf|) on the first step.

    python bench/bench_mamba_scan.py --out bench/results/mamba_scan_h200.md
    python bench/bench_mamba_scan.py --device cpu --threads 2 --lengths 60 --steps 2 --warmup 1
"""
import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import git_commit  # noqa: E402
from mamba_scan import use_parallel_scan  # noqa: E402
from training_args import BackboneArgs  # noqa: E402
from training_backbone import build_backbone_config, load_tokenizer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, input_ids, precision):
    """Forward with labels and backward; the loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach()


def time_row(model, input_ids, precision, warmup, steps):
    """(ms per step: median, peak GiB or None, first step's loss, first step's gradients)."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    loss = train_step(model, input_ids, precision)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    for _ in range(warmup):
        train_step(model, input_ids, precision)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        train_step(model, input_ids, precision)
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, loss, grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # strict fp32: the loss difference is the scan's alone

    tokenizer = load_tokenizer(BackboneArgs())
    config = build_backbone_config("mamba", args.layers, 1, args.width, tokenizer)
    lines = ["| batch | length | width | layers | transformers ms/step | parallel scan ms/step | speedup "
             "| peak GiB (transformers / scan) | loss diff | grad rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        torch.manual_seed(args.seed)
        reference = AutoModelForCausalLM.from_config(config).to(device).train()
        switched = copy.deepcopy(reference)
        if use_parallel_scan(switched) == 0:
            raise SystemExit("mamba_ssm is installed: use_parallel_scan leaves the model to its kernels")
        input_ids = torch.randint(0, len(tokenizer), (args.batch, length), device=device)
        ms_hf, peak_hf, loss_hf, grads_hf = time_row(reference, input_ids, args.precision, args.warmup, args.steps)
        ms_scan, peak_scan, loss_scan, grads_scan = time_row(switched, input_ids, args.precision, args.warmup,
                                                             args.steps)
        grad_diff = max(((g - h).abs().max() / h.abs().max().clamp_min(1e-30)).item()
                        for g, h in zip(grads_scan, grads_hf))
        peak = "—" if peak_hf is None else f"{peak_hf:.2f} / {peak_scan:.2f}"
        lines.append(f"| {args.batch} | {length} | {args.width} | {args.layers} | {ms_hf:.1f} | {ms_scan:.1f} "
                     f"| {ms_hf / ms_scan:.1f}x | {peak} | {(loss_scan - loss_hf).abs().item():.1e} "
                     f"| {grad_diff:.1e} |")
        print(lines[-1], flush=True)
        del reference, switched

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)")
    header = [
        "# One training step of the full-context Mamba: transformers' torch path vs the parallel scan",
        "",
        f"- device: {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}",
        f"- date: {datetime.date.today().isoformat()}; commit {git_commit()}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv))}`",
        f"- precision: {args.precision}; forward with labels + backward, median of {args.steps} steps after "
        f"{args.warmup} warm-up",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
