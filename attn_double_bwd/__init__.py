"""Attention implementations with an exact double backward, and the choice of implementation by name.

`resolve_attn_implementation(name, device_type=..., second_order=...)` turns a user's `--attn_implementation`
(including "auto") into a name that transformers knows, and refuses implementations that cannot be
differentiated twice when second-order gradients are needed.
"""

# Implementations whose backward PyTorch can differentiate again exactly.
EXACT_DOUBLE_BACKWARD = {"eager"}
# transformers' fused implementations: fast, but no double backward.
NO_DOUBLE_BACKWARD = {"sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"}


def resolve_attn_implementation(name: str, *, device_type: str = "cpu", second_order: bool = False) -> str:
    """Map a requested attention implementation onto a registered one.

    "auto" picks the fastest exact implementation for the device when second-order gradients are needed, and
    transformers' sdpa otherwise. Asking for an implementation without a double backward while `second_order` is
    true raises a ValueError that names the exact alternatives.
    """
    if name in (None, "auto"):
        return "eager" if second_order else "sdpa"
    if second_order and name in NO_DOUBLE_BACKWARD:
        raise ValueError(
            f"attn_implementation={name!r} has no double backward, which grad_mode='second' needs; "
            f"use one of {sorted(EXACT_DOUBLE_BACKWARD)} or 'auto', or train with grad_mode 'first'/'none'"
        )
    if name not in EXACT_DOUBLE_BACKWARD | NO_DOUBLE_BACKWARD:
        raise ValueError(
            f"unknown attn_implementation {name!r}; known: {sorted(EXACT_DOUBLE_BACKWARD | NO_DOUBLE_BACKWARD)} or 'auto'"
        )
    return name
