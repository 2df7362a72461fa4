"""Exact attention in PyTorch with a closed-form first and second derivative.

`exact_attention(q, k, v, ...)` computes softmax(scale * q k^T + mask) v like eager attention. Its backward is
itself an autograd.Function whose backward is the closed-form double backward, so `torch.autograd.grad(...,
create_graph=True)` through it gives exact second-order gradients (the ones GradMem's meta-gradient needs) while
storing only q, k, v, the log-sum-exp and the masks: no probability matrix is kept between the passes, each pass
recomputes it. It materialises [B, H, Lq, Lk] tensors inside a pass (it is the CPU fallback and the reference the
Triton kernels are tested against). A third derivative is not supported and raises.

Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] with Hq a multiple of Hkv (grouped-query
attention: query head h reads key/value head h // (Hq // Hkv); k and v are never repeated in memory).
Output [B, Hq, Lq, Dv].

Masks (all optional, combined):
- is_causal: query i sees key j iff j <= i + (Lk - Lq), i.e. the causal diagonal is aligned to the bottom-right
  corner, as for a query block that follows Lk - Lq cached keys. With Lq == Lk this is the usual causal mask.
- key_padding_mask: [B, Lk] bool, True = the key is a real token.
- attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Lq, Lk] (transformers' 4D masks).
  Additive masks are constants (no gradient flows into them).
A query row that sees no key at all (bool masks only) gets output 0 and zero gradients.

Half-precision inputs are computed in float32 internally and the results cast back. Dropout is supported with one
mask sampled in the forward and reused by both backward levels, so the second derivative is that of the same
random function.
"""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _query_groups(x: torch.Tensor, n_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A query-shaped tensor [B, Hq, L, D] as [B, Hkv, G, L, D]: the G query heads of each key/value head."""
    B, Hq, L, D = x.shape
    return x.to(dtype).reshape(B, n_kv_heads, Hq // n_kv_heads, L, D)


def _kv_groups(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A key/value-shaped tensor [B, Hkv, L, D] as [B, Hkv, 1, L, D], broadcast over the G query heads (no copy)."""
    return x.to(dtype).unsqueeze(2)


def check_attention_inputs(q, k, v, attn_mask=None, key_padding_mask=None):
    """Validate shapes; returns (B, Hq, Hkv, G, Lq, Lk). Raises ValueError naming the problem."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4D [batch, heads, length, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise ValueError(
            f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q [B, Hq, Lq, D], "
            "k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]"
        )
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Lk) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape [B, Lk] = {(B, Lk)} (True = real token); got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
    if attn_mask is not None:
        if attn_mask.dim() != 4:
            raise ValueError(f"attn_mask must be 4D, broadcastable to [B, Hq, Lq, Lk]; got {tuple(attn_mask.shape)}")
        mb, mh, mq, mk = attn_mask.shape
        if mb not in (1, B) or mh not in (1, Hq) or mq not in (1, Lq) or mk != Lk:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {(B, Hq, Lq, Lk)}"
            )
        if attn_mask.requires_grad:
            raise ValueError("attn_mask requires grad; masks are constants here (detach it, or use eager attention)")
    return B, Hq, Hkv, Hq // Hkv, Lq, Lk


def build_bias(q, k, *, is_causal=False, attn_mask=None, key_padding_mask=None) -> Optional[torch.Tensor]:
    """The additive score bias (0 / -inf / float mask values) broadcastable to [B, Hkv, G, Lq, Lk], or None."""
    B, Hq, Hkv, G, Lq, Lk = check_attention_inputs(q, k, k, attn_mask, key_padding_mask)
    dtype = _compute_dtype(q.dtype)
    bias = None
    keep = None  # bool, True = attend
    if is_causal:
        rows = torch.arange(Lq, device=q.device)[:, None]
        cols = torch.arange(Lk, device=q.device)[None, :]
        keep = (cols <= rows + (Lk - Lq))[None, None, None]  # [1, 1, 1, Lq, Lk]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, None, :]  # [B, 1, 1, 1, Lk]
        keep = kp if keep is None else keep & kp
    if attn_mask is not None:
        mb, mh, mq, mk = attn_mask.shape
        m5 = attn_mask.reshape(mb, Hkv, G, mq, mk) if mh == Hq else attn_mask.reshape(mb, 1, 1, mq, mk)
        if attn_mask.dtype == torch.bool:
            keep = m5 if keep is None else keep & m5
        else:
            bias = m5.to(dtype)
    if keep is not None:
        keep_bias = torch.zeros(keep.shape, dtype=dtype, device=q.device).masked_fill(~keep, float("-inf"))
        bias = keep_bias if bias is None else bias + keep_bias
    return bias


def _probabilities(q5, k5, bias, scale, lse=None):
    """P = softmax(scale * q k^T + bias) [B, Hkv, G, Lq, Lk] and its row log-sum-exp; empty rows give P = 0."""
    s = torch.matmul(q5, k5.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if lse is None:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [B, Hkv, G, Lq, 1]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # empty row: exp(-inf - 0) = 0
    return torch.exp(s - lse_safe), lse


class _ExactAttention(torch.autograd.Function):
    """o = softmax(scale q k^T + bias) v. Saves q, k, v, lse (and the dropout mask), never P."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, dropout_p):
        B, Hq, Lq, D = q.shape
        Hkv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        q5, k5, v5 = _query_groups(q, Hkv, cdt), _kv_groups(k, cdt), _kv_groups(v, cdt)
        p, lse = _probabilities(q5, k5, bias, scale)
        dropout_scale = None
        if dropout_p > 0.0:
            dropout_scale = (torch.rand_like(p) >= dropout_p).to(cdt) / (1.0 - dropout_p)  # [B, Hkv, G, Lq, Lk]
            p = p * dropout_scale
        out = torch.matmul(p, v5).reshape(B, Hq, Lq, v.shape[-1]).to(q.dtype)
        ctx.save_for_backward(q, k, v, lse, bias, dropout_scale)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse, bias, dropout_scale = ctx.saved_tensors
        dq, dk, dv = _ExactAttentionBackward.apply(grad_out, q, k, v, lse, bias, dropout_scale, ctx.scale)
        return dq, dk, dv, None, None, None


def _first_order(q5, k5, v5, do5, lse, bias, dropout_scale, scale):
    """Shared by both backward levels: P, the (dropout-scaled) dP, its row sums D and dS."""
    p, _ = _probabilities(q5, k5, bias, scale, lse)
    dp = torch.matmul(do5, v5.transpose(-1, -2))  # d loss / d (P * Z)
    if dropout_scale is not None:
        dp = dp * dropout_scale  # d loss / d P
    row = (p * dp).sum(-1, keepdim=True)  # D [B, Hkv, G, Lq, 1]
    ds = p * (dp - row)
    return p, dp, row, ds


class _ExactAttentionBackward(torch.autograd.Function):
    """(dO, q, k, v) -> (dq, dk, dv), with a closed-form backward (the attention double backward)."""

    @staticmethod
    def forward(ctx, grad_out, q, k, v, lse, bias, dropout_scale, scale):
        B, Hq, Lq, D = q.shape
        Hkv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        q5, k5, v5 = _query_groups(q, Hkv, cdt), _kv_groups(k, cdt), _kv_groups(v, cdt)
        do5 = _query_groups(grad_out, Hkv, cdt)
        p, dp, row, ds = _first_order(q5, k5, v5, do5, lse, bias, dropout_scale, scale)
        pz = p if dropout_scale is None else p * dropout_scale
        dq = (torch.matmul(ds, k5) * scale).reshape(B, Hq, Lq, D)
        dk = (torch.matmul(ds.transpose(-1, -2), q5) * scale).sum(2)
        dv = torch.matmul(pz.transpose(-1, -2), do5).sum(2)
        ctx.save_for_backward(grad_out, q, k, v, lse, bias, dropout_scale)
        ctx.scale = scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        # Cotangents gq, gk, gv of (dq, dk, dv); returns d/d(dO, q, k, v) of <gq, dq> + <gk, dk> + <gv, dv>.
        grad_out, q, k, v, lse, bias, dropout_scale = ctx.saved_tensors
        scale = ctx.scale
        B, Hq, Lq, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        cdt = _compute_dtype(q.dtype)
        q5, k5, v5 = _query_groups(q, Hkv, cdt), _kv_groups(k, cdt), _kv_groups(v, cdt)
        do5 = _query_groups(grad_out, Hkv, cdt)
        gq5 = torch.zeros_like(q5) if gq is None else _query_groups(gq, Hkv, cdt)
        gk5 = torch.zeros_like(k5) if gk is None else _kv_groups(gk, cdt)
        gv5 = torch.zeros_like(v5) if gv is None else _kv_groups(gv, cdt)

        p, dp, row, ds = _first_order(q5, k5, v5, do5, lse, bias, dropout_scale, scale)
        z = dropout_scale
        pz = p if z is None else p * z
        # bar_ds = d phi / d dS = scale (gq k^T + q gk^T)            [B, Hkv, G, Lq, Lk]
        bar_ds = (torch.matmul(gq5, k5.transpose(-1, -2)) + torch.matmul(q5, gk5.transpose(-1, -2))) * scale
        beta = (p * bar_ds).sum(-1, keepdim=True)
        bar_dp = p * (bar_ds - beta)  # d phi / d dP
        bar_dpz = bar_dp if z is None else bar_dp * z  # d phi / d (dO v^T)
        do_gv = torch.matmul(do5, gv5.transpose(-1, -2))
        if z is not None:
            do_gv = do_gv * z
        bar_p = do_gv + bar_ds * (dp - row) - dp * beta  # d phi / d P
        bar_s = p * (bar_p - (p * bar_p).sum(-1, keepdim=True))  # through the softmax

        d_grad_out = (torch.matmul(bar_dpz, v5) + torch.matmul(pz, gv5)).reshape(B, Hq, Lq, Dv)
        d_q = ((torch.matmul(bar_s, k5) + torch.matmul(ds, gk5)) * scale).reshape(B, Hq, Lq, D)
        d_k = ((torch.matmul(bar_s.transpose(-1, -2), q5) + torch.matmul(ds.transpose(-1, -2), gq5)) * scale).sum(2)
        d_v = torch.matmul(bar_dpz.transpose(-1, -2), do5).sum(2)
        return (
            d_grad_out.to(grad_out.dtype), d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype),
            None, None, None, None,
        )


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(scale q k^T + masks) v with exact first and second derivatives. See the module docstring."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    bias = build_bias(q, k, is_causal=is_causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    if v.shape[:3] != k.shape[:3]:
        check_attention_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ExactAttention.apply(q, k, v, bias, scale, float(dropout_p))


def naive_attention(q, k, v, *, is_causal=False, attn_mask=None, key_padding_mask=None, scale=None):
    """Plain differentiable-by-autograd attention (repeats k/v for GQA): the independent check in the tests."""
    bias = build_bias(q, k, is_causal=is_causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    q5 = q.reshape(B, Hkv, G, Lq, D)
    s = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    visible = (s > float("-inf")).any(-1, keepdim=True)  # rows without any visible key -> P = 0
    p = torch.softmax(torch.where(visible, s, torch.zeros_like(s)), dim=-1) * visible
    return torch.matmul(p, v.unsqueeze(2)).reshape(B, Hq, Lq, v.shape[-1])
