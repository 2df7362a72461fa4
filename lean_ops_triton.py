"""Triton kernels for the elementwise and row-wise parts of lean_ops' three levels: one kernel per level and op.

lean_ops' formulas (see its docstring) are elementwise for SwiGLU and row-wise for RMSNorm; in torch each product
is its own kernel. Here each level is one kernel:

    swiglu_forward(g, u)                           h = silu(g) u
    swiglu_backward(dh, g, u, store_h)             dg, du (and h = silu(g) u in the compute dtype, for the fused
                                                   down projection's weight gradient)
    swiglu_double_backward(dh, g, u, ddg, ddu, h_bar, ...)
                                                   d dh, d g, d u (and h); h_bar is the fused op's cotangent of h
    rms_norm_forward(x, weight, eps)               y, r [..., 1]
    rms_norm_backward(dy, x, weight, r)            dx, dweight
    rms_norm_double_backward(dy, x, weight, r, p, q)
                                                   d dy, d x, d weight

The matmuls of the fused down projection stay in torch (lean_ops). Shapes: SwiGLU takes g, u (and dh, ddg, ddu,
h_bar) of one shape, no broadcasting; RMSNorm takes x [..., D] (and dy, p) with a weight (and q) [D]. lean_ops
calls these only for such shapes and uses its torch formulas otherwise. Any memory layout is accepted (inputs are
made contiguous); outputs are new contiguous tensors.

Precision, as lean_ops: loads are converted to the compute dtype (float32, float64 for float64 inputs), results are
cast once on store. SwiGLU's forward is computed in float32 and rounded once (eager rounds silu(g) to a half dtype
before the product). RMSNorm's y is weight * (x r cast to x's dtype), the product in y's dtype, as transformers;
the row sums run in a different order than torch's, so float32 results agree to rounding, not bitwise.

The weight gradients (sums over rows) are written as one partial sum per program and summed by torch: no atomics,
deterministic. No launch reads a tensor's values on the host, so the ops can be recorded in a CUDA graph after a
warm-up step has compiled the kernels (as for attn_double_bwd). Runs on CUDA, or on CPU under TRITON_INTERPRET=1
(slow; tests on tiny shapes).
"""
import torch
import triton
import triton.language as tl

ELEMENT_BLOCK = 1024  # SwiGLU: elements per program
ROW_ELEMENTS = 2048  # RMSNorm: about this many elements (rows x padded width) per program
MAX_ROWS_PER_PROGRAM = 16


def _compute_dtype(*dtypes: torch.dtype):
    return tl.float64 if torch.float64 in dtypes else tl.float32


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _silu_terms(g):
    """sigmoid(g), silu(g) = g sigmoid(g) and silu'(g) = s (1 + g (1 - s))."""
    s = _sigmoid(g)
    return s, g * s, s * (1.0 + g * (1.0 - s))


@triton.jit
def _flat_block(numel, BLOCK: tl.constexpr):
    """This program's offsets into a flat tensor of numel elements and their in-bounds mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _load(ptr, offs, mask, CDT: tl.constexpr):
    """ptr[offs] in the compute dtype, masked-out entries 0."""
    return tl.load(ptr + offs, mask=mask, other=0).to(CDT)


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, CDT: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _flat_block(numel, BLOCK)
    g = _load(g_ptr, offs, mask, CDT)
    u = _load(u_ptr, offs, mask, CDT)
    tl.store(h_ptr + offs, (g * _sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, numel,
                       STORE_H: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _flat_block(numel, BLOCK)
    dh = _load(dh_ptr, offs, mask, CDT)
    g = _load(g_ptr, offs, mask, CDT)
    u = _load(u_ptr, offs, mask, CDT)
    _, silu, dsilu = _silu_terms(g)
    tl.store(dg_ptr + offs, (dh * u * dsilu).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_double_bwd_kernel(dh_ptr, g_ptr, u_ptr, ddg_ptr, ddu_ptr, hbar_ptr, d_dh_ptr, d_g_ptr, d_u_ptr, h_ptr,
                              numel, HAS_DDG: tl.constexpr, HAS_DDU: tl.constexpr, HAS_HBAR: tl.constexpr,
                              STORE_DU: tl.constexpr, STORE_H: tl.constexpr, CDT: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs, mask = _flat_block(numel, BLOCK)
    dh = _load(dh_ptr, offs, mask, CDT)
    g = _load(g_ptr, offs, mask, CDT)
    u = _load(u_ptr, offs, mask, CDT)
    s, silu, dsilu = _silu_terms(g)
    zero = tl.zeros_like(g)
    d_dh = zero
    d_g = zero
    d_u = zero
    if HAS_DDG:
        ddg = _load(ddg_ptr, offs, mask, CDT)
        ddg_dsilu = ddg * dsilu
        d_dh += ddg_dsilu * u
        d_u += ddg_dsilu * dh
        d_g += ddg * dh * u * (s * (1.0 - s) * (2.0 + g * (1.0 - 2.0 * s)))
    if HAS_DDU:
        ddu = _load(ddu_ptr, offs, mask, CDT)
        d_dh += ddu * silu
        d_g += ddu * dh * dsilu
    if HAS_HBAR:  # the fused op's cotangent of h = silu(g) u
        hbar = _load(hbar_ptr, offs, mask, CDT)
        d_g += hbar * u * dsilu
        d_u += hbar * silu
    tl.store(d_dh_ptr + offs, d_dh.to(d_dh_ptr.dtype.element_ty), mask=mask)
    tl.store(d_g_ptr + offs, d_g.to(d_g_ptr.dtype.element_ty), mask=mask)
    if STORE_DU:
        tl.store(d_u_ptr + offs, d_u.to(d_u_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


def _flat(t):
    return None if t is None else t.contiguous()


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _elementwise_grid(numel: int):
    return (triton.cdiv(numel, ELEMENT_BLOCK),)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) u for g, u of one shape, in promote(g, u)'s dtype."""
    g, u = g.contiguous(), u.contiguous()
    h = _empty(g, torch.promote_types(g.dtype, u.dtype))
    _swiglu_fwd_kernel[_elementwise_grid(g.numel())](g, u, h, g.numel(), CDT=_compute_dtype(g.dtype, u.dtype),
                                                     BLOCK=ELEMENT_BLOCK)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, store_h: bool = False):
    """(dg, du, h): dg = dh u silu'(g) in g's dtype, du = dh silu(g) in u's dtype, and h = silu(g) u in the compute
    dtype when store_h (else None). dh, g, u of one shape."""
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    cdt = _compute_dtype(dh.dtype, g.dtype, u.dtype)
    dg, du = _empty(g, g.dtype), _empty(u, u.dtype)
    h = _empty(g, torch.float64 if cdt == tl.float64 else torch.float32) if store_h else None
    _swiglu_bwd_kernel[_elementwise_grid(g.numel())](dh, g, u, dg, du, h if store_h else dg, g.numel(),
                                                     STORE_H=store_h, CDT=cdt, BLOCK=ELEMENT_BLOCK)
    return dg, du, h


def swiglu_double_backward(dh, g, u, ddg=None, ddu=None, h_bar=None, *, d_dh_dtype: torch.dtype,
                           store_du: bool, store_h: bool = False):
    """(d dh, d g, d u, h) of lean_ops' SwiGLU double backward for cotangents ddg, ddu of (dg, du) and, for the fused
    op, h_bar of h (each may be None: no term). d dh in d_dh_dtype, d g and d u in g's and u's dtype (d u None
    unless store_du), h = silu(g) u in the compute dtype when store_h (else None). All of one shape."""
    dh, g, u, ddg, ddu, h_bar = (_flat(t) for t in (dh, g, u, ddg, ddu, h_bar))
    cdt = _compute_dtype(dh.dtype, g.dtype, u.dtype)
    d_dh, d_g = _empty(g, d_dh_dtype), _empty(g, g.dtype)
    d_u = _empty(u, u.dtype) if store_du else None
    h = _empty(g, torch.float64 if cdt == tl.float64 else torch.float32) if store_h else None
    _swiglu_double_bwd_kernel[_elementwise_grid(g.numel())](
        dh, g, u, ddg if ddg is not None else g, ddu if ddu is not None else g, h_bar if h_bar is not None else g,
        d_dh, d_g, d_u if store_du else d_g, h if store_h else d_g, g.numel(),
        HAS_DDG=ddg is not None, HAS_DDU=ddu is not None, HAS_HBAR=h_bar is not None, STORE_DU=store_du,
        STORE_H=store_h, CDT=cdt, BLOCK=ELEMENT_BLOCK)
    return d_dh, d_g, d_u, h


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm: rows of width D, ROWS rows per program; masked columns load as zeros and drop out of every row sum.


@triton.jit
def _row_block(n_rows, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    return rows, cols, row_ok, col_ok, rows[:, None] * D + cols[None, :], row_ok[:, None] & col_ok[None, :]


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, r_ptr, n_rows, D, EPS: tl.constexpr, CDT: tl.constexpr,
                         Y_CDT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, row_ok, col_ok, offs, mask = _row_block(n_rows, D, ROWS, BLOCK_D)
    x = _load(x_ptr, offs, mask, CDT)
    mean_square = tl.sum(x * x, axis=1) / D + EPS
    if CDT == tl.float32:
        r = 1.0 / tl.sqrt_rn(mean_square)  # the IEEE square root (tl.sqrt's float32 one is approximate on the GPU)
    else:
        r = 1.0 / tl.sqrt(mean_square)
    n = x * r[:, None]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0).to(Y_CDT)
    y = w[None, :] * n.to(x_ptr.dtype.element_ty).to(Y_CDT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(r_ptr + rows, r.to(r_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dw_part_ptr, n_rows, D, CDT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, row_ok, col_ok, offs, mask = _row_block(n_rows, D, ROWS, BLOCK_D)
    dy = _load(dy_ptr, offs, mask, CDT)
    x = _load(x_ptr, offs, mask, CDT)
    r = _load(r_ptr, rows, row_ok, CDT)[:, None]
    w = _load(w_ptr, cols, col_ok, CDT)[None, :]
    n = x * r
    a = dy * w
    dx = r * (a - n * (tl.sum(a * n, axis=1) / D)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(dy * n, axis=0), mask=col_ok)


@triton.jit
def _rms_norm_double_bwd_kernel(dy_ptr, x_ptr, w_ptr, r_ptr, p_ptr, q_ptr, d_dy_ptr, d_x_ptr, d_w_part_ptr, n_rows,
                                D, HAS_P: tl.constexpr, HAS_Q: tl.constexpr, CDT: tl.constexpr, ROWS: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    rows, cols, row_ok, col_ok, offs, mask = _row_block(n_rows, D, ROWS, BLOCK_D)
    dy = _load(dy_ptr, offs, mask, CDT)
    x = _load(x_ptr, offs, mask, CDT)
    r = _load(r_ptr, rows, row_ok, CDT)[:, None]
    w = _load(w_ptr, cols, col_ok, CDT)[None, :]
    n = x * r
    d_dy = tl.zeros_like(x)
    d_x = tl.zeros_like(x)
    if HAS_P:  # the cotangent of dx
        p = _load(p_ptr, offs, mask, CDT)
        a = dy * w
        A = (tl.sum(a * n, axis=1) / D)[:, None]
        P = (tl.sum(p * n, axis=1) / D)[:, None]
        pa = (tl.sum(p * a, axis=1) / D)[:, None]
        jp = r * (p - n * P)
        d_dy += w * jp
        d_x += r * r * ((3.0 * A * P - pa) * n - P * a - A * p)
        tl.store(d_w_part_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(dy * jp, axis=0), mask=col_ok)
    if HAS_Q:  # the cotangent of dweight
        q = _load(q_ptr, cols, col_ok, CDT)[None, :]
        q_dy = q * dy
        d_dy += q * n
        d_x += r * (q_dy - n * (tl.sum(q_dy * n, axis=1) / D)[:, None])
    tl.store(d_dy_ptr + offs, d_dy.to(d_dy_ptr.dtype.element_ty), mask=mask)
    tl.store(d_x_ptr + offs, d_x.to(d_x_ptr.dtype.element_ty), mask=mask)


def _row_launch(x: torch.Tensor):
    """(rows, D, grid, meta) for rows of x's last dimension."""
    D = x.shape[-1]
    n_rows = x.numel() // D if D else 0
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(MAX_ROWS_PER_PROGRAM, ROW_ELEMENTS // block_d))
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return n_rows, D, (triton.cdiv(n_rows, rows),), dict(ROWS=rows, BLOCK_D=block_d)


def _torch_dtype(cdt):
    return torch.float64 if cdt == tl.float64 else torch.float32


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, r): r = rsqrt(mean(x^2) + eps) [..., 1] in x's compute dtype, y = weight * (x r).to(x.dtype) in
    promote(weight, x)'s dtype. weight [D] for x [..., D]."""
    x, weight = x.contiguous(), weight.contiguous()
    n_rows, D, grid, meta = _row_launch(x)
    cdt = _compute_dtype(x.dtype)
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    y, r = _empty(x, y_dtype), torch.empty(*x.shape[:-1], 1, dtype=_torch_dtype(cdt), device=x.device)
    _rms_norm_fwd_kernel[grid](x, weight, y, r, n_rows, D, EPS=float(eps), CDT=cdt,
                               Y_CDT=_compute_dtype(y_dtype), **meta)
    return y, r


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor):
    """(dx, dweight) of lean_ops' RMSNorm backward, computed in r's dtype; dx in x's dtype, dweight in weight's."""
    dy, x, weight, r = dy.contiguous(), x.contiguous(), weight.contiguous(), r.contiguous()
    n_rows, D, grid, meta = _row_launch(x)
    dx = _empty(x, x.dtype)
    dw_parts = torch.empty(grid[0], D, dtype=r.dtype, device=x.device)
    _rms_norm_bwd_kernel[grid](dy, x, weight, r, dx, dw_parts, n_rows, D, CDT=_compute_dtype(r.dtype), **meta)
    return dx, dw_parts.sum(0).to(weight.dtype)


def rms_norm_double_backward(dy, x, weight, r, p=None, q=None):
    """(d dy, d x, d weight) of lean_ops' RMSNorm double backward for cotangents p of dx and q of dweight (either may
    be None: no term; d weight is None without p), computed in r's dtype and cast to dy's, x's, weight's dtypes."""
    dy, x, weight, r, p, q = (_flat(t) for t in (dy, x, weight, r, p, q))
    n_rows, D, grid, meta = _row_launch(x)
    d_dy, d_x = _empty(dy, dy.dtype), _empty(x, x.dtype)
    d_w_parts = torch.empty(grid[0], D, dtype=r.dtype, device=x.device) if p is not None else None
    _rms_norm_double_bwd_kernel[grid](dy, x, weight, r, p if p is not None else x, q if q is not None else weight,
                                      d_dy, d_x, d_w_parts if p is not None else d_x, n_rows, D,
                                      HAS_P=p is not None, HAS_Q=q is not None, CDT=_compute_dtype(r.dtype), **meta)
    return d_dy, d_x, None if p is None else d_w_parts.sum(0).to(weight.dtype)
