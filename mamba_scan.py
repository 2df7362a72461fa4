"""Mamba's selective scan as a parallel scan, for training the Mamba baseline without the mamba_ssm CUDA kernels.

Without `mamba_ssm`, transformers' MambaMixer scans with a Python loop over positions that indexes
`discrete_A[:, :, t]`; autograd then fills a full-size zero tensor per position in the backward (O(L^2) memory
traffic: 30 s per step on the CPU at batch 64, 60 tokens, where a Llama of the same width takes 0.3 s).
`linear_scan` computes h_t = a_t h_{t-1} + b_t by a doubling scan (log2 L shifted multiply-adds) and its backward
by the same scan run in reverse; `use_parallel_scan(model)` makes every MambaMixer compute its cache-less forward
(training, evaluation, generation without a cache) with it, exactly as transformers' torch path does (same dtype
casts), and leaves cached calls (generation with a cache) to transformers. No parameter or state-dict key changes.
"""
import importlib.util
import types

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _doubling_scan(links: torch.Tensor, x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """h_t = links_{t-1} h_{t-1} + x_t along `dim` (h_{-1} = 0), or in reverse h_t = links_t h_{t+1} + x_t (h_L = 0);
    links_l joins positions l and l+1 (one fewer than x along dim). x is not modified.

    Hillis-Steele: window[w] holds the product of the `shift` links from w on, and after the step of shift s every
    h_t sums the 2s inputs nearest it on its side, so log2(L) steps complete it. Only decays are multiplied (no
    division, no exp of a positive number): stable for |links| <= 1. h and the windows each alternate between two
    buffers (a step reads h_{t-s} while it writes h_t, so it cannot work in place)."""
    length, shift, step = x.shape[dim], 1, 0
    h, window, h_buffers, window_buffers = x, links, [], []
    while shift < length:
        if len(h_buffers) < 2:
            h_buffers.append(torch.empty_like(x))
        out = h_buffers[step % 2]
        kept = length - shift  # positions that take a term; the other `shift` are complete
        target, source, done = (0, shift, kept) if reverse else (shift, 0, 0)
        torch.addcmul(h.narrow(dim, target, kept), window.narrow(dim, 0, kept), h.narrow(dim, source, kept),
                      out=out.narrow(dim, target, kept))
        out.narrow(dim, done, shift).copy_(h.narrow(dim, done, shift))
        h = out
        if 2 * shift < length:  # windows of 2s links, as many as the next step reads
            if len(window_buffers) < 2:
                window_buffers.append(torch.empty_like(links.narrow(dim, 0, length - 2)))
            count = length - 2 * shift
            window = torch.mul(window.narrow(dim, 0, count), window.narrow(dim, shift, count),
                               out=window_buffers[step % 2].narrow(dim, 0, count))
        shift, step = 2 * shift, step + 1
    return x.clone() if h is x else h


class LinearScan(torch.autograd.Function):
    """h = linear_scan(a, b): forward and backward by the doubling scan, saving only a and h (first order only)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        h = _doubling_scan(a.narrow(dim, 1, a.shape[dim] - 1), b, dim)  # a_0 multiplies h_{-1} = 0
        ctx.save_for_backward(a, h)
        ctx.dim = dim
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        dim = ctx.dim
        length = a.shape[dim]
        # g_t = dL/db_t = grad_h_t + a_{t+1} g_{t+1}: the same links, scanned in reverse
        g = _doubling_scan(a.narrow(dim, 1, length - 1), grad_h, dim, reverse=True)
        grad_a = None
        if ctx.needs_input_grad[0]:  # dL/da_t = g_t h_{t-1}, h_{-1} = 0
            grad_a = torch.empty_like(g)
            grad_a.narrow(dim, 0, 1).zero_()
            torch.mul(g.narrow(dim, 1, length - 1), h.narrow(dim, 0, length - 1), out=grad_a.narrow(dim, 1, length - 1))
        return grad_a, g if ctx.needs_input_grad[1] else None, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along `dim` (h_{-1} = 0) for a, b of one shape; differentiable once (a double
    backward raises)."""
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape")
    dtype = torch.result_type(a, b)
    return LinearScan.apply(a.to(dtype), b.to(dtype), dim % a.dim())


def _mask_padding(states: torch.Tensor, attention_mask) -> torch.Tensor:
    """transformers' apply_mask_to_padding_states: zero the (B, L, ...) states of padding positions."""
    if attention_mask is None:
        return states
    return (states * attention_mask[:, :, None]).to(states.dtype)


def selective_scan_forward(mixer, hidden_states: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """A transformers MambaMixer's forward without a cache, the scan parallel: the same operations and dtype casts
    as its torch path (in_proj, conv, x_proj, dt_proj, `mamba_selective_scan`, out_proj); (B, L, H) -> (B, L, H)."""
    dtype, length = hidden_states.dtype, hidden_states.shape[1]
    rank, n_state = mixer.time_step_rank, mixer.ssm_state_size
    x, gate = mixer.in_proj(_mask_padding(hidden_states, attention_mask)).chunk(2, dim=-1)  # (B, L, D) each
    conv_weight = mixer.conv1d.weight  # (D, 1, K), padding K - 1 on both sides: keep the first L outputs (causal)
    x_conv = mixer.act(mixer.conv1d(x.transpose(1, 2).to(conv_weight.dtype))[..., :length]).to(x.dtype)
    x = _mask_padding(x_conv.transpose(1, 2), attention_mask)  # (B, L, D)
    dt, B, C = torch.split(mixer.x_proj(x), [rank, n_state, n_state], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
    dt = F.linear(dt, mixer.dt_proj.weight)  # (B, L, D); the bias, rounded to float32, added as transformers does
    dt = F.softplus(dt + mixer.dt_proj.bias.float().to(dt.dtype))
    A = -torch.exp(mixer.A_log.float())  # (D, N)
    decay = torch.exp(A * dt[..., None])  # (B, L, D, N): exp(A dt)
    inputs = (dt * x.float())[..., None] * B.float()[:, :, None, :]  # (B, L, D, N): dt B x
    states = linear_scan(decay, inputs, dim=1)  # (B, L, D, N): h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t
    y = torch.matmul(states.to(x.dtype), C[..., None]).squeeze(-1)  # (B, L, D): C_t h_t
    y = (y + x * mixer.D.float()) * F.silu(gate)
    return mixer.out_proj(y.to(dtype))


def _parallel_scan_mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """MambaMixer.forward with the parallel scan when there is no cache; a cache (generation; `cache` in recent
    transformers, `cache_params` in older ones) or any other argument goes to transformers' own forward."""
    if cache is not None or any(value is not None for value in kwargs.values()):
        cache_arg = () if cache is None else (cache,)  # positional: `cache` or `cache_params` by version
        return type(self).forward(self, hidden_states, *cache_arg, attention_mask=attention_mask, **kwargs)
    return selective_scan_forward(self, hidden_states, attention_mask)


def use_parallel_scan(model) -> int:
    """Make every MambaMixer of `model` use the parallel scan for cache-less calls; the number of mixers that use
    it (0 when mamba_ssm is installed: transformers then runs its fused kernels, faster). Idempotent."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        return 0
    from transformers.models.mamba.modeling_mamba import MambaMixer

    mixers = [module for module in model.modules() if type(module) is MambaMixer]
    for mixer in mixers:
        mixer.forward = types.MethodType(_parallel_scan_mixer_forward, mixer)
    return len(mixers)
