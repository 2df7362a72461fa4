"""The full-context baseline: a plain Hugging Face causal LM that reads `context + query + target` (no memory).

Its options (FullContextArgs) and builder live here, beside the memory models' (grad_memgpt.GradMemArgs,
rmt.RMTArgs), so that tools parse and name its runs without importing the run script.
"""
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoConfig

from attn_double_bwd import head_dim_of, resolve_attn_implementation
from mamba_scan import use_parallel_scan
from modeling_utils import base_config_to_dict, build_causal_lm, max_positions
from training_args import BackboneArgs
from training_backbone import backbone_source, check_vocab_fits
from training_collators import CausalLMCollator
from training_data import longest_tokens


@dataclass
class FullContextArgs:
    max_input_length: Optional[int] = field(
        default=None, metadata={"help": "keep the last N tokens of context+query+target (drops the START of the context)"}
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "eager, sdpa, flash_attention_2, ...; default sdpa (not for mamba)"}
    )

    def validate(self) -> None:
        if self.max_input_length is not None and self.max_input_length < 1:
            raise ValueError(f"--max_input_length must be >= 1, got {self.max_input_length}")
        if self.attn_implementation is not None:
            resolve_attn_implementation(self.attn_implementation, second_order=False)  # unknown names fail here


def check_full_context_options(backbone_args: BackboneArgs, args: FullContextArgs) -> None:
    if backbone_args.base_model == "mamba":
        if args.attn_implementation is not None:
            raise ValueError(f"--attn_implementation {args.attn_implementation}: mamba has no attention; drop the flag")
        try:
            from transformers import MambaConfig, MambaForCausalLM  # noqa: F401
        except ImportError as error:
            import transformers

            raise ValueError(f"--base_model mamba needs transformers' MambaConfig and MambaForCausalLM, which "
                             f"transformers {transformers.__version__} lacks: upgrade transformers") from error


def build_full_context_lm(backbone_args: BackboneArgs, args: FullContextArgs, tokenizer):
    """The causal LM from scratch (--base_model) or pretrained (--pretrained_model), cache off; a mamba's mixers scan
    in parallel without mamba_ssm (mamba_scan.py; the same math and weights, not transformers' per-position loop)."""
    check_full_context_options(backbone_args, args)
    source = backbone_source(backbone_args, tokenizer)
    base_config = source.get("base_config")
    config = base_config if base_config is not None else AutoConfig.from_pretrained(source["pretrained_model"])
    attn = None
    if head_dim_of(config) is not None:  # mamba (from scratch or pretrained) has no attention
        attn = resolve_attn_implementation(args.attn_implementation or "auto", second_order=False)
    elif args.attn_implementation is not None:
        raise ValueError(f"--attn_implementation {args.attn_implementation}: {config.model_type} has no attention; "
                         "drop the flag")
    model = build_causal_lm(source.get("pretrained_model"),
                            None if base_config is None else base_config_to_dict(base_config), attn)
    model.config.use_cache = False
    use_parallel_scan(model)  # a no-op for models without MambaMixer
    check_vocab_fits(model.get_input_embeddings().weight.shape[0], tokenizer)
    return model


def check_full_context_fits(model, collator: CausalLMCollator, splits) -> None:
    """Every sequence of every split fits the model's positions (else a cryptic index error mid-training)."""
    positions = max_positions(model.config)
    if positions is None or (collator.max_input_length is not None and collator.max_input_length <= positions):
        return  # mamba has no position limit; --max_input_length cuts every sequence
    for name, split in splits.items():
        longest = longest_tokens(collator.tokenizer, split, ("context", "query", "target"), positions)
        if longest > positions:
            raise ValueError(f"sequences of {longest} tokens (split {name!r}) do not fit the model's {positions} "
                             f"positions: set --max_input_length {positions} (drops the start of the context) or a "
                             "larger --max_position_embeddings")
