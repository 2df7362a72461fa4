"""Full-context baseline: a plain causal LM reads `context + query + target`; loss and metrics on the target tokens.

    python run_gpt2_on_kv_retrieval.py --data_path ./data/N16-K2V2-V62_1M --base_model llama --max_position_embeddings 1024
    accelerate launch --config_file accelerate.yaml run_gpt2_on_kv_retrieval.py ...   (see scripts/run_gpt_on_kv_retrieval.sh)

No memory: the model attends to the whole context (the "upper bound" with Llama; Mamba is the recurrent baseline).
Backbones from scratch (`--base_model llama|gpt2|pythia|mamba`, local configs, see training.build_backbone_config) or
pretrained (`--pretrained_model NAME`). `--max_input_length N` keeps the LAST N tokens of each sequence, i.e. drops
the START of the context (query and target are never cut), as the reference did. `--init_checkpoint` warm-starts
from a .safetensors file or checkpoint folder; re-running the same command resumes (see training.py).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from attn_double_bwd import resolve_attn_implementation
from modeling_utils import base_config_to_dict, build_causal_lm, max_positions
from training import (BackboneArgs, CausalLMCollator, DataArgs, TrainArgs, backbone_source, backbone_tag,
                      check_data, check_vocab_fits, launched_world_size, load_splits, load_tokenizer, longest_tokens,
                      make_compute_metrics, parse_cli, run_cli, run_experiment)

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


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


def check_options(backbone_args: BackboneArgs, args: FullContextArgs, data_args: DataArgs) -> None:
    if data_args.max_context_length is not None:
        raise ValueError("--max_context_length is for the memory models; the full-context baseline truncates the "
                         "whole sequence from the start with --max_input_length")
    if backbone_args.base_model == "mamba" and args.attn_implementation is not None:
        raise ValueError(f"--attn_implementation {args.attn_implementation}: mamba has no attention; drop the flag")


def default_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, args: FullContextArgs, world_size: int) -> str:
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


def build_model(backbone_args: BackboneArgs, args: FullContextArgs, tokenizer):
    attn = None
    if backbone_args.base_model != "mamba":
        attn = resolve_attn_implementation(args.attn_implementation or "auto", second_order=False)
    source = backbone_source(backbone_args, tokenizer)
    base_config = source.get("base_config")
    model = build_causal_lm(source.get("pretrained_model"),
                            None if base_config is None else base_config_to_dict(base_config), attn)
    model.config.use_cache = False
    check_vocab_fits(model.get_input_embeddings().weight.shape[0], tokenizer)
    return model


def check_sequences_fit(model, collator: CausalLMCollator, splits) -> None:
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


def main(args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, lm_args, data_args = parse_cli(TrainArgs, BackboneArgs, FullContextArgs, DataArgs,
                                                              args=args)
    check_options(backbone_args, lm_args, data_args)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path)
    check_data(tokenizer, splits)
    model = build_model(backbone_args, lm_args, tokenizer)
    collator = CausalLMCollator(tokenizer, max_input_length=lm_args.max_input_length)
    check_sequences_fit(model, collator, splits)
    if train_args.run_name is None:
        train_args.run_name = default_run_name(train_args, backbone_args, lm_args, launched_world_size())
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=collator,
        compute_metrics=make_compute_metrics(tokenizer),
        data_name=Path(data_args.data_path.rstrip("/")).name,
        all_args=(backbone_args, lm_args, data_args),
        next_token_logits=True,
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
    )


if __name__ == "__main__":
    run_cli(main)
