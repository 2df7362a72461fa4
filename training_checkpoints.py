"""Checkpoint files: warm starts (load_init_checkpoint) and whether a checkpoint folder is whole enough to resume.

Nothing is loaded to check a checkpoint: safetensors headers and torch.save zip directories tell a truncated file.
"""
import json
import logging
import zipfile
from pathlib import Path
from typing import Optional

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from training_runs import checkpoint_folders, checkpoint_step

logger = logging.getLogger("gradmem")


def load_init_checkpoint(model: torch.nn.Module, path: str, partial: bool = False) -> None:
    """Warm start from a .safetensors file or a checkpoint folder.

    Every trainable tensor of the model must come from the checkpoint with its shape (the next curriculum stage from
    the previous one: same architecture, other data). Anything else is an error naming the likely cause, unless
    `partial` (--init_checkpoint_partial) asks to load only the tensors that fit; what was not loaded is logged.
    A model's optional hook `adapt_checkpoint(state_dict) -> (state_dict, hint)` renames the tensors first (e.g. a
    reference checkpoint's) and adds a hint to the errors (the options the checkpoint was written with).
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"--init_checkpoint {path}: no such safetensors file (or folder with model.safetensors)")
    problem = _safetensors_problem(p)
    if problem:
        raise ValueError(f"--init_checkpoint {p} {problem}")
    adapt = getattr(model, "adapt_checkpoint", None)  # the model's hook: other tensor names, the options written with
    state_dict, hint = adapt(load_file(str(p))) if adapt is not None else (load_file(str(p)), "")
    own = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and own[k].shape != v.shape}
    if mismatched and not partial:
        raise ValueError(f"--init_checkpoint {path} does not fit the model ({_mismatch_cause(mismatched)}): "
                         + "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in mismatched.items()) + hint)
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    model.load_state_dict(fitting, strict=False)
    loaded_ptrs = {own[k].data_ptr() for k in fitting}
    not_loaded = [k for k in own if k not in fitting and own[k].data_ptr() not in loaded_ptrs]  # tied copies are loaded
    unused = [k for k in state_dict if k not in fitting]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    untrained = [k for k in not_loaded if k in trainable]
    if (untrained or unused) and not partial:
        raise ValueError(
            f"--init_checkpoint {path} leaves {len(untrained)} of the model's {len(trainable)} trainable tensors "
            f"unloaded (e.g. {', '.join(untrained[:3]) or 'none'}) and {len(unused)} checkpoint tensors unused (e.g. "
            f"{', '.join(unused[:3]) or 'none'}): it was trained with another architecture (--base_model, --n_layer, "
            f"model options).{hint} Pass --init_checkpoint_partial to load only the tensors that fit")
    logger.warning("init_checkpoint %s: loaded %d tensors; not loaded %s; unused %s", p, len(fitting),
                   not_loaded or "none", unused or "none")


def _mismatch_cause(mismatched: dict) -> str:
    """The likely reason for checkpoint tensors of other shapes, read from the token embedding [vocab, width]."""
    for name, (saved, wanted) in mismatched.items():
        if ("embed" in name or "wte" in name) and len(saved) == 2:
            if saved[1] != wanted[1]:
                return f"another width: --n_embd {saved[1]} in the checkpoint, {wanted[1]} here"
            return "embedding/head sizes differ: the checkpoint was trained with another tokenizer/vocabulary"
    return "another architecture or model options (e.g. --n_head, --n_mem_tokens, --mem_proj_mode)"


def _safetensors_problem(path: Path) -> Optional[str]:
    """None when the safetensors file is whole (its header parses and the file has the size the header says)."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"is unreadable ({type(e).__name__}: {e})"
    if size != 8 + header_size + data_end:
        return f"is truncated ({size} bytes, its header says {8 + header_size + data_end})"
    return None


def _torch_file_problem(path: Path) -> Optional[str]:
    """None when a torch.save file (a zip archive) is whole: truncated or empty files have no readable directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"is unreadable or truncated ({e})"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from, naming the file; None when it can.

    HF writes the weights first and trainer_state.json last; every weight, optimizer, scheduler and RNG file is
    checked for truncation (cheaply: headers and zip directories, nothing is loaded)."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{state_file} is missing (interrupted while saving?)"
    except (OSError, ValueError) as e:
        return f"{state_file} is unreadable ({e})"
    if not isinstance(state, dict) or folder.name != f"{PREFIX_CHECKPOINT_DIR}-{state.get('global_step')}":
        return f"{state_file} does not name step {folder.name.split('-')[-1]}"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} holds no model weights (model.safetensors)"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path} {problem}"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]):
        problem = _torch_file_problem(path)
        if problem:
            return f"{path} {problem}"
    return None


def _interrupted_save(folder: Path) -> bool:
    """A checkpoint that a kill cut short while writing its weights: no trainer_state.json and no whole weights.
    Only such folders are ever removed (never one that holds complete weights)."""
    weights = list(folder.glob("*.safetensors"))
    whole = bool(weights) and all(_safetensors_problem(p) is None for p in weights)
    return not (folder / "trainer_state.json").exists() and not whole


def newest_usable_checkpoint(run_dir: Path) -> Optional[Path]:
    return next((f for f in reversed(checkpoint_folders(run_dir)) if checkpoint_problem(f) is None), None)


def resume_checkpoint(run_dir: Path) -> tuple:
    """(newest usable checkpoint or None, checkpoints interrupted while saving). Falls back past unusable newer
    checkpoints with a warning; raises, naming the file, when checkpoints exist but none can be resumed from."""
    usable, broken, interrupted = [], [], []
    for folder in checkpoint_folders(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            usable.append(folder)
        elif _interrupted_save(folder):
            logger.warning("%s was interrupted while saving (%s): it will be removed", folder, problem)
            interrupted.append(folder)
        else:
            logger.warning("%s cannot be resumed from: %s. It is kept (not deleted)", folder, problem)
            broken.append((folder, problem))
    resume_from = usable[-1] if usable else None
    newer = [(f, p) for f, p in broken if resume_from is None or checkpoint_step(f) > checkpoint_step(resume_from)]
    if newer and resume_from is None:
        raise ValueError(f"cannot resume {run_dir}: {newer[-1][1]}, and there is no earlier complete checkpoint. "
                         "Restore or delete that checkpoint, or pass --overwrite to start over")
    if newer:
        logger.warning("falling back to the previous complete checkpoint %s (newer %s cannot be resumed from)",
                       resume_from, ", ".join(f.name for f, _ in newer))
    return resume_from, interrupted
