"""Time to accuracy: the paper's KV GradMem model on locally generated KV data, exact match against wall time.

A curriculum over the number of pairs N (the authors reached N16 and beyond by warm-starting from smaller N): each
stage trains on fresh samples of N{n}-K2V2-V62 (generated on the fly, never repeated) with the captured training step
(fast_step.CapturedTrainStep), evaluates exact match on held-out samples every `--eval_every` steps and moves on to
the next stage, keeping the weights (a warm start) with a fresh AdamW and its own warmup, once exact match reaches
the stage's threshold. The last stage stops at `--target`. Wall time counts everything from the start of the first
stage: data generation, CUDA-graph recording, kernel compilation and evaluation.

Model and recipe defaults (those of scripts/run_kv_capacity.sh, which trains through the trainer): Llama 4x4x128,
8 memory tokens, K=2, inner lr 0.04, write head, inner loss added with weight 0.5, second order, batch 64, gradient clipping 1.0, AdamW with
betas (0.9, 0.95) and no weight decay (as the trainer; runs before 2026-11-30 had torch's default 0.01): outer lr 1e-3
in the first stage (linear warmup over 300 steps, then constant), 5e-4 in later stages (warmup 100, then a linear decay
to 10% over 36000 steps). Measured on an H100 (bench/results/learning_n16_recipes_h100.md): a constant 1e-3 diverges
on N16 after ~7000 steps; the lower, decaying later-stage lr with beta2 0.95 reaches N16 >= 0.95 in 198-271 s. Exact match as the trainer computes it (all target tokens right, the
structural `!` and `|` ignored), on `--eval_samples` samples of the valid stream (seed 0, stream 1).

Data: samples come from kv_dataset_utils.generate_kv_samples (the generator the datasets are built with; train stream,
seed `--seed`), encoded by a vectorised character lookup that is checked against the trainer's MemoryModelCollator
on the first batch of every stage. Context and query lengths are fixed per N (padded to a multiple of 8, as the
collator does): N8 -> context 64 (57 real tokens), N16 -> 120 (113); query 16 (9 real, the last 4 are labels).

    python bench/bench_learning.py --stages 8 --time_budget 90 --out_prefix runs/learning/n8
    python bench/bench_learning.py --stages 8:0.9 16 --precision tf32 --out_prefix runs/learning/n16
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import git_commit  # noqa: E402
import kv_dataset_utils  # noqa: E402
from figures import save_png  # noqa: E402
from bench_step import paper_kv_model  # noqa: E402
from fast_step import CapturedTrainStep, precision_flags  # noqa: E402

IGNORE_INDEX = -100


class KVStream:
    """Fresh KV samples of one task as fixed-shape GPU batches (context [B, S], query and labels [B, Q])."""

    def __init__(self, n_pairs: int, tokenizer, seed: int, stream: int, batch_size: int, chunk_batches: int = 100):
        self.spec = kv_dataset_utils.parse_dataset_name(f"N{n_pairs}-K2V2-V62")
        self.tokenizer, self.seed, self.stream = tokenizer, seed, stream
        self.B, self.chunk_batches = batch_size, chunk_batches
        vocab = tokenizer.get_vocab()
        chars = [t for t in vocab if len(t) == 1]
        self.lut = np.full(max(ord(c) for c in chars) + 1, -1, dtype=np.int64)
        for c in chars:
            self.lut[ord(c)] = vocab[c]
        self.pad = tokenizer.pad_token_id
        self.chunk, self.offset, self.chunk_index = None, 0, 0

    def encode(self, samples: dict) -> dict:
        """Character lookup of context and query+target; labels on the target characters (right padding to x8)."""
        def codes(strings):
            lengths = {len(s) for s in strings}
            if len(lengths) != 1:
                raise ValueError(f"KV samples of one N should have one length, got {sorted(lengths)}")
            L = lengths.pop()
            flat = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32).reshape(len(strings), L)
            ids = self.lut[flat]
            if (ids < 0).any():
                raise ValueError("a character of the data is not in the tokenizer")
            return ids

        def pad8(ids, value):
            L = -(-ids.shape[1] // 8) * 8
            out = np.full((ids.shape[0], L), value, dtype=np.int64)
            out[:, : ids.shape[1]] = ids
            return torch.from_numpy(out)

        context = codes(samples["context"])
        query = codes([q + t for q, t in zip(samples["query"], samples["target"])])
        n_target = len(samples["target"][0])
        labels = np.full_like(query, IGNORE_INDEX)
        labels[:, -n_target:] = query[:, -n_target:]
        return {"context_input_ids": pad8(context, self.pad), "query_input_ids": pad8(query, self.pad),
                "labels": pad8(labels, IGNORE_INDEX)}

    def take(self, n: int, start_chunk: int = 0) -> dict:
        samples = kv_dataset_utils.generate_kv_samples(self.spec, n, self.seed + start_chunk, self.stream)
        return self.encode(samples)

    def next_batch(self) -> dict:
        if self.chunk is None or self.offset >= self.chunk["labels"].shape[0]:
            # a new seed per chunk: every training sample is fresh (seed + chunk index, same stream)
            host = self.take(self.B * self.chunk_batches, start_chunk=1000 * self.chunk_index)
            self.chunk = {k: v.pin_memory().to("cuda", non_blocking=True) for k, v in host.items()}
            self.offset, self.chunk_index = 0, self.chunk_index + 1
        batch = {k: v[self.offset: self.offset + self.B] for k, v in self.chunk.items()}
        self.offset += self.B
        return batch


def check_against_collator(stream: KVStream) -> None:
    """The vectorised encoding gives exactly the trainer collator's tensors."""
    from training_collators import MemoryModelCollator

    samples = kv_dataset_utils.generate_kv_samples(stream.spec, 64, 12345, stream.stream)
    ours = stream.encode(samples)
    examples = [dict(zip(("context", "query", "target"), row))
                for row in zip(samples["context"], samples["query"], samples["target"])]
    theirs = MemoryModelCollator(stream.tokenizer)(examples)
    for name, tensor in theirs.items():
        if not torch.equal(ours[name], tensor):
            raise AssertionError(f"vectorised KV encoding differs from MemoryModelCollator in {name}")


@torch.no_grad()
def exact_match(model, data: dict, ignore_ids: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of samples whose labelled tokens (except `!` and `|`) are all predicted right."""
    model.eval()
    correct, total = 0, 0
    for i in range(0, data["labels"].shape[0], batch_size):
        part = {k: v[i: i + batch_size] for k, v in data.items()}
        logits = model(part["context_input_ids"], part["query_input_ids"]).logits
        labels = part["labels"]
        mask = (labels != IGNORE_INDEX) & ~torch.isin(labels, ignore_ids)
        ok = ((logits.argmax(-1) == labels) | ~mask).all(dim=1)
        has = mask.any(dim=1)
        correct += (ok & has).sum()
        total += has.sum()
    model.train()
    return float(correct) / max(int(total), 1)


def learning_rate_at(step: int, peak: float, warmup: int, decay_steps: int = 0, min_ratio: float = 0.1) -> float:
    """The outer lr of a stage's `step` (0-based): linear warmup to `peak` over `warmup` steps, then constant
    (decay_steps 0) or a linear decay to min_ratio * peak over `decay_steps` steps, constant after that."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay_steps <= 0:
        return peak
    done = min(1.0, (step - warmup) / decay_steps)
    return peak * (1.0 - (1.0 - min_ratio) * done)


def parse_stages(items, target):
    stages = []
    for i, item in enumerate(items):
        n, _, threshold = str(item).partition(":")
        stages.append((int(n), float(threshold) if threshold else target))
    return stages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["8"],
                        help="N[:threshold] per stage; move on when eval exact match >= threshold (default --target)")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=300, help="linear warmup of the first stage")
    parser.add_argument("--stage_warmup_steps", type=int, default=100, help="linear warmup of every later stage")
    parser.add_argument("--stage_learning_rate", type=float, default=5e-4,
                        help="outer lr of every stage after the first")
    parser.add_argument("--stage_decay_steps", type=int, default=36000,
                        help="later stages: after the warmup, decay the lr linearly to --min_lr_ratio of it over this "
                             "many steps, constant after (0: constant throughout)")
    parser.add_argument("--min_lr_ratio", type=float, default=0.1)
    parser.add_argument("--adam_beta2", type=float, default=0.95)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--inner_lr", type=float, default=0.04)
    parser.add_argument("--n_mem_tokens", type=int, default=8)
    parser.add_argument("--attn_implementation", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_samples", type=int, default=1000)
    parser.add_argument("--time_budget", type=float, default=900, help="seconds of wall time for all stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_prefix", default=None, help="writes PREFIX.md, PREFIX.png and PREFIX.jsonl")
    args = parser.parse_args(argv)
    if args.stage_decay_steps < 0 or not 0 <= args.min_lr_ratio <= 1 or not 0 < args.adam_beta2 < 1:
        parser.error("need --stage_decay_steps >= 0, 0 <= --min_lr_ratio <= 1 and 0 < --adam_beta2 < 1")
    if not torch.cuda.is_available():
        raise SystemExit("bench_learning.py needs a CUDA device")
    stages = parse_stages(args.stages, args.target)
    started = time.time()
    tokenizer = kv_dataset_utils.load_kv_tokenizer(62)
    ignore_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in ("!", "|")], device="cuda")
    model = paper_kv_model(args.attn_implementation, seed=args.seed, n_mem_tokens=args.n_mem_tokens, K=args.K,
                           inner_lr=args.inner_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    log, reached = [], {}
    total_steps = 0
    for index, (n_pairs, threshold) in enumerate(stages):
        train = KVStream(n_pairs, tokenizer, seed=args.seed, stream=kv_dataset_utils.TRAIN_STREAM,
                         batch_size=args.batch_size)
        check_against_collator(train)
        valid = {k: v.cuda() for k, v in KVStream(n_pairs, tokenizer, seed=0, stream=kv_dataset_utils.VALID_STREAM,
                                                    batch_size=args.batch_size).take(args.eval_samples).items()}
        peak, warmup, decay = (args.learning_rate, args.warmup_steps, 0) if index == 0 else (
            args.stage_learning_rate, args.stage_warmup_steps, args.stage_decay_steps)
        optimizer = torch.optim.AdamW(params, lr=peak, betas=(0.9, args.adam_beta2), weight_decay=0.0)  # as the trainer
        step_fn = CapturedTrainStep(model, optimizer, max_grad_norm=args.max_grad_norm, precision=args.precision)
        step, em = 0, 0.0
        while True:
            lr = learning_rate_at(step, peak, warmup, decay, args.min_lr_ratio)
            optimizer.param_groups[0]["lr"] = lr
            out = step_fn(train.next_batch())
            step += 1
            total_steps += 1
            if step % args.eval_every == 0:
                with precision_flags(args.precision):
                    em = exact_match(model, valid, ignore_ids)
                wall = time.time() - started
                record = {"stage": index, "N": n_pairs, "step": step, "total_steps": total_steps, "wall_s": wall,
                          "exact_match": em, "loss": out.loss.item(), "lr": lr, **step_fn.skip_counts()}
                log.append(record)
                print(json.dumps(record), flush=True)
                if em >= args.target and n_pairs not in reached:
                    reached[n_pairs] = wall
                if em >= threshold or wall > args.time_budget:
                    break
        if em < threshold:
            print(f"stage N{n_pairs} stopped by the time budget at exact match {em:.3f}", flush=True)
            break
        del step_fn
    write_results(args, stages, log, reached, started)


def write_results(args, stages, log, reached, started):
    lines = [f"# Time to accuracy, GradMem on KV retrieval ({' -> '.join(f'N{n}' for n, _ in stages)})", "",
             f"- card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; git commit "
             f"{git_commit()}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- recipe: batch {args.batch_size}, AdamW (betas 0.9, {args.adam_beta2:g}) lr {args.learning_rate:g} "
             f"(warmup {args.warmup_steps}, then constant); later stages lr {args.stage_learning_rate:g} (warmup "
             f"{args.stage_warmup_steps}, then "
             + (f"linear decay to {args.min_lr_ratio:g}x over {args.stage_decay_steps} steps" if args.stage_decay_steps
                else "constant")
             + f"), clip {args.max_grad_norm:g}, K={args.K}, inner lr "
             f"{args.inner_lr:g}, {args.n_mem_tokens} memory tokens, attention {args.attn_implementation}, "
             f"precision {args.precision}; stages {', '.join(f'N{n} until EM >= {t:g}' for n, t in stages)}",
             f"- wall time counts everything from the first step (data, graph recording, compilation, evaluation "
             f"every {args.eval_every} steps on {args.eval_samples} held-out samples)", ""]
    for n, _ in stages:
        lines.append(f"- N{n}: exact match >= {args.target:g} "
                     + (f"after **{reached[n]:.0f} s** of wall time" if n in reached else "**not reached**"))
    lines += ["", "| stage | N | step | wall s | exact match | train loss | skipped steps |", "|---|---|---|---|---|---|---|"]
    for r in log:
        lines.append(f"| {r['stage']} | {r['N']} | {r['step']} | {r['wall_s']:.1f} | {r['exact_match']:.3f} | "
                     f"{r['loss']:.4f} | {r['skipped_steps']} |")
    text = "\n".join(lines) + f"\n\nTotal {time.time() - started:.0f} s.\n"
    print(text)
    if args.out_prefix:
        prefix = Path(args.out_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(text)
        prefix.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        plot(log, stages, args.target, prefix.with_suffix(".png"))


def plot(log, stages, target, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (n, _) in enumerate(stages):
        points = [(r["wall_s"], r["exact_match"]) for r in log if r["stage"] == index]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=2, label=f"N{n}")
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("eval exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"GradMem KV time to accuracy ({torch.cuda.get_device_name(0)})", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
