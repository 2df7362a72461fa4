"""Attention implementations with an exact double backward, and the choice of implementation by name.

`resolve_attn_implementation(name, device_type=..., second_order=...)` turns a user's `--attn_implementation`
(including "auto") into a name that transformers knows, and refuses implementations that cannot be
differentiated twice when second-order gradients are needed.

Importing this package registers with transformers' AttentionInterface (see `hf_integration`):
"exact_eager" (PyTorch, `exact_attention`), "fused_double_bwd" (Triton, `fused_attention`) and the reference's
legacy names "hvp_manual", "hvp_semi_manual", all exact ("jvp_flash" is resolved to one of them by
`resolve_attn_implementation`; transformers would mistake it for a flash-attention kernel). Triton is imported only when a fused
kernel is first used, so this package imports on machines without triton.

Function API (q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D]):
    exact_attention(q, k, v, is_causal=..., attn_mask=..., key_padding_mask=..., scale=..., dropout_p=...)
    fused_attention(q, k, v, is_causal=..., attn_mask=..., key_padding_mask=..., scale=...)
"""
import importlib.util
import logging
import os
from typing import Optional

from .hf_integration import (EXACT_NAME, FUSED_HEAD_DIMS, FUSED_NAME, LEGACY_NAMES, head_dim_of,
                             register_with_transformers)
from .reference import exact_attention

logger = logging.getLogger("gradmem")

# Implementations whose backward can be differentiated again exactly.
EXACT_DOUBLE_BACKWARD = {"eager", EXACT_NAME, FUSED_NAME, *LEGACY_NAMES}
# transformers' fused implementations: fast, but no double backward.
NO_DOUBLE_BACKWARD = {"sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"}


def triton_available() -> bool:
    """True if the triton package can be imported (the fused kernels then still need CUDA or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def _fused_runs_on(device_type: str) -> bool:
    return triton_available() and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def resolve_attn_implementation(name: str, *, device_type: str = "cpu", second_order: bool = False,
                                head_dim: Optional[int] = None) -> str:
    """Map a requested attention implementation onto a registered one.

    "auto" picks the fastest exact implementation for the device when second-order gradients are needed
    ("fused_double_bwd" on CUDA with triton, "exact_eager" elsewhere), and transformers' sdpa otherwise.
    Legacy names map onto exact implementations: "hvp_manual" -> "exact_eager"; "hvp_semi_manual" and
    "jvp_flash" -> "fused_double_bwd" on CUDA, "exact_eager" elsewhere. Asking for an implementation without a
    double backward while `second_order` is true raises a ValueError that names the exact alternatives.
    `head_dim` (the backbone's attention head dim, when known): the fused kernels take 16, 32, 64 or 128; with
    another head dim "auto" and the legacy names fall back to "exact_eager" (one log line), and an explicit
    "fused_double_bwd" raises, naming the limit and the fallbacks.
    """
    fused_fits = head_dim is None or head_dim in FUSED_HEAD_DIMS
    if name in (None, "auto"):
        if not second_order:
            return "sdpa"
        if not _fused_runs_on(device_type):
            return EXACT_NAME
        if not fused_fits:
            logger.warning("attention head dim %d is outside the fused kernels' %s: using %r (exact, slower)",
                           head_dim, "/".join(map(str, FUSED_HEAD_DIMS)), EXACT_NAME)
            return EXACT_NAME
        return FUSED_NAME
    if second_order and name in NO_DOUBLE_BACKWARD:
        raise ValueError(
            f"attn_implementation={name!r} has no double backward, which grad_mode='second' needs; "
            f"use one of {sorted(EXACT_DOUBLE_BACKWARD)} or 'auto', or train with grad_mode 'first'/'none'"
        )
    if name not in EXACT_DOUBLE_BACKWARD | NO_DOUBLE_BACKWARD:
        raise ValueError(
            f"unknown attn_implementation {name!r}; known: {sorted(EXACT_DOUBLE_BACKWARD | NO_DOUBLE_BACKWARD)} or 'auto'"
        )
    if name in LEGACY_NAMES:
        name = LEGACY_NAMES[name]
        if name == FUSED_NAME and not (_fused_runs_on(device_type) and fused_fits):
            name = EXACT_NAME
    if name == FUSED_NAME and not fused_fits:
        raise ValueError(
            f"attn_implementation={FUSED_NAME!r} supports attention head dims {', '.join(map(str, FUSED_HEAD_DIMS))} "
            f"(16 to 128); this backbone's head dim is {head_dim}. Use --attn_implementation {EXACT_NAME} (exact "
            "double backward, any head dim) or eager"
        )
    if name == FUSED_NAME and not _fused_runs_on(device_type):
        raise ValueError(
            f"attn_implementation={FUSED_NAME!r} needs triton and a CUDA device (device_type={device_type!r}, triton "
            f"{'installed' if triton_available() else 'not installed'}); use {EXACT_NAME!r} or 'auto'"
        )
    return name


def __getattr__(name):
    # `fused_attention` imports triton, so it is loaded on first access only.
    if name == "fused_attention":
        from .triton_attention import fused_attention

        return fused_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_with_transformers()
