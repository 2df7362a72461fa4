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
import os

from .hf_integration import EXACT_NAME, FUSED_NAME, LEGACY_NAMES, register_with_transformers
from .reference import exact_attention

# Implementations whose backward can be differentiated again exactly.
EXACT_DOUBLE_BACKWARD = {"eager", EXACT_NAME, FUSED_NAME, *LEGACY_NAMES}
# transformers' fused implementations: fast, but no double backward.
NO_DOUBLE_BACKWARD = {"sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"}


def triton_available() -> bool:
    """True if the triton package can be imported (the fused kernels then still need CUDA or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def _fused_runs_on(device_type: str) -> bool:
    return triton_available() and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def resolve_attn_implementation(name: str, *, device_type: str = "cpu", second_order: bool = False) -> str:
    """Map a requested attention implementation onto a registered one.

    "auto" picks the fastest exact implementation for the device when second-order gradients are needed
    ("fused_double_bwd" on CUDA with triton, "exact_eager" elsewhere), and transformers' sdpa otherwise.
    Legacy names map onto exact implementations: "hvp_manual" -> "exact_eager"; "hvp_semi_manual" and
    "jvp_flash" -> "fused_double_bwd" on CUDA, "exact_eager" elsewhere. Asking for an implementation without a
    double backward while `second_order` is true raises a ValueError that names the exact alternatives.
    """
    if name in (None, "auto"):
        if not second_order:
            return "sdpa"
        return FUSED_NAME if _fused_runs_on(device_type) else EXACT_NAME
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
        if name == FUSED_NAME and not _fused_runs_on(device_type):
            name = EXACT_NAME
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
