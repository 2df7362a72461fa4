"""How stable a checkpoint's WRITE is: the curvature of its inner loss along the WRITE, against its inner lr.

A WRITE step is m <- m - lr grad L(m) on one sample's memory m [M, d]. Its Jacobian is J = I - lr H (H: the Hessian
of the sample's inner loss in m), and the outer (second-order) gradient passes through the product of the K steps'
Jacobians. A step amplifies a perturbation of the memory, and with it the outer gradient, when lr x lambda_max(H) > 2
or lambda_min(H) < 0 (then |1 - lr lambda| > 1). For each checkpoint, on fresh test samples (as
evaluate_kv_checkpoints.py draws them), on the CPU, this finds per sample and WRITE step the extreme eigenvalues of H
by power iteration on Hessian-vector products (double backward, eager attention) and prints per step: lr x
lambda_max and lr x lambda_min (median and extremes over the samples), the largest step gain rho = max |1 - lr lambda|,
the share of samples with rho > 1, and per sample the product of the K gains (a bound of the WRITE's amplification).
The power iteration's Rayleigh quotients lie inside the spectrum (lambda_max at most the true one, lambda_min at least),
so with few --iterations the gains printed are lower bounds. Plain SGD WRITEs on the memory only (no inner Adam,
clipping or per-sample projection).

    python bench/kv_write_curvature.py results/kv_checkpoints/N64 results/kv_checkpoints/N96 --samples 50
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_write_diagnostics as diagnostics  # noqa: E402
from evaluate_kv_checkpoints import fresh_batches  # noqa: E402


def load(folder: Path, K=None, inner_lr=None):
    """(model writing with K steps at inner_lr, default the checkpoint's own, with eager attention, which has a double
    backward everywhere; its tokenizer). Refuses a WRITE this analysis does not describe."""
    model, tokenizer = diagnostics.load(folder, K, inner_lr)
    model.model.set_attn_implementation("eager")
    config = model.config
    if config.use_adam or config.inner_clip_value is not None or config.inner_clip_norm is not None \
            or config.mem_proj_mode == "per_sample":
        raise SystemExit(f"{folder}: its WRITE is not plain SGD on the memory (inner Adam, clipping or per-sample "
                         "projection); this analysis covers m <- m - lr grad L(m) only")
    return model, tokenizer


def extreme_eigenvalues(hvp, shape, dtype, iterations: int, generator: torch.Generator) -> tuple:
    """(lambda_max, lambda_min) [B] each, of the per-sample symmetric operators hvp (a batch of vectors of `shape`
    [B, ...] -> H v per sample), by power iteration: first the eigenvalue of largest magnitude, then the other end of
    the spectrum from the operator shifted by it."""
    def power(apply):
        v = torch.randn(shape, generator=generator, dtype=dtype)
        value = None
        for _ in range(iterations):
            v = v / torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, *[1] * (len(shape) - 1))
            w = apply(v)
            value = (v * w).flatten(1).sum(dim=1)  # Rayleigh quotient of the unit vector
            v = w
        return value

    first = power(hvp)
    shift = first.view(-1, *[1] * (len(shape) - 1))
    second = power(lambda v: hvp(v) - shift * v) + first  # the eigenvalue farthest from the first
    return torch.maximum(first, second), torch.minimum(first, second)


def write_curvature(model, context_input_ids: torch.Tensor, pad_id: int, iterations: int, seed: int) -> list:
    """Per WRITE step k: (lambda_max [B], lambda_min [B]) of the inner loss's Hessian in the memory, along the
    model's own WRITE of the batch."""
    K, lr = model.write_steps()
    token_mask = context_input_ids != pad_id
    n_tokens = token_mask.sum(dim=1)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(context_input_ids)
    memory = model._initial_fast_weights(context_input_ids.shape[0])[0].detach()
    generator = torch.Generator().manual_seed(seed)
    steps, state = [], []
    for k in range(K):
        m = memory.clone().requires_grad_()
        # the model's own WRITE step, its inner gradient kept differentiable
        (memory,), state, _, (grad,) = model._write_step(k, lr, context_input_ids, token_mask, n_tokens, [m], state,
                                                         embeds, create_graph=True)

        def hvp(v):  # per sample: the samples' memories are independent, so the sum's Hessian is block diagonal
            return torch.autograd.grad(grad, m, v, retain_graph=True)[0].detach()

        steps.append(extreme_eigenvalues(hvp, m.shape, m.dtype, iterations, generator))
        memory = memory.detach()
    return steps


def analyse(folder: Path, n_pairs: int, samples: int, data_seed: int, batch_size: int, iterations: int,
            K=None, inner_lr=None) -> dict:
    model, tokenizer = load(folder, K, inner_lr)
    per_step = None
    for i, batch in enumerate(fresh_batches(tokenizer, n_pairs, samples, data_seed, batch_size)):
        steps = write_curvature(model, batch["context_input_ids"], tokenizer.pad_token_id, iterations, seed=i)
        if per_step is None:
            per_step = [([], []) for _ in steps]
        for (maxima, minima), (top, bottom) in zip(per_step, steps):
            maxima.append(top)
            minima.append(bottom)
    K, lr = model.write_steps()
    rows, gains = [], []
    for maxima, minima in per_step:
        top, bottom = torch.cat(maxima) * lr, torch.cat(minima) * lr  # lr x lambda per sample
        gain = torch.maximum((1 - top).abs(), (1 - bottom).abs())
        gains.append(gain)
        rows.append({"lr_lambda_max": top.tolist(), "lr_lambda_min": bottom.tolist(), "gain": gain.tolist()})
    product = torch.stack(gains).prod(dim=0)
    return {"K": K, "inner_lr": lr, "steps": rows, "product": product.tolist()}


def spread(values: list) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    diagnostics.sample_arguments(parser)
    parser.add_argument("--iterations", type=int, default=30, help="power iterations per eigenvalue")
    parser.add_argument("--K", type=int, default=None, help="WRITE steps (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.K is not None and args.K < 1 or args.iterations < 2:
        parser.error(f"need --K >= 1 and --iterations >= 2, got {args.K} and {args.iterations}")
    folders = diagnostics.checkpoint_pairs(parser, args)
    print("| checkpoint | K / inner lr | WRITE step | lr x lambda_max: median [min, max] | lr x lambda_min | "
          "gain max abs(1 - lr lambda): median [min, max] | samples with gain > 1 |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for folder, n_pairs in folders:
        r = analyse(folder, n_pairs, args.samples, args.data_seed, args.batch_size, args.iterations, args.K,
                    args.inner_lr)
        for k, step in enumerate(r["steps"], start=1):
            above = sum(g > 1 for g in step["gain"])
            print(f"| {folder} | {r['K']} / {r['inner_lr']:g} | {k} | {spread(step['lr_lambda_max'])} | "
                  f"{spread(step['lr_lambda_min'])} | {spread(step['gain'])} | {above} / {len(step['gain'])} |")
        print(f"| {folder} | {r['K']} / {r['inner_lr']:g} | product of the {r['K']} gains | | | "
              f"{spread(r['product'])} | {sum(p > 1 for p in r['product'])} / {len(r['product'])} |", flush=True)
        results.append({**r, "folder": folder, "N": n_pairs})
    return results


if __name__ == "__main__":
    main()
