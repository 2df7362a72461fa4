"""transformers integration: attention functions with the `AttentionInterface` signature, and their registration.

Registered names (all exact under a second derivative):
- "exact_eager":      `reference.exact_attention` (PyTorch, any device and dtype, dropout supported).
- "fused_double_bwd": `triton_attention.fused_attention` (Triton forward/backward/double backward; CUDA, or CPU
                      under TRITON_INTERPRET=1; no dropout).
- legacy names of the reference implementation, kept so old commands work and now give exact gradients:
  "hvp_manual" -> exact_eager; "hvp_semi_manual" -> fused_double_bwd on CUDA tensors, exact_eager on other
  devices. "jvp_flash" is accepted by `resolve_attn_implementation` (mapped like "hvp_semi_manual") but not
  registered: transformers 5 treats every name containing "flash" as a flash-attention kernel to fetch.
All use transformers' `sdpa_mask` as mask builder: a causal batch without padding arrives as `attention_mask=None`
(the kernels apply the causal mask themselves), anything else as a 4D bool mask (True = attend). A ready-made
[1, 1, Lq, Lk] bool mask equal to the causal mask (a static mask passed for CUDA graphs) is recognised (checked
once per mask tensor) and runs the fused kernels' causal path, which skips the masked half of the tiles.
"""
import os
import weakref

import torch

from .reference import exact_attention

EXACT_NAME = "exact_eager"
FUSED_NAME = "fused_double_bwd"
FUSED_HEAD_DIMS = (16, 32, 64, 128)  # head dims the Triton kernels are built for
LEGACY_NAMES = {"hvp_manual": EXACT_NAME, "hvp_semi_manual": FUSED_NAME, "jvp_flash": FUSED_NAME}


def head_dim_of(config) -> "int | None":
    """Attention head dim of a transformers config (or its to_dict()); None for backbones without attention heads."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    if get("head_dim"):
        return int(get("head_dim"))
    width = next((get(n) for n in ("hidden_size", "n_embd", "d_model") if get(n)), None)
    heads = next((get(n) for n in ("num_attention_heads", "n_head") if get(n)), None)
    return int(width) // int(heads) if width and heads else None


def _prepare(module, query, key, attention_mask, is_causal, kwargs):
    """Mirror transformers' sdpa integration: decide causality, trim the mask, reject what we do not implement."""
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported by the exact double-backward attention; use attn_implementation='eager'")
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[1] != key.shape[1] * groups:
        raise ValueError(
            f"query has {query.shape[1]} heads but key has {key.shape[1]} with num_key_value_groups={groups}"
        )
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if attention_mask is not None:
        if attention_mask.dim() != 4:
            raise ValueError(f"expected a 4D attention mask from the mask builder, got shape {tuple(attention_mask.shape)}")
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    return attention_mask, is_causal


def _autocast_inputs(query, key, value):
    """Under autocast, attend in the autocast dtype, as torch's sdpa does: llama's RoPE hands back fp32 q/k beside a
    bf16 v there, which the kernels (one dtype for q, k, v) would otherwise reject."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def _trim_keys_for_causal(key, value, q_len, is_causal):
    # Like torch's sdpa (top-left causal alignment), which transformers relies on for a prefill into an empty
    # static cache: with is_causal and no mask, keys past the query length are unused cache slots.
    if is_causal and key.shape[2] > q_len:
        return key[:, :, :q_len], value[:, :, :q_len]
    return key, value


def exact_eager_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """AttentionInterface function: q [B, Hq, L, D], k/v [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    attention_mask, is_causal = _prepare(module, query, key, attention_mask, is_causal, kwargs)
    key, value = _trim_keys_for_causal(key, value, query.shape[2], is_causal)
    query, key, value = _autocast_inputs(query, key, value)
    out = exact_attention(
        query, key, value, is_causal=is_causal, attn_mask=attention_mask, scale=scaling, dropout_p=dropout
    )
    return out.transpose(1, 2).contiguous(), None


def fused_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """AttentionInterface function running the Triton kernels (imported on first use)."""
    if dropout > 0.0:
        raise ValueError(
            f"attn_implementation={FUSED_NAME!r} has no dropout (got attention dropout {dropout}); set the backbone's "
            f"attention dropout to 0 (e.g. attention_dropout / attn_pdrop) or use attn_implementation={EXACT_NAME!r}"
        )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError(
            f"attn_implementation={FUSED_NAME!r} takes bool attention masks (transformers' sdpa_mask builds them); got "
            f"{attention_mask.dtype}"
        )
    plain_causal = attention_mask is not None and is_plain_causal_mask(attention_mask, query.shape[2], key.shape[2])
    if plain_causal:
        # A ready-made causal mask (e.g. a static one for CUDA graphs): let the kernels skip the masked half. It is
        # aligned bottom-right like the kernels' is_causal, so no key trimming (that is for sdpa's mask=None case).
        attention_mask, is_causal = None, True
    attention_mask, is_causal = _prepare(module, query, key, attention_mask, is_causal, kwargs)
    if not plain_causal:
        key, value = _trim_keys_for_causal(key, value, query.shape[2], is_causal)
    from .triton_attention import fused_attention

    query, key, value = _autocast_inputs(query, key, value)
    out = fused_attention(query, key, value, is_causal=is_causal, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_PLAIN_CAUSAL = {}  # id(mask) -> (weak reference, mask._version, answer)


def is_plain_causal_mask(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """Is `mask` a bool [1, 1, q_len, k_len] mask equal to the causal mask (key j visible to query i iff
    j <= i + k_len - q_len)?

    The content is compared once per mask tensor (a device sync), then the answer is remembered for as long as that
    tensor lives and is not modified in place; so a static mask reused by every layer and step costs one check, and
    a check never happens inside CUDA-graph capture (an unchecked mask there is simply treated as a general mask).
    Batched masks ([B, ...] with B > 1, e.g. padding masks) are not checked.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape) != (1, 1, q_len, k_len):
        return False
    entry = _PLAIN_CAUSAL.get(id(mask))
    if entry is not None and entry[0]() is mask and entry[1] == mask._version:
        return entry[2]
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    answer = bool(torch.equal(mask[0, 0], causal))
    key = id(mask)
    _PLAIN_CAUSAL[key] = (weakref.ref(mask, lambda _, key=key: _PLAIN_CAUSAL.pop(key, None)), mask._version, answer)
    return answer


def _fused_usable(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def legacy_fused_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """'hvp_semi_manual': the fused kernels on CUDA, the exact PyTorch path elsewhere."""
    fn = fused_attention_forward if _fused_usable(query) else exact_eager_attention_forward
    return fn(module, query, key, value, attention_mask, **kwargs)


def register_with_transformers() -> None:
    """Register every name above with transformers' AttentionInterface and AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    functions = {
        EXACT_NAME: exact_eager_attention_forward,
        FUSED_NAME: fused_attention_forward,
        "hvp_manual": exact_eager_attention_forward,
        "hvp_semi_manual": legacy_fused_attention_forward,
    }
    for name, fn in functions.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
