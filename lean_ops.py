"""SwiGLU and RMSNorm with a closed-form first and second derivative that keep little for the backward.

Second-order GradMem differentiates the backbone's backward again. Eager autograd keeps every intermediate of
silu(g) * u and of RMSNorm for the backward, and the create_graph backward keeps the intermediates of its own
differentiable formulas again (silu's is a chain of elementwise products as wide as g). Here each op is an
autograd.Function whose forward saves only its inputs and whose backward is itself an autograd.Function (saving
its inputs) with a closed-form backward, the double backward. A third derivative is not supported and raises.

    swiglu(g, u)                 = silu(g) * u                 saves g, u           (g, u broadcastable)
    swiglu_linear(g, u, weight)  = (silu(g) * u) @ weight^T    saves g, u, weight   (the MLP's down projection
                                                                                     fused: h is not kept)
    rms_norm(x, weight, eps)     = weight * x / rms(x)         saves x, weight and the per-row 1 / rms(x) [..., 1]

Their create_graph backward saves its inputs again: dh (swiglu), dout = the gradient of the MLP output (fused:
dh = dout @ weight is recomputed, 4x narrower in a llama MLP), dy (rms_norm). The fused op pays for it with
recomputation: h in both backward levels, dh in the double backward, and the weight gradient dout^T h, which its
backward computes whenever the weight requires grad (an autograd.Function cannot tell that the caller only asks
for the input gradients, as GradMem's inner steps do).

Formulas (s = sigmoid(g); every product elementwise):
    silu(g) = g s,   silu'(g) = s (1 + g (1 - s)),   silu''(g) = s (1 - s) (2 + g (1 - 2 s))
    swiglu backward of dh:      dg = dh u silu'(g),   du = dh silu(g)
    its backward of (ddg, ddu): d dh = ddg u silu'(g) + ddu silu(g),   d u = ddg dh silu'(g),
                                d g = ddg dh u silu''(g) + ddu dh silu'(g)
    swiglu_linear adds dh = dout weight, dweight = dout^T h, and in its backward (ddw the cotangent of dweight):
                                d dout = d dh weight^T + h ddw^T,   d weight = dout^T d dh,
                                dout ddw (the cotangent of h) enters d g and d u like dh does
    RMSNorm, per row of width D, r = (mean(x^2) + eps)^-1/2, n = x r, <.> = mean over the row, J p = r (p - n <p n>)
    (J is the symmetric Jacobian of n w.r.t. x):
    backward of dy:             a = dy weight,   dx = J a,   dweight = sum over rows of dy n
    its backward of (p, q) (the cotangents of dx and dweight), A = <a n>, P = <p n>:
                                d dy = weight J p + q n,   d weight = sum over rows of dy J p,
                                d x  = r^2 ((3 A P - <p a>) n - P a - A p) + J (q dy)

Precision: like transformers' RMSNorm, the normalisation is computed in float32 for half inputs, cast to the input
dtype and then multiplied by the weight; float64 stays float64 (transformers computes float64 inputs in float32).
SwiGLU's forward runs in the input dtype, as eager does; both backward levels compute in at least float32 and cast
back. No op synchronises with the host or branches on data, so the ops can be recorded in CUDA graphs.

Kernels: on CUDA (and on the CPU under TRITON_INTERPRET=1, for tests) the elementwise and row-wise parts of each
level run as one Triton kernel (lean_ops_triton.py; the down projection's matmuls stay in torch) instead of a dozen
torch kernels. `_kernels` is the one place that chooses: the kernels take SwiGLU operands of one shape (no
broadcasting) and RMSNorm rows [..., D] with a weight [D], in float16/bfloat16/float32/float64; other shapes, other
devices and `use_triton = False` run the torch formulas below. Both compute the same formulas in the same dtypes;
float32 results agree to rounding (row sums in another order; SwiGLU's half forward is rounded once, not twice). A
CUDA graph needs one warm-up step first, which compiles the kernels.

`use_lean_ops(model)` swaps them into the SwiGLU MLPs and RMSNorms of a transformers model of the llama family
(instances only; transformers' classes are left alone); `lean_ops_problem(model)` says why it cannot.
"""
import importlib.util
import os
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


# Use lean_ops_triton's kernels where they run (False: always the torch formulas; tests compare the two).
use_triton = True
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels(*tensors: Optional[torch.Tensor], fits: bool = True):
    """lean_ops_triton if its kernels take these tensors (None entries ignored), else None (the torch formulas).
    The one place that chooses: `fits` (the op's shapes are the kernel's), all tensors non-empty, of a float dtype
    and on one CUDA device (or on the CPU under TRITON_INTERPRET=1, for tests), and triton installed."""
    tensors = [t for t in tensors if t is not None]
    if not (use_triton and fits and all(t.numel() > 0 and t.dtype in TRITON_DTYPES for t in tensors)):
        return None
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return None
    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return None
    if importlib.util.find_spec("triton") is None:
        return None
    import lean_ops_triton

    return lean_ops_triton


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """grad reduced over the dimensions `like` was broadcast along, in like's dtype."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU: silu(g) * u


def _silu_derivatives(g: torch.Tensor):
    """(silu(g), silu'(g)) of g in its own dtype."""
    s = torch.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


class _SwiGLU(torch.autograd.Function):
    """h = silu(g) * u. Saves g and u."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        kernels = _kernels(g, u, fits=g.shape == u.shape)
        return kernels.swiglu_forward(g, u) if kernels else F.silu(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return _SwiGLUBackward.apply(dh, g, u)


class _SwiGLUBackward(torch.autograd.Function):
    """(dh, g, u) -> (dg, du). Saves dh, g and u; its backward is the SwiGLU double backward."""

    @staticmethod
    def forward(ctx, dh, g, u):
        ctx.save_for_backward(dh, g, u)
        ctx.set_materialize_grads(False)
        kernels = _kernels(dh, g, u, fits=dh.shape == g.shape == u.shape)
        if kernels:
            return kernels.swiglu_backward(dh, g, u)[:2]
        cdt = _compute_dtype(torch.promote_types(g.dtype, u.dtype))
        dh_, g_, u_ = dh.to(cdt), g.to(cdt), u.to(cdt)
        silu, dsilu = _silu_derivatives(g_)
        return _sum_to(dh_ * u_ * dsilu, g), _sum_to(dh_ * silu, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, ddg, ddu):
        dh, g, u = ctx.saved_tensors
        if ddg is None and ddu is None:
            return None, None, None
        kernels = _kernels(dh, g, u, ddg, ddu, fits=all(t is None or t.shape == g.shape for t in (dh, u, ddg, ddu)))
        if kernels:
            return kernels.swiglu_double_backward(dh, g, u, ddg, ddu, d_dh_dtype=dh.dtype, store_du=ddg is not None)[:3]
        cdt = _compute_dtype(torch.promote_types(g.dtype, u.dtype))
        dh_, g_, u_ = dh.to(cdt), g.to(cdt), u.to(cdt)
        s = torch.sigmoid(g_)
        silu, dsilu = g_ * s, s * (1 + g_ * (1 - s))
        d_dh = d_g = d_u = None
        if ddg is not None:
            ddg = ddg.to(cdt)
            ddg_dsilu = ddg * dsilu
            d_dh = ddg_dsilu * u_
            d_u = ddg_dsilu * dh_
            d_g = ddg * dh_ * u_ * (s * (1 - s) * (2 + g_ * (1 - 2 * s)))
        if ddu is not None:
            ddu = ddu.to(cdt)
            ddu_dh = ddu * dh_
            d_dh = ddu * silu if d_dh is None else d_dh + ddu * silu
            d_g = ddu_dh * dsilu if d_g is None else d_g + ddu_dh * dsilu
        return (None if d_dh is None else _sum_to(d_dh, dh), None if d_g is None else _sum_to(d_g, g),
                None if d_u is None else _sum_to(d_u, u))


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u with a closed-form double backward; saves only g and u (see the module docstring)."""
    return _SwiGLU.apply(g, u)


class _SwiGLULinear(torch.autograd.Function):
    """out = (silu(g) * u) @ weight^T: SwiGLU fused with the down projection. Saves g, u and the weight."""

    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        kernels = _kernels(g, u, fits=g.shape == u.shape)
        return F.linear(kernels.swiglu_forward(g, u) if kernels else F.silu(g) * u, weight)

    @staticmethod
    def backward(ctx, dout):
        g, u, weight = ctx.saved_tensors
        return _SwiGLULinearBackward.apply(dout, g, u, weight)


class _SwiGLULinearBackward(torch.autograd.Function):
    """(dout, g, u, weight) -> (dg, du, dweight). Saves its inputs; h = silu(g) u and dh = dout weight recomputed."""

    @staticmethod
    def forward(ctx, dout, g, u, weight):
        ctx.save_for_backward(dout, g, u, weight)
        ctx.set_materialize_grads(False)
        cdt = _compute_dtype(g.dtype)
        dout_, w_ = dout.to(cdt), weight.to(cdt)
        dh = dout_ @ w_
        kernels = _kernels(dh, g, u, fits=g.shape == u.shape == dh.shape)
        if kernels:
            dg, du, h = kernels.swiglu_backward(dh, g, u, store_h=ctx.needs_input_grad[3])
            dweight = (dout_.flatten(0, -2).T @ h.flatten(0, -2)) if ctx.needs_input_grad[3] else None
            return dg, du, None if dweight is None else dweight.to(weight.dtype)
        g_, u_ = g.to(cdt), u.to(cdt)
        silu, dsilu = _silu_derivatives(g_)
        dweight = (dout_.flatten(0, -2).T @ (silu * u_).flatten(0, -2)) if ctx.needs_input_grad[3] else None
        return ((dh * u_ * dsilu).to(g.dtype), (dh * silu).to(u.dtype),
                None if dweight is None else dweight.to(weight.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, ddg, ddu, ddw):
        dout, g, u, weight = ctx.saved_tensors
        cdt = _compute_dtype(g.dtype)
        dout_, w_ = dout.to(cdt), weight.to(cdt)
        dh = dout_ @ w_
        kernels = _kernels(dh, g, u, ddg, ddu, fits=all(t is None or t.shape == g.shape for t in (dh, u, ddg, ddu)))
        if kernels:
            h_bar = None if ddw is None else dout_ @ ddw.to(cdt)  # cotangent of h from dweight = dout^T h
            d_dh, d_g, d_u, h = kernels.swiglu_double_backward(dh, g, u, ddg, ddu, h_bar, d_dh_dtype=cdt,
                                                               store_du=True, store_h=ddw is not None)
            d_dout = d_dh @ w_.T
            if ddw is not None:
                d_dout = d_dout + h @ ddw.to(cdt).T
            d_w = dout_.flatten(0, -2).T @ d_dh.flatten(0, -2)
            return d_dout.to(dout.dtype), d_g, d_u, d_w.to(weight.dtype)
        g_, u_ = g.to(cdt), u.to(cdt)
        s = torch.sigmoid(g_)
        silu, dsilu = g_ * s, s * (1 + g_ * (1 - s))
        zero = torch.zeros_like(g_)
        ddg = zero if ddg is None else ddg.to(cdt)
        ddu = zero if ddu is None else ddu.to(cdt)
        # cotangent of dh (through dg and du), then of h = silu u (through dweight)
        d_dh = ddg * u_ * dsilu + ddu * silu
        d_u = ddg * dh * dsilu
        d_g = ddg * dh * u_ * (s * (1 - s) * (2 + g_ * (1 - 2 * s))) + ddu * dh * dsilu
        d_dout = d_dh @ w_.T
        d_w = dout_.flatten(0, -2).T @ d_dh.flatten(0, -2)  # [D_out, D_in]: d/dw of <d_dh, dout w>
        if ddw is not None:
            ddw = ddw.to(cdt)
            h_bar = dout_ @ ddw  # cotangent of h from dweight = dout^T h
            d_dout = d_dout + (silu * u_) @ ddw.T
            d_g = d_g + h_bar * u_ * dsilu
            d_u = d_u + h_bar * silu
        return d_dout.to(dout.dtype), d_g.to(g.dtype), d_u.to(u.dtype), d_w.to(weight.dtype)


def swiglu_linear(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(silu(g) * u) @ weight^T with a closed-form double backward; saves g, u and the weight."""
    return _SwiGLULinear.apply(g, u, weight)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm: weight * x / rms(x)


def _normalise(x: torch.Tensor, eps: float):
    """(r [..., 1], n = x r) in x's compute dtype, with transformers' ops (bitwise its float32 result)."""
    x_ = x.to(_compute_dtype(x.dtype))
    r = torch.rsqrt(x_.pow(2).mean(-1, keepdim=True) + eps)
    return r, x_ * r


def _rows_fit(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The RMSNorm kernels' shapes: x and dy [..., D] alike, weight [D]."""
    return dy.shape == x.shape and weight.dim() == 1 and x.dim() >= 1 and weight.shape[0] == x.shape[-1]


class _RMSNorm(torch.autograd.Function):
    """y = weight * (x r).to(x.dtype), r = rsqrt(mean(x^2) + eps). Saves x, weight and r."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        kernels = _kernels(x, weight, fits=_rows_fit(x, x, weight))
        if kernels:
            y, r = kernels.rms_norm_forward(x, weight, eps)
        else:
            r, n = _normalise(x, eps)
            y = weight * n.to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dx, dweight = _RMSNormBackward.apply(dy, x, weight, r)
        return dx, dweight, None


class _RMSNormBackward(torch.autograd.Function):
    """(dy, x, weight; r) -> (dx, dweight), r = r(x) a constant input. Saves dy, x, weight, r; its backward is the
    RMSNorm double backward (through r's dependence on x)."""

    @staticmethod
    def forward(ctx, dy, x, weight, r):
        ctx.save_for_backward(dy, x, weight, r)
        ctx.set_materialize_grads(False)
        kernels = _kernels(dy, x, weight, r, fits=_rows_fit(dy, x, weight))
        if kernels:
            return kernels.rms_norm_backward(dy, x, weight, r)
        cdt = r.dtype
        n = x.to(cdt) * r
        dy_ = dy.to(cdt)
        a = dy_ * weight.to(cdt)
        dx = r * (a - n * (a * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), _sum_to(dy_ * n, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, p, q):
        dy, x, weight, r = ctx.saved_tensors
        if p is None and q is None:
            return None, None, None, None
        kernels = _kernels(dy, x, weight, r, p, q, fits=_rows_fit(dy, x, weight) and (p is None or p.shape == x.shape)
                           and (q is None or q.shape == weight.shape))
        if kernels:
            return (*kernels.rms_norm_double_backward(dy, x, weight, r, p, q), None)
        cdt = r.dtype
        n = x.to(cdt) * r
        dy_, w_ = dy.to(cdt), weight.to(cdt)
        d_dy = d_x = d_w = None
        if p is not None:
            p = p.to(cdt)
            a = dy_ * w_
            A, P = (a * n).mean(-1, keepdim=True), (p * n).mean(-1, keepdim=True)
            jp = r * (p - n * P)
            d_dy = w_ * jp
            d_w = dy_ * jp
            d_x = r * r * ((3 * A * P - (p * a).mean(-1, keepdim=True)) * n - P * a - A * p)
        if q is not None:
            q_dy = q.to(cdt) * dy_
            j_q_dy = r * (q_dy - n * (q_dy * n).mean(-1, keepdim=True))
            d_dy = q.to(cdt) * n if d_dy is None else d_dy + q.to(cdt) * n
            d_x = j_q_dy if d_x is None else d_x + j_q_dy
        return (None if d_dy is None else d_dy.to(dy.dtype), None if d_x is None else d_x.to(x.dtype),
                None if d_w is None else _sum_to(d_w, weight), None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, with a closed-form double backward; saves x,
    weight and the per-row 1 / rms (see the module docstring)."""
    return _RMSNorm.apply(x, weight, float(eps))


# ----------------------------------------------------------------------------------------------------------------
# Swapping them into a transformers model

# Backbone families whose MLP is down_proj(act_fn(gate_proj(x)) * up_proj(x)) and whose RMSNorm is transformers'
# llama one (weight * normalised x, computed in float32): model_type -> (module, MLP class name, RMSNorm class name).
LEAN_OPS_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaMLP", "LlamaRMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralMLP", "MistralRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2MLP", "Qwen2RMSNorm"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3MLP", "Qwen3RMSNorm"),
}
SILU_NAMES = ("silu", "swish")


def _family_classes(model_type: str) -> tuple:
    import importlib

    module_name, mlp, norm = LEAN_OPS_FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, mlp), getattr(module, norm)


def lean_ops_problem(model: torch.nn.Module) -> Optional[str]:
    """Why `use_lean_ops` cannot swap the lean ops into this transformers model (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_OPS_FAMILIES:
        return (f"lean ops replace the SwiGLU MLP and RMSNorm of {', '.join(LEAN_OPS_FAMILIES)} backbones; this "
                f"backbone is {model_type!r}")
    act = getattr(config, "hidden_act", None)
    if act not in SILU_NAMES:
        return f"lean ops compute silu(gate) * up; this backbone's MLP activation is {act!r}"
    return None


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with the lean SwiGLU; fused with the down projection when it is a
    plain Linear (an adapter-wrapped one, e.g. a write LoRA, is called as a module)."""
    g, u = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if type(down) is not torch.nn.Linear:
        return down(swiglu(g, u))
    out = swiglu_linear(g, u, down.weight)
    return out if down.bias is None else out + down.bias


def _lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def use_lean_ops(model: torch.nn.Module) -> int:
    """Swap the lean SwiGLU (fused with the down projection) and RMSNorm into every MLP and RMSNorm instance of a
    transformers model of a family in LEAN_OPS_FAMILIES (its own instances: transformers' classes and other models
    are untouched). Same function, less saved for the backward. Returns how many modules now use them; raises a
    ValueError saying why for other backbones."""
    problem = lean_ops_problem(model)
    if problem is not None:
        raise ValueError(problem)
    mlp_class, norm_class = _family_classes(model.config.model_type)
    patched = 0
    for module in model.modules():
        if isinstance(module, mlp_class):
            module.forward = types.MethodType(_lean_mlp_forward, module)
        elif isinstance(module, norm_class):
            module.forward = types.MethodType(_lean_rms_norm_forward, module)
        else:
            continue
        patched += 1
    return patched
