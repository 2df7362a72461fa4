"""Fused attention in Triton with an exact double backward; no pass ever writes a [Lq, Lk] matrix to memory.

`fused_attention(q, k, v, is_causal=..., attn_mask=..., key_padding_mask=..., scale=...)` computes the same function
as `reference.exact_attention` (same shapes, masks, causal alignment, empty-row convention; no dropout) and is
differentiable twice:

- forward: flash-attention style, saves the row log-sum-exp (LSE, base 2) besides q, k, v, o.
- backward (an autograd.Function of its own): D = rowsum(dO * o), then dk, dv in a key-parallel pass and dq in a
  query-parallel pass, recomputing P = exp2(S - LSE) blockwise.
- double backward: for cotangents (gq, gk, gv) of (dq, dk, dv), with Bbar = scale (gq k^T + q gk^T):
    pass 1 (query rows):  beta = rowsum(P * Bbar),  gamma = rowsum(P * Pbar), where
                          Pbar = dO gv^T + Bbar * (dP - D) - dP * beta, so
                          gamma = rowsum(P * (dO gv^T)) + rowsum(P * Bbar * dP) - 2 D beta
    pass 2 (query rows):  d dO = (P * (Bbar - beta)) v + P gv,   dq = scale (Sbar k + dS gk)
    pass 3 (key columns): dk = scale (Sbar^T q + dS^T gq),     dv = (P * (Bbar - beta))^T dO
  with dS = P * (dP - D) and Sbar = P * (Pbar - gamma). Each pass recomputes P, dP and Bbar tile by tile.

Inputs: q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] (Hq a multiple of Hkv: grouped-query attention without repeating
k/v), D in {16, 32, 64, 128}, float32 / bfloat16 / float16, any Lq and Lk (tails are masked in the kernels).
float32 uses IEEE fp32 dot products unless `torch.backends.cuda.matmul.fp32_precision` is "tf32" (what the legacy
`allow_tf32 = True` also sets), then TF32.
Masks: `is_causal` (bottom-right aligned: key j visible to query i iff j <= i + Lk - Lq), `key_padding_mask`
[B, Lk] bool (True = real key), `attn_mask` bool broadcastable to [B, Hq, Lq, Lk] (True = attend; loaded tile by
tile, never expanded). Rows that see no key give 0 and zero gradients. A third derivative raises.
Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (slow; for tests on tiny shapes). Block sizes come from a
heuristic per head dim and dtype; GRADMEM_ATTN_AUTOTUNE=1 autotunes them instead (bf16/fp16/TF32; about a minute
of compilation on first use, then a benchmark per length bucket; bench/results/attention_h100.md used it). Warm
up (one step) before capturing a CUDA graph: compilation and autotuning cannot happen during capture.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .hf_integration import FUSED_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from .reference import check_attention_inputs

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------------------------
# kernels
#
# Every kernel walks one dimension of the [Lq, Lk] score matrix tile by tile. Tiles that all queries of the block
# may see entirely (below the causal diagonal, no padding or bool mask) skip the visibility test: the loops are
# split into an unmasked and a masked range. Out-of-range rows and keys are loaded as zeros; the masked tiles
# exclude them explicitly, and in the unmasked ones they provably contribute nothing to stored outputs (zero q, dO,
# gq rows give zero dS, Sbar, dP terms; the row kernels never put a key tail into an unmasked tile).


@triton.jit
def _visible(q_idx, k_idx, Lq, Lk, causal_off, kpm_ptr, mask_ptr, stride_mq, stride_mk,
             IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool tile: may query q_idx see key k_idx? (q_idx, k_idx broadcast against each other.)"""
    inside = (q_idx < Lq) & (k_idx < Lk)
    visible = inside
    if IS_CAUSAL:
        visible = visible & (k_idx <= q_idx + causal_off)
    if HAS_KPM:
        keep = tl.load(kpm_ptr + k_idx, mask=k_idx < Lk, other=0)
        visible = visible & (keep != 0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + q_idx * stride_mq + k_idx * stride_mk, mask=inside, other=0)
        visible = visible & (keep != 0)
    return visible


@triton.jit
def _key_ranges(start_m, Lk, causal_off, IS_CAUSAL: tl.constexpr, ANY_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a query block: keys [0, full_end) are visible to all its rows, [full_end, hi) need the mask test."""
    hi = Lk
    full_end = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_off)
        full_end = tl.minimum(Lk, start_m * BLOCK_M + causal_off + 1)
    full_end = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N
    if ANY_MASK:
        full_end = 0
    return full_end, hi


@triton.jit
def _query_ranges(start_n, Lq, causal_off, IS_CAUSAL: tl.constexpr, ANY_MASK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a key block: query blocks in [lo, full_start) need the mask test, [full_start, Lq) see all its keys."""
    lo = 0
    full_start = 0
    if IS_CAUSAL:
        lo = (tl.maximum(0, start_n * BLOCK_N - causal_off) // BLOCK_M) * BLOCK_M
        first_full_row = tl.maximum(0, start_n * BLOCK_N + BLOCK_N - 1 - causal_off)
        full_start = tl.maximum(lo, tl.cdiv(first_full_row, BLOCK_M) * BLOCK_M)
    if ANY_MASK:
        full_start = Lq
    full_start = tl.minimum(full_start, Lq)
    return lo, full_start


@triton.jit
def _tile_offsets(base, offs, offs_d, L, HEAD_DIM: tl.constexpr):
    """Element offsets of the rows `offs` of a row-major [L, HEAD_DIM] matrix that starts at `base`, and the mask of
    the rows that exist (< L): what every kernel loads its q/k/v-shaped tiles with."""
    return base + offs[:, None] * HEAD_DIM + offs_d[None, :], offs[:, None] < L


@triton.jit
def _row_program(Q, KPM, MASK, stride_kpm_b, stride_mb, stride_mh, Hq, G, Lq, Lk, causal_off,
                 IS_CAUSAL: tl.constexpr, ANY_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Start of a query-parallel kernel (one program per query block and b * Hq + h): offsets, the key/value
    head's offset kv_off, KPM and MASK moved to this batch row and head, the q tile, the key ranges to walk."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * Hq + h
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // G) + h // G  # key/value head of this query head
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ptrs, row_in = _tile_offsets(bh * Lq * HEAD_DIM, offs_m, offs_d, Lq, HEAD_DIM)
    q = tl.load(Q + row_ptrs, mask=row_in, other=0.0)
    full_end, hi = _key_ranges(start_m, Lk, causal_off, IS_CAUSAL, ANY_MASK, BLOCK_M, BLOCK_N)
    return (bh, offs_m, offs_d, row_ptrs, row_in, bhk * Lk * HEAD_DIM, KPM + b * stride_kpm_b,
            MASK + b * stride_mb + h * stride_mh, q, full_end, hi)


@triton.jit
def _col_program(K, V, KPM, stride_kpm_b, Hq, G, Lq, Lk, causal_off,
                 IS_CAUSAL: tl.constexpr, ANY_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Start of a key-parallel kernel (one program per key block and b * Hkv + hk): batch row b, key/value head hk,
    offsets, KPM moved to row b, the k and v tiles, the query ranges to walk."""
    start_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # b * Hkv + hk
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ptrs, col_in = _tile_offsets(bhk * Lk * HEAD_DIM, offs_n, offs_d, Lk, HEAD_DIM)
    k = tl.load(K + col_ptrs, mask=col_in, other=0.0)
    v = tl.load(V + col_ptrs, mask=col_in, other=0.0)
    lo, full_start = _query_ranges(start_n, Lq, causal_off, IS_CAUSAL, ANY_MASK, BLOCK_M, BLOCK_N)
    return b, hk, offs_n, offs_d, col_ptrs, col_in, k, v, KPM + b * stride_kpm_b, lo, full_start


@triton.jit
def _fwd_tile(q, K, V, start_n, offs_m, offs_d, m_i, l_i, acc, Lq, Lk, causal_off, qk_scale,
              KPM, MASK, stride_mq, stride_mk,
              IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_in = offs_n[:, None] < Lk
    k = tl.load(K + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_in, other=0.0)
    v = tl.load(V + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_in, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], base-2 logits
    if MASKED:
        vis = _visible(offs_m[:, None], offs_n[None, :], Lq, Lk, causal_off, KPM, MASK, stride_mq, stride_mk,
                       IS_CAUSAL, HAS_KPM, HAS_MASK)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, MASK,
                stride_kpm_b, stride_mb, stride_mh, stride_mq, stride_mk,
                Hq, G, Lq, Lk, causal_off, qk_scale, LQ_BUCKET,
                IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, offs_m, offs_d, row_ptrs, row_in, kv_off, KPM, MASK, q, full_end, hi = _row_program(
        Q, KPM, MASK, stride_kpm_b, stride_mb, stride_mh, Hq, G, Lq, Lk, causal_off, IS_CAUSAL, HAS_KPM or HAS_MASK,
        HEAD_DIM, BLOCK_M, BLOCK_N)
    K += kv_off
    V += kv_off

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, K, V, start_n, offs_m, offs_d, m_i, l_i, acc, Lq, Lk, causal_off, qk_scale,
                                  KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION,
                                  HEAD_DIM, BLOCK_N, False)
    for start_n in range(full_end, hi, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, K, V, start_n, offs_m, offs_d, m_i, l_i, acc, Lq, Lk, causal_off, qk_scale,
                                  KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION,
                                  HEAD_DIM, BLOCK_N, True)
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("inf"))  # +inf: P = 0 everywhere
    tl.store(O + row_ptrs, out.to(O.dtype.element_ty), mask=row_in)
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_dq_tile(q, do, lse, delta, dq, K, V, start_n, offs_m, offs_d, Lq, Lk, causal_off, qk_scale,
                 KPM, MASK, stride_mq, stride_mk,
                 IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_in = offs_n[:, None] < Lk
    k = tl.load(K + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_in, other=0.0)
    v = tl.load(V + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_in, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        vis = _visible(offs_m[:, None], offs_n[None, :], Lq, Lk, causal_off, KPM, MASK, stride_mq, stride_mk,
                       IS_CAUSAL, HAS_KPM, HAS_MASK)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, MASK,
                   stride_kpm_b, stride_mb, stride_mh, stride_mq, stride_mk,
                   Hq, G, Lq, Lk, causal_off, qk_scale, sm_scale, LQ_BUCKET,
                   IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq = scale * dS k, dS = P * (dO v^T - D); one program per query block and query head."""
    bh, offs_m, offs_d, row_ptrs, row_in, kv_off, KPM, MASK, q, full_end, hi = _row_program(
        Q, KPM, MASK, stride_kpm_b, stride_mb, stride_mh, Hq, G, Lq, Lk, causal_off, IS_CAUSAL, HAS_KPM or HAS_MASK,
        HEAD_DIM, BLOCK_M, BLOCK_N)
    K += kv_off
    V += kv_off
    do = tl.load(DO + row_ptrs, mask=row_in, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(q, do, lse, delta, dq, K, V, start_n, offs_m, offs_d, Lq, Lk, causal_off, qk_scale,
                          KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION, HEAD_DIM,
                          BLOCK_N, False)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _bwd_dq_tile(q, do, lse, delta, dq, K, V, start_n, offs_m, offs_d, Lq, Lk, causal_off, qk_scale,
                          KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION, HEAD_DIM,
                          BLOCK_N, True)
    tl.store(DQ + row_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_in)


@triton.jit
def _bwd_dkdv_tile(k, v, dk, dv, Q, DO, LSE, DELTA, bh, start_m, offs_n, offs_d, Lq, Lk, causal_off, qk_scale,
                   KPM, MASK, stride_mq, stride_mk,
                   IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ptrs, row_in = _tile_offsets(bh * Lq * HEAD_DIM, offs_m, offs_d, Lq, HEAD_DIM)
    q = tl.load(Q + row_ptrs, mask=row_in, other=0.0)
    do = tl.load(DO + row_ptrs, mask=row_in, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
    p_t = tl.exp2(s_t - lse[None, :])
    if MASKED:
        vis = _visible(offs_m[None, :], offs_n[:, None], Lq, Lk, causal_off, KPM, MASK, stride_mq, stride_mk,
                       IS_CAUSAL, HAS_KPM, HAS_MASK)
        p_t = tl.where(vis, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, MASK,
                     stride_kpm_b, stride_mb, stride_mh, stride_mq, stride_mk,
                     Hq, G, Lq, Lk, causal_off, qk_scale, sm_scale, LQ_BUCKET,
                     IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk = scale dS^T q, dv = P^T dO, summed over the G query heads of a key/value head; tiles are transposed
    ([keys, queries])."""
    b, hk, offs_n, offs_d, col_ptrs, col_in, k, v, KPM, lo, full_start = _col_program(
        K, V, KPM, stride_kpm_b, Hq, G, Lq, Lk, causal_off, IS_CAUSAL, HAS_KPM or HAS_MASK, HEAD_DIM, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        mask_h = MASK + b * stride_mb + h * stride_mh
        for start_m in range(lo, full_start, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(k, v, dk, dv, Q, DO, LSE, DELTA, bh, start_m, offs_n, offs_d, Lq, Lk, causal_off,
                                    qk_scale, KPM, mask_h, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK,
                                    PRECISION, HEAD_DIM, BLOCK_M, True)
        for start_m in range(full_start, Lq, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(k, v, dk, dv, Q, DO, LSE, DELTA, bh, start_m, offs_n, offs_d, Lq, Lk, causal_off,
                                    qk_scale, KPM, mask_h, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK,
                                    PRECISION, HEAD_DIM, BLOCK_M, False)
    tl.store(DK + col_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_in)
    tl.store(DV + col_ptrs, dv.to(DV.dtype.element_ty), mask=col_in)


@triton.jit
def _bwd2_rows_tile(q, do, gq, lse, delta, beta, gamma, acc_a, acc_b, acc_c, dq2, ddo, K, V, GK, GV, kv_off,
                    start_n, offs_m, offs_d, Lq, Lk, causal_off, qk_scale, sm_scale, KPM, MASK, stride_mq, stride_mk,
                    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr,
                    PRECISION: tl.constexpr, REDUCE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ptrs, col_in = _tile_offsets(kv_off, offs_n, offs_d, Lk, HEAD_DIM)
    k = tl.load(K + col_ptrs, mask=col_in, other=0.0)
    v = tl.load(V + col_ptrs, mask=col_in, other=0.0)
    gk = tl.load(GK + col_ptrs, mask=col_in, other=0.0)
    gv = tl.load(GV + col_ptrs, mask=col_in, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        vis = _visible(offs_m[:, None], offs_n[None, :], Lq, Lk, causal_off, KPM, MASK, stride_mq, stride_mk,
                       IS_CAUSAL, HAS_KPM, HAS_MASK)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    bbar = tl.dot(gq, tl.trans(k), input_precision=PRECISION)
    bbar = tl.dot(q, tl.trans(gk), bbar, input_precision=PRECISION) * sm_scale
    dogv = tl.dot(do, tl.trans(gv), input_precision=PRECISION)
    if REDUCE:
        pb = p * bbar
        acc_a += tl.sum(pb, 1)  # beta = rowsum(P * Bbar)
        acc_b += tl.sum(pb * dp, 1)  # rowsum(P * Bbar * dP)
        acc_c += tl.sum(p * dogv, 1)  # rowsum(P * (dO gv^T))
    else:
        dp_c = dp - delta[:, None]
        ds = p * dp_c
        bar_dp = p * (bbar - beta[:, None])
        bar_p = dogv + bbar * dp_c - dp * beta[:, None]
        bar_s = p * (bar_p - gamma[:, None])
        dq2 = tl.dot(bar_s.to(k.dtype), k, dq2, input_precision=PRECISION)
        dq2 = tl.dot(ds.to(gk.dtype), gk, dq2, input_precision=PRECISION)
        ddo = tl.dot(bar_dp.to(v.dtype), v, ddo, input_precision=PRECISION)
        ddo = tl.dot(p.to(gv.dtype), gv, ddo, input_precision=PRECISION)
    return acc_a, acc_b, acc_c, dq2, ddo


@triton.jit
def _bwd2_rows_kernel(Q, K, V, DO, GQ, GK, GV, LSE, DELTA, BETA, GAMMA, DQ2, DDO, KPM, MASK,
                      stride_kpm_b, stride_mb, stride_mh, stride_mq, stride_mk,
                      Hq, G, Lq, Lk, causal_off, qk_scale, sm_scale, LQ_BUCKET,
                      IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr,
                      PRECISION: tl.constexpr, REDUCE: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Double backward, query-parallel. REDUCE: pass 1, write beta and gamma. Otherwise: pass 2, write
    dq2 = scale (Sbar k + dS gk) and d dO = (P (Bbar - beta)) v + P gv."""
    bh, offs_m, offs_d, row_ptrs, row_in, kv_off, KPM, MASK, q, full_end, hi = _row_program(
        Q, KPM, MASK, stride_kpm_b, stride_mb, stride_mh, Hq, G, Lq, Lk, causal_off, IS_CAUSAL, HAS_KPM or HAS_MASK,
        HEAD_DIM, BLOCK_M, BLOCK_N)
    do = tl.load(DO + row_ptrs, mask=row_in, other=0.0)
    gq = tl.load(GQ + row_ptrs, mask=row_in, other=0.0)
    row_ok = offs_m < Lq
    lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    acc_a = tl.zeros([BLOCK_M], tl.float32)
    acc_b = tl.zeros([BLOCK_M], tl.float32)
    acc_c = tl.zeros([BLOCK_M], tl.float32)
    if REDUCE:
        beta = acc_a
        gamma = acc_a
        dq2 = tl.zeros([1, 1], tl.float32)  # unused in this pass
        ddo = tl.zeros([1, 1], tl.float32)
    else:
        beta = tl.load(BETA + bh * Lq + offs_m, mask=row_ok, other=0.0)
        gamma = tl.load(GAMMA + bh * Lq + offs_m, mask=row_ok, other=0.0)
        dq2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        ddo = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range(0, full_end, BLOCK_N):
        acc_a, acc_b, acc_c, dq2, ddo = _bwd2_rows_tile(
            q, do, gq, lse, delta, beta, gamma, acc_a, acc_b, acc_c, dq2, ddo, K, V, GK, GV, kv_off, start_n, offs_m,
            offs_d, Lq, Lk, causal_off, qk_scale, sm_scale, KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM,
            HAS_MASK, PRECISION, REDUCE, HEAD_DIM, BLOCK_N, False)
    for start_n in range(full_end, hi, BLOCK_N):
        acc_a, acc_b, acc_c, dq2, ddo = _bwd2_rows_tile(
            q, do, gq, lse, delta, beta, gamma, acc_a, acc_b, acc_c, dq2, ddo, K, V, GK, GV, kv_off, start_n, offs_m,
            offs_d, Lq, Lk, causal_off, qk_scale, sm_scale, KPM, MASK, stride_mq, stride_mk, IS_CAUSAL, HAS_KPM,
            HAS_MASK, PRECISION, REDUCE, HEAD_DIM, BLOCK_N, True)
    if REDUCE:
        gamma_out = acc_c + acc_b - 2.0 * delta * acc_a
        tl.store(BETA + bh * Lq + offs_m, acc_a, mask=row_ok)
        tl.store(GAMMA + bh * Lq + offs_m, gamma_out, mask=row_ok)
    else:
        tl.store(DQ2 + row_ptrs, (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=row_in)
        tl.store(DDO + row_ptrs, ddo.to(DDO.dtype.element_ty), mask=row_in)


@triton.jit
def _bwd2_cols_tile(k, v, gk, gv, dk2, dv2, Q, DO, GQ, LSE, DELTA, BETA, GAMMA, bh, start_m, offs_n, offs_d,
                    Lq, Lk, causal_off, qk_scale, sm_scale, KPM, MASK, stride_mq, stride_mk,
                    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr,
                    PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ptrs, row_in = _tile_offsets(bh * Lq * HEAD_DIM, offs_m, offs_d, Lq, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(Q + row_ptrs, mask=row_in, other=0.0)
    do = tl.load(DO + row_ptrs, mask=row_in, other=0.0)
    gq = tl.load(GQ + row_ptrs, mask=row_in, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    beta = tl.load(BETA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    gamma = tl.load(GAMMA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.exp2(s_t - lse[None, :])
    if MASKED:
        vis = _visible(offs_m[None, :], offs_n[:, None], Lq, Lk, causal_off, KPM, MASK, stride_mq, stride_mk,
                       IS_CAUSAL, HAS_KPM, HAS_MASK)
        p_t = tl.where(vis, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    bbar_t = tl.dot(k, tl.trans(gq), input_precision=PRECISION)
    bbar_t = tl.dot(gk, tl.trans(q), bbar_t, input_precision=PRECISION) * sm_scale
    dogv_t = tl.dot(gv, tl.trans(do), input_precision=PRECISION)
    dp_c = dp_t - delta[None, :]
    ds_t = p_t * dp_c
    bar_dp_t = p_t * (bbar_t - beta[None, :])
    bar_p_t = dogv_t + bbar_t * dp_c - dp_t * beta[None, :]
    bar_s_t = p_t * (bar_p_t - gamma[None, :])
    dk2 = tl.dot(bar_s_t.to(q.dtype), q, dk2, input_precision=PRECISION)
    dk2 = tl.dot(ds_t.to(gq.dtype), gq, dk2, input_precision=PRECISION)
    dv2 = tl.dot(bar_dp_t.to(do.dtype), do, dv2, input_precision=PRECISION)
    return dk2, dv2


@triton.jit
def _bwd2_cols_kernel(Q, K, V, DO, GQ, GK, GV, LSE, DELTA, BETA, GAMMA, DK2, DV2, KPM, MASK,
                      stride_kpm_b, stride_mb, stride_mh, stride_mq, stride_mk,
                      Hq, G, Lq, Lk, causal_off, qk_scale, sm_scale, LQ_BUCKET,
                      IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASK: tl.constexpr,
                      PRECISION: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Double backward pass 3, key-parallel (transposed tiles [keys, queries]), summed over the G query heads:
    dk2 = scale (Sbar^T q + dS^T gq), dv2 = (P (Bbar - beta))^T dO."""
    b, hk, offs_n, offs_d, col_ptrs, col_in, k, v, KPM, lo, full_start = _col_program(
        K, V, KPM, stride_kpm_b, Hq, G, Lq, Lk, causal_off, IS_CAUSAL, HAS_KPM or HAS_MASK, HEAD_DIM, BLOCK_M, BLOCK_N)
    gk = tl.load(GK + col_ptrs, mask=col_in, other=0.0)
    gv = tl.load(GV + col_ptrs, mask=col_in, other=0.0)
    dk2 = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv2 = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        mask_h = MASK + b * stride_mb + h * stride_mh
        for start_m in range(lo, full_start, BLOCK_M):
            dk2, dv2 = _bwd2_cols_tile(k, v, gk, gv, dk2, dv2, Q, DO, GQ, LSE, DELTA, BETA, GAMMA, bh, start_m, offs_n,
                                       offs_d, Lq, Lk, causal_off, qk_scale, sm_scale, KPM, mask_h, stride_mq,
                                       stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION, HEAD_DIM, BLOCK_M, True)
        for start_m in range(full_start, Lq, BLOCK_M):
            dk2, dv2 = _bwd2_cols_tile(k, v, gk, gv, dk2, dv2, Q, DO, GQ, LSE, DELTA, BETA, GAMMA, bh, start_m, offs_n,
                                       offs_d, Lq, Lk, causal_off, qk_scale, sm_scale, KPM, mask_h, stride_mq,
                                       stride_mk, IS_CAUSAL, HAS_KPM, HAS_MASK, PRECISION, HEAD_DIM, BLOCK_M, False)
    tl.store(DK2 + col_ptrs, (dk2 * sm_scale).to(DK2.dtype.element_ty), mask=col_in)
    tl.store(DV2 + col_ptrs, dv2.to(DV2.dtype.element_ty), mask=col_in)


# ------------------------------------------------------------------------------------------------------------------
# launch configurations: a fixed heuristic per head dim and dtype, or (GRADMEM_ATTN_AUTOTUNE=1) a short autotuned
# list, benchmarked on the first call for each key. Under the interpreter: one small config.


def _heuristic(name, head_dim, elem_bytes, precision):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) chosen to keep the live tiles in registers."""
    if precision == "ieee" and elem_bytes == 4:
        # IEEE fp32 dots are unrolled FMA code: small tiles keep compile times reasonable (this path is for
        # exactness, not speed; TF32 or bf16 are the fast ones).
        return (32, 32, 4, 1)
    if head_dim > 64 or elem_bytes == 4:  # TF32 or head_dim 128: twice the registers per tile
        return {"fwd": (64, 64, 4, 2)}.get(name, (32, 64, 4, 2))
    # 16-bit, head_dim <= 64: what the autotuner picked on an H100 (bf16, head_dim 64, L = 4096 and 8192).
    return {"fwd": (128, 64, 4, 3), "bwd_dq": (128, 64, 8, 2), "bwd_dkdv": (32, 64, 4, 2),
            "bwd2_rows": (64, 64, 4, 2), "bwd2_cols": (32, 64, 4, 2)}[name]


def _tuning_list(kind):
    if kind == "fwd":
        shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3), (128, 128, 8, 2)]
    elif kind == "bwd":
        shapes = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2)]
    else:
        shapes = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2),
                  (64, 128, 8, 2), (32, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KERNELS = {
    "fwd": ("fwd", _fwd_kernel), "bwd_dq": ("bwd", _bwd_dq_kernel), "bwd_dkdv": ("bwd", _bwd_dkdv_kernel),
    "bwd2_rows": ("bwd2", _bwd2_rows_kernel), "bwd2_cols": ("bwd2", _bwd2_cols_kernel),
}
_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_KPM", "HAS_MASK", "PRECISION", "LQ_BUCKET", "G"]
_TUNED = {
    name: triton.autotune(_tuning_list(kind), key=_KEY + (["REDUCE"] if name == "bwd2_rows" else []))(kernel)
    for name, (kind, kernel) in _KERNELS.items()
}


def _launch(name, grid, q, *args, **flags):
    """Run kernel `name` on grid(cfg) with the fixed heuristic config or, if GRADMEM_ATTN_AUTOTUNE=1, autotuned."""
    kernel = _KERNELS[name][1]
    ieee_fp32 = flags["PRECISION"] == "ieee" and q.element_size() == 4
    if os.environ.get("GRADMEM_ATTN_AUTOTUNE") == "1" and not INTERPRET and not ieee_fp32:
        _TUNED[name][grid](*args, **flags)
        return
    if INTERPRET:
        bm, bn, warps, stages = 16, 16, 4, 1
    else:
        bm, bn, warps, stages = _heuristic(name, q.shape[-1], q.element_size(), flags["PRECISION"])
    kernel[grid({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                  num_stages=stages)


# ------------------------------------------------------------------------------------------------------------------
# launchers


class _Meta:
    """Everything about one call that is not a tensor with a gradient: masks, sizes, scales, precision."""

    def __init__(self, q, k, attn_mask, key_padding_mask, is_causal, scale):
        B, Hq, Lq, D = q.shape
        self.B, self.Hq, self.Lq, self.D = B, Hq, Lq, D
        self.Hkv, self.Lk = k.shape[1], k.shape[2]
        self.G = Hq // self.Hkv
        self.is_causal = bool(is_causal)
        self.causal_off = self.Lk - Lq
        self.sm_scale = float(scale)
        self.qk_scale = float(scale) * LOG2E
        allow_tf32 = q.dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32"
        self.precision = "tf32" if allow_tf32 else "ieee"
        self.lq_bucket = 1 << max(Lq - 1, 0).bit_length()
        self.has_kpm, self.has_mask = key_padding_mask is not None, attn_mask is not None
        dummy = q.new_empty((1,), dtype=torch.int8)
        self.kpm = dummy if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
        self.kpm_stride_b = 0 if key_padding_mask is None else self.kpm.stride(0)
        if attn_mask is None:
            self.mask, self.mask_strides = dummy, (0, 0, 0, 0)
        else:
            m = attn_mask if attn_mask.dtype == torch.int8 else attn_mask.view(torch.int8)
            m = m.expand(B, Hq, Lq, self.Lk)  # a view: broadcast dims get stride 0
            self.mask, self.mask_strides = m, tuple(m.stride())

    def args(self):
        return (self.kpm, self.mask, self.kpm_stride_b, *self.mask_strides)

    def sizes(self):
        return (self.Hq, self.G, self.Lq, self.Lk, self.causal_off)

    def flags(self):
        return dict(IS_CAUSAL=self.is_causal, HAS_KPM=self.has_kpm, HAS_MASK=self.has_mask,
                    PRECISION=self.precision, HEAD_DIM=self.D)


def _row_grid(meta):
    return lambda cfg: (triton.cdiv(meta.Lq, cfg["BLOCK_M"]), meta.B * meta.Hq)


def _col_grid(meta):
    return lambda cfg: (triton.cdiv(meta.Lk, cfg["BLOCK_N"]), meta.B * meta.Hkv)


def _forward(q, k, v, meta):
    o = torch.empty_like(q)
    lse = torch.empty((meta.B, meta.Hq, meta.Lq), device=q.device, dtype=torch.float32)
    _launch("fwd", _row_grid(meta), q, q, k, v, o, lse, *meta.args(), *meta.sizes(), meta.qk_scale, meta.lq_bucket,
            **meta.flags())
    return o, lse


def _backward(do, q, k, v, o, lse, meta):
    delta = (do.float() * o.float()).sum(-1)  # D = rowsum(dO * o) = rowsum(P * dP)  [B, Hq, Lq]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (*meta.args(), *meta.sizes(), meta.qk_scale, meta.sm_scale, meta.lq_bucket)
    _launch("bwd_dkdv", _col_grid(meta), q, q, k, v, do, lse, delta, dk, dv, *common, **meta.flags())
    _launch("bwd_dq", _row_grid(meta), q, q, k, v, do, lse, delta, dq, *common, **meta.flags())
    return dq, dk, dv, delta


def _double_backward(do, q, k, v, lse, delta, gq, gk, gv, meta):
    beta = torch.empty_like(delta)
    gamma = torch.empty_like(delta)
    dq2, ddo = torch.empty_like(q), torch.empty_like(do)
    dk2, dv2 = torch.empty_like(k), torch.empty_like(v)
    common = (*meta.args(), *meta.sizes(), meta.qk_scale, meta.sm_scale, meta.lq_bucket)
    rows = (q, k, v, do, gq, gk, gv, lse, delta, beta, gamma, dq2, ddo)
    _launch("bwd2_rows", _row_grid(meta), q, *rows, *common, REDUCE=True, **meta.flags())  # beta, gamma
    _launch("bwd2_rows", _row_grid(meta), q, *rows, *common, REDUCE=False, **meta.flags())  # dq2, d dO
    _launch("bwd2_cols", _col_grid(meta), q, q, k, v, do, gq, gk, gv, lse, delta, beta, gamma, dk2, dv2, *common,
            **meta.flags())  # dk2, dv2
    return ddo, dq2, dk2, dv2


# ------------------------------------------------------------------------------------------------------------------
# autograd


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta):
        o, lse = _forward(q, k, v, meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _FusedAttentionBackward.apply(do.contiguous(), q, k, v, o.detach(), lse, ctx.meta)
        return dq, dk, dv, None


class _FusedAttentionBackward(torch.autograd.Function):
    """(dO, q, k, v) -> (dq, dk, dv); o and lse are inputs only as saved values (their dependence on q, k, v is
    part of the closed-form double backward)."""

    @staticmethod
    def forward(ctx, do, q, k, v, o, lse, meta):
        dq, dk, dv, delta = _backward(do, q, k, v, o, lse, meta)
        ctx.save_for_backward(do, q, k, v, lse, delta)
        ctx.meta = meta
        return dq, dk, dv

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        do, q, k, v, lse, delta = ctx.saved_tensors
        gq = torch.zeros_like(q) if gq is None else gq.contiguous()
        gk = torch.zeros_like(k) if gk is None else gk.contiguous()
        gv = torch.zeros_like(v) if gv is None else gv.contiguous()
        ddo, dq2, dk2, dv2 = _double_backward(do, q, k, v, lse, delta, gq, gk, gv, ctx.meta)
        return ddo, dq2, dk2, dv2, None, None, None


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(scale q k^T + masks) v via the Triton kernels, exact to second order. See the module docstring."""
    check_attention_inputs(q, k, v, attn_mask, key_padding_mask)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_attention supports {SUPPORTED_DTYPES}, got {q.dtype}; use exact_attention for others")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"fused_attention needs q/k/v head dims equal and in {SUPPORTED_HEAD_DIMS}; got {q.shape[-1]} and "
            f"{v.shape[-1]}; use exact_attention for others"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"fused_attention takes a bool attn_mask (True = attend); got {attn_mask.dtype}")
    if not (q.is_cuda or INTERPRET):
        raise ValueError(f"fused_attention runs on CUDA tensors (or under TRITON_INTERPRET=1); got {q.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    meta = _Meta(q, k, attn_mask, key_padding_mask, is_causal, scale)
    return _FusedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), meta)
