"""Train the RMT2Segm baseline (rmt.py) on a saved {context, query, target} dataset (KV retrieval, bAbI, phonebook).

    python run_rmt_on_kv_retrieval.py --data_path ./data/N16-K2V2-V62_1M --mem_proj_mode proj --use_mem_proj
    accelerate launch --config_file accelerate.yaml run_rmt_on_kv_retrieval.py ...   (see scripts/run_rmt_on_kv_retrieval.sh)

From scratch (`--base_model llama|gpt2|pythia`, default llama) or from a pretrained LM (`--pretrained_model NAME`,
which the reference script rejected). A missing --data_path whose folder name is a KV dataset name (e.g.
N16-K2V2-V62_1M) is generated on the spot. `python run_rmt_on_kv_retrieval.py --help` lists every option.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from rmt import RMT2Segm, RMT2SegmConfig
from training import (BackboneArgs, DataArgs, MemoryModelCollator, TrainArgs, backbone_source, backbone_tag,
                      check_data, check_vocab_fits, launched_world_size, load_splits, load_tokenizer,
                      make_compute_metrics, parse_cli, run_cli, run_experiment, single_token_ids)
from evaluation import SampleLogArgs, answer_sample_callbacks, make_generated_answer_metrics

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


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
    use_write_head: bool = field(default=False, metadata={"help": "own head for the reconstruction loss (needs it)"})
    use_mem_residual: bool = field(default=False, metadata={"help": "memory_k = memory_{k-1} + LayerNorm(write-out), K >= 2"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute backbone activations"})
    attn_implementation: str = field(default="eager", metadata={"help": "eager, sdpa, flash_attention_2, ... or auto"})

    def config_kwargs(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def validate(self) -> None:
        RMT2SegmConfig(**self.config_kwargs())  # raises on any inconsistent option, before any work


def default_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, r: RMTArgs, world_size: int) -> str:
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


def check_backbone(backbone_args: BackboneArgs) -> None:
    if backbone_args.base_model == "mamba":
        raise ValueError("--base_model mamba: RMT needs a transformer backbone (llama, gpt2, pythia); the Mamba "
                         "baseline is run_gpt2_on_kv_retrieval.py")


def build_model(backbone_args: BackboneArgs, r: RMTArgs, tokenizer) -> RMT2Segm:
    check_backbone(backbone_args)
    model = RMT2Segm(RMT2SegmConfig(**backbone_source(backbone_args, tokenizer), **r.config_kwargs()))
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    if model.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"the backbone's pad id {model.pad_token_id} differs from the tokenizer's "
                         f"{tokenizer.pad_token_id}: the model would not recognise the collator's padding")
    return model


def main(args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, rmt_args, data_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, RMTArgs, DataArgs, SampleLogArgs, args=args)
    check_backbone(backbone_args)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path)
    check_data(tokenizer, splits)
    model = build_model(backbone_args, rmt_args, tokenizer)
    if train_args.run_name is None:
        train_args.run_name = default_run_name(train_args, backbone_args, rmt_args, launched_world_size())
    collator = MemoryModelCollator(tokenizer, max_context_length=data_args.max_context_length)
    ignore_ids = single_token_ids(tokenizer, ("!", "|"))  # the KV target's structural tokens are not scored
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=collator,
        compute_metrics=make_compute_metrics(tokenizer),
        answer_metrics=make_generated_answer_metrics(collator, ignore_ids),
        extra_callbacks=answer_sample_callbacks(sample_args, collator, tokenizer, ignore_ids),
        data_name=Path(data_args.data_path.rstrip("/")).name,
        all_args=(backbone_args, rmt_args, data_args, sample_args),
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
    )


if __name__ == "__main__":
    run_cli(main)
