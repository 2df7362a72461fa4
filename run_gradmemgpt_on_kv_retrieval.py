"""Train GradMem on a saved {context, query, target} dataset (KV retrieval; also bAbI with a pretrained GPT-2).

    python run_gradmemgpt_on_kv_retrieval.py --data_path ./data/N8-K2V2-V62_1M --per_device_batch_size 64
    accelerate launch --config_file accelerate.yaml run_gradmemgpt_on_kv_retrieval.py ...   (see scripts/*.sh)

Defaults are the paper's KV preset (see training.py). A missing --data_path whose folder name is a KV dataset name
(e.g. N8-K2V2-V62_1M) is generated on the spot. `python run_gradmemgpt_on_kv_retrieval.py --help` lists every option.
"""
import logging
from pathlib import Path
from typing import Optional, Sequence

from grad_memgpt import GradMemGPT, GradMemGPTConfig
from training import (BackboneArgs, DataArgs, GradMemArgs, MemoryModelCollator, TrainArgs, build_backbone_config,
                      check_tokenizer_covers, check_vocab_fits, load_splits, load_tokenizer, make_compute_metrics,
                      parse_cli, run_experiment)

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def default_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, g: GradMemArgs, world_size: int) -> str:
    """The reference's run-name scheme, e.g.
    gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_64_lr_1e-04"""
    if backbone_args.pretrained_model is not None:
        backbone = Path(backbone_args.pretrained_model).name
    else:
        backbone = f"{backbone_args.base_model}_L{backbone_args.n_layer}H{backbone_args.n_head}D{backbone_args.n_embd}"
    name = f"gradmem_{backbone}_mem{g.n_mem_tokens}_K{g.K}_ilr{g.inner_lr:g}"
    if g.last_K_second_order is not None and g.last_K_second_order != g.K:
        name += f"_last_K{g.last_K_second_order}"
    if g.n_ctrl_tokens:
        name += f"_ctrl{g.n_ctrl_tokens}"
    if g.use_adam:
        name += "_adam"
    if g.inner_clip_value is not None:
        name += f"_iclipv{g.inner_clip_value:g}"
    if g.inner_clip_norm is not None:
        name += f"_iclipn{g.inner_clip_norm:g}"
    if g.mem_proj_mode == "proj":
        name += "_mem_proj"
    elif g.mem_proj_mode == "per_sample":
        name += "_mem_proj_per_sample"
    if g.use_write_head:
        name += "_whead"
    if g.use_write_lora:
        name += f"_wlora{g.write_lora_r}"
    if g.freeze_backbone:
        name += "_frozen"
    name += f"_grad_{g.grad_mode}"
    if g.add_inner_loss_to_outer:
        name += f"_add_inner_w{g.inner_loss_weight:g}"
    batch = train_args.per_device_batch_size * world_size * train_args.gradient_accumulation_steps
    return f"{name}_bs_{batch}_lr_{train_args.learning_rate:.0e}"


def build_model(backbone_args: BackboneArgs, g: GradMemArgs, tokenizer) -> GradMemGPT:
    if backbone_args.pretrained_model is not None:
        backbone = {"pretrained_model": backbone_args.pretrained_model}
    else:
        backbone = {"base_config": build_backbone_config(
            backbone_args.base_model, backbone_args.n_layer, backbone_args.n_head, backbone_args.n_embd, tokenizer,
            backbone_args.max_position_embeddings)}
    config = GradMemGPTConfig(
        **backbone,
        n_mem_tokens=g.n_mem_tokens, K=g.K, lr=g.inner_lr, use_adam=g.use_adam, grad_mode=g.grad_mode,
        last_K_second_order=g.last_K_second_order, n_ctrl_tokens=g.n_ctrl_tokens,
        inner_clip_value=g.inner_clip_value, inner_clip_norm=g.inner_clip_norm, use_mem_proj=g.use_mem_proj,
        mem_proj_mode=g.mem_proj_mode, use_write_head=g.use_write_head, use_write_lora=g.use_write_lora,
        write_lora_r=g.write_lora_r, write_lora_alpha=g.write_lora_alpha, write_lora_dropout=g.write_lora_dropout,
        write_lora_target_modules=g.write_lora_target_modules, freeze_backbone=g.freeze_backbone,
        use_gradient_checkpointing=g.use_gradient_checkpointing, attn_implementation=g.attn_implementation,
        add_inner_loss_to_outer=g.add_inner_loss_to_outer, inner_loss_weight=g.inner_loss_weight,
    )
    model = GradMemGPT(config)
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    return model


def main(args: Optional[Sequence[str]] = None) -> dict:
    import os

    train_args, backbone_args, gradmem_args, data_args = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs,
                                                                   args=args)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path)
    check_tokenizer_covers(tokenizer, splits["train"])
    model = build_model(backbone_args, gradmem_args, tokenizer)
    if train_args.run_name is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        train_args.run_name = default_run_name(train_args, backbone_args, gradmem_args, world_size)
    hint = (f"The inner loop probably diverged: lower --inner_lr (now {gradmem_args.inner_lr:g}) or bound the inner "
            f"step with --inner_clip_norm; a lower --learning_rate (now {train_args.learning_rate:g}) may also help.")
    return run_experiment(
        train_args, model, tokenizer, splits,
        collator=MemoryModelCollator(tokenizer, max_context_length=data_args.max_context_length),
        compute_metrics=make_compute_metrics(tokenizer),
        data_name=Path(data_args.data_path.rstrip("/")).name,
        all_args=(backbone_args, gradmem_args, data_args),
        nonfinite_hint=hint,
    )


if __name__ == "__main__":
    main()
