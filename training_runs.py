"""Run names and run records: how a run folder is named, and how its saved arguments are read back.

A run folder is `runs/<data>/<run_name>/run_<seed>/`. Its name is built here from the run's options (the reference's
schemes, kept so that existing run folders resume); what the run was trained with is read from its run record
(run_config.json, or config.json for runs of older code), never recovered from the name.

Name builders take the option dataclasses by their attributes (GradMem, RMT, full-context options), so this module
imports no model.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

RUN_RECORD = "run_config.json"  # the CLI record of a run (cli_args, versions, git commit); marks a run folder
LEGACY_RUN_RECORD = "config.json"  # where runs written by older code keep their record (a dict with cli_args)
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: a run's checkpoints are checkpoint-<step>/
# Arguments that do not change what is trained: they may change when a run is resumed, and runs that differ only in
# them (and in the seed, name and place) are runs of one setting.
RESUMABLE_ARG_CHANGES = {
    "max_steps", "eval_steps", "logging_steps", "early_stopping_patience", "report_to", "overwrite",
    "dataloader_num_workers", "max_eval_samples", "per_device_eval_batch_size", "stop_metric_value",
    "max_consecutive_skipped_steps", "use_cpu", "fast_step", "max_train_minutes", "init_checkpoint_partial",
    "resume_without_record", "log_level", "log_samples", "final_evaluation",
    "train_final_inner_loss",  # a logged statistic only: training computes the same updates either way
    "lean_ops",  # the same functions and gradients with less memory saved for backward
    "recompute_write",  # the same gradients, the WRITE graph recomputed in the backward instead of kept
}
RUN_PLACE_ARGS = {"seed", "run_name", "exp_path", "runs_dir", "init_checkpoint"}  # where a run is and starts from
FAMILIES = ("gradmem", "rmt2segm", "llama", "mamba")  # the first word of the run names of each model


# ----------------------------------------------------------------------------------------------------------------
# Run records
# ----------------------------------------------------------------------------------------------------------------

def read_json_file(path: Path, what: str = "file"):
    """json.loads of a file; an unreadable file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} is unreadable ({type(e).__name__}: {e})") from None


def read_run_record(path: Path) -> dict:
    """A run record (a dict with cli_args); ValueError when the file is unreadable or not a run record."""
    record = read_json_file(path, "run record")
    if not isinstance(record, dict) or "cli_args" not in record:
        raise ValueError(f"{path} is not a run record of this code (no cli_args)")
    return record


def is_run_record(path: Path) -> bool:
    try:
        read_run_record(path)
    except ValueError:
        return False
    return True


def find_run_record(run_dir: Path) -> Optional[Path]:
    """The run record of a folder: run_config.json, or a legacy config.json that holds cli_args; None if neither."""
    for name in (RUN_RECORD, LEGACY_RUN_RECORD):
        if is_run_record(run_dir / name):
            return run_dir / name
    return None


def checkpoint_folders(run_dir: Path) -> list:
    """A run folder's checkpoint-<step> folders, oldest first."""
    folders = [f for f in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}-*")
               if f.is_dir() and f.name.split("-")[-1].isdigit()]
    return sorted(folders, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of a checkpoint-<step> folder."""
    return int(Path(folder).name.split("-")[-1])


def saved_arguments(run_dir: Path) -> dict:
    """The arguments a run was started with (its record's cli_args); {} for a folder without a readable record."""
    path = find_run_record(Path(run_dir))
    return {} if path is None else dict(read_run_record(path)["cli_args"])


def setting(cli_args: dict) -> dict:
    """The arguments that say what is trained: cli_args without the seed, name, place and RESUMABLE_ARG_CHANGES."""
    return {k: v for k, v in cli_args.items() if k not in RESUMABLE_ARG_CHANGES | RUN_PLACE_ARGS}


def family_of_arguments(cli_args: dict) -> Optional[str]:
    """The model family a run trained, from its saved arguments (no name is parsed): gradmem (GradMem's options),
    rmt (RMT's), or the full-context LM's backbone (llama, mamba, gpt2, pythia; `pretrained` for a pretrained one);
    None when the arguments are none of these (or empty)."""
    if "inner_lr" in cli_args and "grad_mode" in cli_args:
        return "gradmem"
    if "use_reconstruction_loss" in cli_args:
        return "rmt"
    if "max_input_length" in cli_args:
        return cli_args.get("base_model") or "pretrained"
    return None


def flat_args(all_args: Sequence) -> dict:
    """The cli_args of a run record: every option of the run's dataclasses (or dicts) in one dict."""
    flat = {}
    for item in all_args:
        flat.update(dataclasses.asdict(item) if dataclasses.is_dataclass(item) else dict(item))
    return flat


# ----------------------------------------------------------------------------------------------------------------
# Run names
# ----------------------------------------------------------------------------------------------------------------

def model_family(run_name: str) -> str:
    """gradmem, rmt2segm, llama, mamba (the first word of the name), or other."""
    for family in FAMILIES:
        if run_name.startswith(family + "_"):
            return family
    return "other"


def backbone_tag(backbone_args, normalize_path: bool = False) -> str:
    """The backbone part of a run name: the pretrained folder/name's last part, or e.g. llama_L4H4D128.

    normalize_path: normalise the path first (SQuAD/bAbI/text-compression names), which differs from the plain last
    part (KV, RMT, full-context names) only for a path ending in '.' or '..'; kept so existing run names resume.
    """
    b = backbone_args
    if b.pretrained_model is not None:
        if normalize_path:
            return os.path.basename(os.path.normpath(b.pretrained_model))
        return Path(b.pretrained_model).name
    return f"{b.base_model}_L{b.n_layer}H{b.n_head}D{b.n_embd}"


def gradmem_run_name(train_args, backbone_args, g, world_size: int) -> str:
    """The reference's KV run-name scheme, e.g.
    gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_64_lr_1e-04"""
    name = f"gradmem_{backbone_tag(backbone_args)}_mem{g.n_mem_tokens}_K{g.K}_ilr{g.inner_lr:g}"
    if g.eval_K is not None or g.eval_inner_lr is not None:  # selection used other WRITE settings
        eval_K = g.K if g.eval_K is None else g.eval_K
        eval_lr = g.inner_lr if g.eval_inner_lr is None else g.eval_inner_lr
        name += f"_evalK{eval_K}_ilr{eval_lr:g}"
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
    return f"{name}_bs_{train_args.effective_batch_size(world_size)}_lr_{train_args.learning_rate:.0e}"


def gradmem_text_run_name(train_args, backbone_args, g, context_length: Optional[int] = None,
                          lora_and_frozen: bool = False) -> str:
    """The SQuAD / bAbI / phonebook / text-compression run-name scheme (floats as written, batch from
    --total_batch_size), e.g. gradmem_gpt2_mem32_K2_ilr0.4_sgd_grad_second_whead_bs_256_lr_1e-04.

    Text compression passes context_length (adds _ctx{L} after the backbone) and lora_and_frozen (adds _wlora{r} and
    _frozen); the SQuAD/bAbI names never had these parts, kept so existing run names resume.
    """
    name = f"gradmem_{backbone_tag(backbone_args, normalize_path=True)}"
    if context_length is not None:
        name += f"_ctx{context_length}"
    name += f"_mem{g.n_mem_tokens}_K{g.K}_ilr{g.inner_lr}"
    name += f"_{'adam' if g.use_adam else 'sgd'}_grad_{g.grad_mode}"
    if g.mem_proj_mode != "none":
        name += f"_{g.mem_proj_mode}"
    if g.use_write_head:
        name += "_whead"
    if lora_and_frozen and g.use_write_lora:
        name += f"_wlora{g.write_lora_r}"
    if lora_and_frozen and g.freeze_backbone:
        name += "_frozen"
    if g.add_inner_loss_to_outer:
        name += f"_add_inner_w{g.inner_loss_weight}"
    total = train_args.total_batch_size or train_args.per_device_batch_size * train_args.gradient_accumulation_steps
    return name + f"_bs_{total}_lr_{train_args.learning_rate:.0e}"


def rmt_run_name(train_args, backbone_args, r, world_size: int) -> str:
    """The reference's RMT scheme, e.g. rmt2segm_llama_L4H4D128_mem8_mem_proj_bs_64_lr_1e-04."""
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


def full_context_run_name(train_args, backbone_args, args, world_size: int) -> str:
    """The reference's full-context scheme, e.g. llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98 or
    mamba_L4D128_bs_64_lr_3e-04."""
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
