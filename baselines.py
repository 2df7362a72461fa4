"""The baselines' options, builders and run names, shared by their run scripts (KV retrieval and the answer tasks).

RMT2Segm (rmt.py): a forward-only recurrent memory. The full-context LM: a plain causal LM (llama, gpt2, pythia or
mamba) that reads `context + query + target` with no memory.
"""
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import AutoConfig

from attn_double_bwd import head_dim_of, resolve_attn_implementation
from modeling_utils import base_config_to_dict, build_causal_lm, max_positions
from rmt import RMT2Segm, RMT2SegmConfig
from training import (BackboneArgs, CausalLMCollator, TrainArgs, backbone_source, backbone_tag, check_vocab_fits,
                      longest_tokens)

logger = logging.getLogger("gradmem")


# ------------------------------------------------------------------------------------------------------------ RMT

@dataclass
class RMTArgs:
    """RMT2Segm options (reference names and defaults; see rmt.py)."""

    n_mem_tokens: int = field(default=8, metadata={"help": "M memory vectors"})
    K: int = field(default=1, metadata={"help": "forward writes of the context (>= 1)"})
    n_ctrl_tokens: int = field(default=0, metadata={"help": "learned start/end marker vectors around the memory"})
    use_mem_proj: bool = field(default=False, metadata={"help": "must be given exactly when --mem_proj_mode is not none"})
    mem_proj_mode: Literal["none", "proj", "proj_rw"] = field(
        default="none", metadata={"help": "none / proj (write side) / proj_rw (write and read)"})
    use_reconstruction_loss: bool = field(default=False, metadata={"help": "add a loss of reconstructing the context"})
    reconstruction_loss_weight: float = field(default=1.0, metadata={"help": "weight of the reconstruction loss"})
    use_write_head: bool = field(default=False, metadata={
        "help": "own head for the reconstruction loss; without --use_reconstruction_loss no head is built (a warning "
                "says so: the reference built one that nothing used)"})
    use_mem_residual: bool = field(default=False, metadata={"help": "memory_k = memory_{k-1} + LayerNorm(write-out), K >= 2"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute backbone activations"})
    attn_implementation: str = field(default="eager", metadata={"help": "eager, sdpa, flash_attention_2, ... or auto"})

    def config_kwargs(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def validate(self) -> None:
        if self.use_write_head and not self.use_reconstruction_loss:
            logger.warning("--use_write_head without --use_reconstruction_loss: only the reconstruction loss uses a "
                           "write head, so none is built (the reference's SQuAD and phonebook presets built an unused "
                           "one)")
            self.use_write_head = False
        RMT2SegmConfig(**self.config_kwargs())  # raises on any inconsistent option, before any work


def rmt_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, r: RMTArgs, world_size: int) -> str:
    """The reference's run-name scheme, e.g. rmt2segm_llama_L4H4D128_mem8_mem_proj_bs_64_lr_1e-04."""
    name = f"rmt2segm_{backbone_tag(backbone_args)}_mem{r.n_mem_tokens}"
    if r.K != 1:
        name += f"_K{r.K}"
    if r.n_ctrl_tokens:
        name += f"_ctrl{r.n_ctrl_tokens}"
    if r.mem_proj_mode == "proj":
        name += "_mem_proj"
    elif r.mem_proj_mode == "proj_rw":
        name += "_mem_proj_rw"
    if r.use_reconstruction_loss:
        name += f"_rec_w{r.reconstruction_loss_weight:g}"
    if r.use_write_head:
        name += "_whead"
    if r.use_mem_residual:
        name += "_res"
    name += f"_bs_{train_args.effective_batch_size(world_size)}_lr_{train_args.learning_rate:.0e}"
    if train_args.adam_beta2 != 0.999:
        name += f"_b2_{train_args.adam_beta2:g}"
    return name


def check_rmt_backbone(backbone_args: BackboneArgs) -> None:
    if backbone_args.base_model == "mamba":
        raise ValueError("--base_model mamba: RMT needs a transformer backbone (llama, gpt2, pythia); the Mamba "
                         "baseline is the full-context LM (run_gpt2_on_*.py)")


def build_rmt(backbone_args: BackboneArgs, r: RMTArgs, tokenizer) -> RMT2Segm:
    check_rmt_backbone(backbone_args)
    model = RMT2Segm(RMT2SegmConfig(**backbone_source(backbone_args, tokenizer), **r.config_kwargs()))
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    if model.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"the backbone's pad id {model.pad_token_id} differs from the tokenizer's "
                         f"{tokenizer.pad_token_id}: the model would not recognise the collator's padding")
    return model


# ---------------------------------------------------------------------------------------------------- full context

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


def full_context_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, args: FullContextArgs,
                          world_size: int) -> str:
    """The reference's scheme, e.g. llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98 or mamba_L4D128_bs_64_lr_3e-04."""
    b = backbone_args
    name = f"mamba_L{b.n_layer}D{b.n_embd}" if b.base_model == "mamba" else backbone_tag(b)  # mamba: no heads
    if b.pretrained_model is None and b.max_position_embeddings is not None:
        name += f"_L{b.max_position_embeddings}"
    if args.max_input_length is not None:
        name += f"_in{args.max_input_length}"
    name += f"_bs_{train_args.effective_batch_size(world_size)}_lr_{train_args.learning_rate:.0e}"
    if train_args.adam_beta2 != 0.999:
        name += f"_b2_{train_args.adam_beta2:g}"
    return name


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
