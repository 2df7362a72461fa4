"""The one shared trainer: CLI dataclasses, tokenizer and backbone config, collators, metrics, run directory and
the Hugging Face `Trainer` that every `run_*.py` script calls.

A run script is wiring only:

    train_args, backbone_args, model_args, data_args = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path)
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)  # or: config from backbone_source(...)
    run_experiment(train_args, model, tokenizer, splits, MemoryModelCollator(tokenizer), make_compute_metrics(tokenizer),
                   data_name=..., all_args=(backbone_args, model_args, data_args))

Run folder: `runs/<data>/<run_name>/run_<seed>/` (or `--exp_path`) with `run_config.json` (all args, package versions,
git commit), HF checkpoints, the selected model at the root (`config.json`, weights, tokenizer: `from_pretrained(run_dir)`),
tensorboard events, `all_results.json`, `trainer_state.json`, `learning_curve.png`.
Re-running the same command resumes an unfinished run and reports a finished one; `--overwrite` starts over, in a
run folder only. Nothing is written or deleted before every argument is validated (README: Resume, --overwrite).

Defaults are the paper's KV preset (reference `scripts/run_gradmemgpt_on_kv_retrieval.sh`), not the reference
script's defaults: the reference script defaulted to `grad_mode=none`, Adam inner optimiser and K=3, which no preset
and no reported result used, so running it without the preset's flags silently trained a different model.
"""
import dataclasses
import errno
import fnmatch
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    EarlyStoppingCallback,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from grad_memgpt import GradMemGPT, GradMemGPTConfig, check_right_padding
from guards import CollapseRollback, GradNormSpikeGuard, restore_checkpoint_in_place

logger = logging.getLogger("gradmem")

REPO_DIR = Path(__file__).resolve().parent
IGNORE_INDEX = -100
LOG_LEVELS = ("debug", "info", "warning", "error")
BASE_MODELS = ("llama", "gpt2", "pythia", "mamba")
SCHEDULERS = typing.Literal[tuple(t.value for t in transformers.SchedulerType)]  # --lr_scheduler_type choices
CURVE_FILE = "learning_curve.png"
COMMON_METRICS = {"loss", "token_accuracy", "exact_match"}  # reported by every evaluation
# Arguments that may change when a run is resumed (they do not change what is being trained).
RESUMABLE_ARG_CHANGES = {
    "max_steps", "eval_steps", "logging_steps", "early_stopping_patience", "report_to", "overwrite",
    "dataloader_num_workers", "max_eval_samples", "per_device_eval_batch_size", "stop_metric_value",
    "max_consecutive_skipped_steps", "use_cpu", "fast_step", "max_train_minutes", "init_checkpoint_partial",
    "resume_without_record", "log_level", "log_samples",
}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def launched_world_size() -> int:
    """The number of processes of this launch (WORLD_SIZE, set by accelerate launch / torchrun); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class TrainArgs:
    """Trainer and run options shared by every run script (reference names, paper-preset defaults)."""

    exp_path: Optional[str] = field(default=None, metadata={"help": "run folder; default runs/<data>/<run_name>/run_<seed>"})
    run_name: Optional[str] = field(default=None, metadata={"help": "default: built from the model options by the run script"})
    runs_dir: str = field(default="./runs", metadata={"help": "root of the default run folder"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing run folder and start over (default: resume)"})
    init_checkpoint: Optional[str] = field(default=None, metadata={"help": "warm start: a .safetensors file or a checkpoint folder"})
    init_checkpoint_partial: bool = field(default=False, metadata={
        "help": "--init_checkpoint may leave trainable tensors unloaded or skip tensors of other shapes (default: error)"})
    resume_without_record: bool = field(default=False, metadata={
        "help": "resume a run folder whose run record run_config.json is missing or unreadable (settings not compared)"})
    per_device_batch_size: int = field(default=64, metadata={"help": "train (and eval) batch size per process"})
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata={"help": "default: per_device_batch_size"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    total_batch_size: Optional[int] = field(default=None, metadata={"help": "checked == per_device x processes x grad_acc"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of the outer AdamW"})
    lr_scheduler_type: SCHEDULERS = field(default="constant_with_warmup", metadata={"help": "HF learning-rate schedule"})
    warmup_steps: int = field(default=10_000, metadata={"help": "linear warmup of the learning rate, in optimizer steps"})
    max_steps: int = field(default=1_000_000, metadata={"help": "optimizer steps of the run (>= 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "outer gradient clipping (<= 0: off)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast; weights and optimiser states stay fp32"})
    fp32: bool = field(default=False, metadata={"help": "plain fp32 even if accelerate launch asked for mixed precision"})
    tf32: bool = field(default=False, metadata={"help": "allow TF32 matmuls on Ampere+ GPUs (default off: exact fp32)"})
    logging_steps: int = field(default=500, metadata={"help": "log the training loss and stats every this many steps"})
    eval_steps: int = field(default=500, metadata={"help": "evaluate and checkpoint every this many steps"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "evaluate on the first N validation samples"})
    metric_for_best_model: str = field(default="token_accuracy", metadata={
        "help": "eval metric that selects the best checkpoint (higher is better unless it ends in loss)"})
    early_stopping_patience: int = field(default=500, metadata={"help": "evals without improvement before stopping (0: off)"})
    stop_metric: str = field(default="exact_match", metadata={"help": "stop when this eval metric reaches stop_metric_value"})
    stop_metric_value: Optional[float] = field(default=1.0, metadata={"help": "None: never stop on a metric value"})
    max_train_minutes: Optional[float] = field(
        default=None,
        metadata={"help": "wall-clock budget of this invocation: stop at the first evaluation after this many minutes "
                          "of training (then the best checkpoint is evaluated as usual); None: no budget"},
    )
    max_consecutive_skipped_steps: int = field(
        default=20, metadata={"help": "error after this many optimizer steps in a row with non-finite loss/gradients"}
    )
    spike_factor: float = field(
        default=10.0,
        metadata={"help": "skip an optimizer step whose gradient norm (before clipping) is above this many times the "
                          "median of the last --spike_window norms (counted as spike_skipped_steps); 0: off"})
    spike_window: int = field(default=200, metadata={"help": "steps in the spike guard's running median"})
    collapse_ratio: float = field(
        default=0.5,
        metadata={"help": "roll back to the best checkpoint, and halve the lr, when the eval metric_for_best_model "
                          "falls below this fraction of its best (once the best is >= 0.2) or the eval loss is not "
                          "finite (counted as rollbacks); 0: off"})
    max_rollbacks: int = field(default=3, metadata={"help": "stop the run at the collapse after this many rollbacks"})
    seed: int = field(default=142, metadata={"help": "seed of the model's initialisation and the data order"})
    report_to: str = field(default="tensorboard", metadata={"help": "comma list of tensorboard, wandb; or none"})
    dataloader_num_workers: int = field(default=2, metadata={"help": "data loading worker processes (0: in the main one)"})
    use_cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})
    log_level: typing.Literal[LOG_LEVELS] = field(
        default="info", metadata={"help": "log level of this code's messages (transformers' own stay at warning)"})
    fast_step: typing.Literal["auto", "off"] = field(
        default="auto",
        metadata={"help": "auto: on CUDA, record the whole training step in a CUDA graph (fast_step.py; same numbers "
                          "in fp32) when the setup allows it, else train eagerly and log why; off: always eager"},
    )

    def effective_batch_size(self, world_size: int) -> int:
        """Samples per optimizer step: per-device batch x processes x gradient accumulation steps."""
        return self.per_device_batch_size * world_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        if self.fast_step not in ("auto", "off"):
            raise ValueError(f"--fast_step must be auto or off, got {self.fast_step!r}")
        if self.bf16 and self.fp32:
            raise ValueError("--bf16 and --fp32 are mutually exclusive; pass one of them")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_batch_size and --gradient_accumulation_steps must be >= 1")
        world_size = launched_world_size()
        effective = self.effective_batch_size(world_size)
        if self.total_batch_size is not None and self.total_batch_size != effective:
            per_step = self.per_device_batch_size * world_size
            fix = (f"set --gradient_accumulation_steps {self.total_batch_size // per_step}"
                   if self.total_batch_size % per_step == 0 else
                   f"choose a per-device batch size that divides {self.total_batch_size} / {world_size} processes")
            raise ValueError(
                f"--total_batch_size {self.total_batch_size} != per_device_batch_size {self.per_device_batch_size} x "
                f"{world_size} processes x gradient_accumulation_steps {self.gradient_accumulation_steps} = {effective}; "
                + fix
            )
        for name in ("eval_steps", "logging_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        if not (math.isfinite(self.spike_factor) and self.spike_factor >= 0) or self.spike_window < 4:
            raise ValueError(f"need --spike_factor >= 0 (0: off) and --spike_window >= 4, got {self.spike_factor}, "
                             f"{self.spike_window}")
        if not 0 <= self.collapse_ratio < 1 or self.max_rollbacks < 1:
            raise ValueError(f"need 0 <= --collapse_ratio < 1 (0: off) and --max_rollbacks >= 1, got "
                             f"{self.collapse_ratio}, {self.max_rollbacks}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max_train_minutes must be > 0 (minutes of training), got {self.max_train_minutes}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be >= 1 (or None: the whole valid split), got {self.max_eval_samples}")
        check_finite(self, "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                     "stop_metric_value")
        self.mixed_precision()  # raises on an unsupported accelerate setting

    def mixed_precision(self) -> str:
        """'bf16' or 'no': the flags win, else `accelerate launch --mixed_precision`, else fp32."""
        if self.bf16:
            return "bf16"
        if self.fp32:
            return "no"
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched not in ("no", "bf16"):
            raise ValueError(f"mixed precision {launched!r} (from accelerate launch) is not supported; use bf16 or no")
        return launched


@dataclass
class BackboneArgs:
    """Which causal LM sits inside the model: a from-scratch config or a pretrained name/folder."""

    base_model: Optional[typing.Literal[BASE_MODELS]] = field(
        default=None, metadata={"help": "from-scratch backbone; default llama unless --pretrained_model"}
    )
    pretrained_model: Optional[str] = field(default=None, metadata={"help": "HF name or local folder of a pretrained LM"})
    n_layer: int = field(default=4, metadata={"help": "from-scratch backbone: layers"})
    n_head: int = field(default=4, metadata={"help": "from-scratch backbone: attention heads"})
    n_embd: int = field(default=128, metadata={"help": "from-scratch backbone: hidden size"})
    tokenizer_path: str = field(default="./tokenizers/kv_alphabet_62/", metadata={"help": "tokenizer of a from-scratch backbone"})
    max_position_embeddings: Optional[int] = field(
        default=None, metadata={"help": "llama: plain RoPE (theta 1e4) with this many positions instead of llama3 scaling"}
    )

    def validate(self) -> None:
        if self.base_model is not None and self.pretrained_model is not None:
            raise ValueError(
                f"--base_model {self.base_model} and --pretrained_model {self.pretrained_model} are mutually exclusive: "
                "--base_model builds a new backbone from scratch, --pretrained_model loads one"
            )
        if self.pretrained_model is None and self.base_model is None:
            self.base_model = "llama"
        if self.base_model is not None and self.base_model not in BASE_MODELS:
            raise ValueError(f"unknown --base_model {self.base_model!r}; choose one of {', '.join(BASE_MODELS)}")
        if self.base_model is not None and self.n_embd % self.n_head != 0:
            raise ValueError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")


@dataclass
class GradMemArgs:
    """GradMem model options (reference names; defaults = the paper's KV preset)."""

    n_mem_tokens: int = field(default=8, metadata={"help": "M memory vectors"})
    K: int = field(default=2, metadata={"help": "inner (WRITE) gradient steps"})
    last_K_second_order: Optional[int] = field(default=None, metadata={"help": "differentiate through the last L steps only"})
    inner_lr: float = field(default=0.04, metadata={"help": "learning rate of the inner (WRITE) steps on the memory"})
    use_adam: bool = field(default=False, metadata={"help": "inner Adam (first order) instead of SGD"})
    grad_mode: typing.Literal["none", "first", "second"] = field(default="second", metadata={
        "help": "outer gradient through the WRITE: none (the written memory is a constant), first (first order), "
                "second (exact, through the inner gradients)"})
    n_ctrl_tokens: int = field(default=0, metadata={"help": "learned start/end marker vectors around the memory"})
    inner_clip_value: Optional[float] = field(default=None, metadata={"help": "clip inner gradients elementwise"})
    inner_clip_norm: Optional[float] = field(default=None, metadata={"help": "clip each sample's inner gradient norm"})
    use_mem_proj: bool = field(default=False, metadata={"help": "must be given exactly when --mem_proj_mode is not none"})
    mem_proj_mode: typing.Literal["none", "proj", "per_sample"] = field(default="none", metadata={
        "help": "linear projection of the memory before READ: none, proj (shared) or per_sample"})
    use_write_head: bool = field(default=True, metadata={"help": "own output head for the inner (WRITE) loss"})
    use_write_lora: bool = field(default=False, metadata={"help": "LoRA adapters active during WRITE only"})
    write_lora_r: int = field(default=8, metadata={"help": "write LoRA rank"})
    write_lora_alpha: int = field(default=16, metadata={"help": "write LoRA alpha"})
    write_lora_dropout: float = field(default=0.0, metadata={"help": "write LoRA dropout"})
    write_lora_target_modules: Optional[str] = field(default=None, metadata={
        "help": "comma list of module names for the write LoRA; default: the backbone's attention and MLP projections"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train only the memory parameters (and adapters)"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute backbone activations"})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto: the fused Triton double backward on CUDA (exact_eager on the CPU) for second-order "
                          "training, sdpa otherwise; or any name attn_double_bwd.resolve_attn_implementation knows"},
    )
    add_inner_loss_to_outer: bool = field(default=True, metadata={"help": "add the inner loss to the training loss"})
    inner_loss_weight: Optional[float] = field(
        default=None, metadata={"help": "weight of the added inner loss; None -> 0.5 (paper preset) when it is added"}
    )

    def validate(self) -> None:
        check_finite(self, "inner_lr", "inner_clip_value", "inner_clip_norm", "inner_loss_weight")
        if self.grad_mode not in ("none", "first", "second"):
            raise ValueError(f"--grad_mode must be none, first or second, got {self.grad_mode!r}")
        if self.mem_proj_mode not in ("none", "proj", "per_sample"):
            raise ValueError(f"--mem_proj_mode must be none, proj or per_sample, got {self.mem_proj_mode!r}")
        if self.use_mem_proj != (self.mem_proj_mode != "none"):
            raise ValueError("--use_mem_proj must be given exactly when --mem_proj_mode is proj or per_sample")
        if self.inner_loss_weight is not None and not self.add_inner_loss_to_outer:
            raise ValueError("--inner_loss_weight is only used with --add_inner_loss_to_outer (drop one of them)")
        if self.add_inner_loss_to_outer and self.inner_loss_weight is None:
            self.inner_loss_weight = 0.5


@dataclass
class DataArgs:
    data_path: str = field(
        default="./data/N8-K2V2-V62_1M",
        metadata={"help": "save_to_disk folder with train/valid splits; a missing KV-named folder is generated"},
    )
    max_context_length: Optional[int] = field(default=None, metadata={"help": "keep the first N context tokens"})

    def validate(self) -> None:
        if self.max_context_length is not None and self.max_context_length < 1:
            raise ValueError(f"--max_context_length must be >= 1 (or None: whole contexts), got {self.max_context_length}")


def check_finite(args, *names: str) -> None:
    """Float options must be finite numbers (nan or inf would train on garbage); None stays allowed."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}")


def _take_none_values(types: Sequence, args: list) -> tuple:
    """(args without `--name None` of Optional number options, those names): argparse would reject 'None' as a
    number, though such an option's None means 'off'. The names are set to None after parsing."""
    optional_numbers = {name for t in types for name, hint in typing.get_type_hints(t).items()
                        if type(None) in typing.get_args(hint) and {int, float} & set(typing.get_args(hint))}
    kept, none_names, i = [], set(), 0
    while i < len(args):
        name, equals, value = args[i].partition("=")
        if not equals and i + 1 < len(args):
            value = args[i + 1]
        if name.startswith("--") and name[2:] in optional_numbers and value in ("None", "none"):
            none_names.add(name[2:])
            i += 1 if equals else 2
            continue
        kept.append(args[i])
        i += 1
    return kept, none_names


def add_log_level_argument(parser) -> None:
    """--log_level of the entry points that are not run scripts (evaluate_model.py, predict.py)."""
    parser.add_argument("--log_level", default="info", choices=LOG_LEVELS, help="logging level (default: info)")


def setup_logging(level: str) -> None:
    """This code's messages at `level` (a run script's --log_level) with time and level; progress bars of saving and
    dataset writing only on a terminal (they leave escape codes in log files)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level.upper())  # the "gradmem" logger only: other libraries keep their own levels
    if not sys.stderr.isatty():
        import datasets

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def parse_cli(*types, args: Optional[Sequence[str]] = None) -> tuple:
    """Parse the command line into the given dataclasses and validate each (errors before any work), then seed
    python, numpy and torch with the run's --seed, so that the model built next starts from the same weights.
    Optional number options accept `None` (e.g. --stop_metric_value None: never stop on a metric value)."""
    args, none_names = _take_none_values(types, list(sys.argv[1:] if args is None else args))
    parsed = HfArgumentParser(types).parse_args_into_dataclasses(args=args)
    for item in parsed:
        for name in none_names & {f.name for f in dataclasses.fields(item)}:
            setattr(item, name, None)
    for item in parsed:
        if hasattr(item, "validate"):
            item.validate()
    level = next((item.log_level for item in parsed if isinstance(item, TrainArgs)), None)
    if level is not None:
        setup_logging(level)
    seed = next((item.seed for item in parsed if isinstance(getattr(item, "seed", None), int)), None)
    if seed is not None:
        transformers.set_seed(seed)
    return tuple(parsed)


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def run_cli(main: Callable) -> None:
    """A run script's entry point: user errors (bad flags, paths, data, settings: ValueError and missing or wrong
    paths) print one clear line and exit 2; a full disk and a diverged training say so and exit 1; anything else is
    a bug and keeps its traceback. GRADMEM_TRACEBACK=1 shows the traceback of every error."""
    try:
        main()
    except Exception as error:
        if os.environ.get("GRADMEM_TRACEBACK"):
            raise
        if _is_disk_full(error):
            sys.exit(f"error: the disk is full (no space left on device, or a quota) while writing: {error}")
        if isinstance(error, FloatingPointError):
            sys.exit(f"error: {error}")
        if isinstance(error, USER_ERRORS):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


DISK_FULL_MESSAGES = ("No space left on device", "StorageFull", "file write failed")  # OS, safetensors, torch.save


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (safetensors and torch.save wrap it in their own errors; torch.save's
    'file write failed' is a short write, i.e. a full disk or quota)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or any(m in str(error) for m in DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and backbone config
# ----------------------------------------------------------------------------------------------------------------

def _repo_relative(path: str) -> Path:
    """A relative path that does not exist from the current directory is looked up in the repository."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_DIR / p).exists():
        return REPO_DIR / p
    return p


def load_tokenizer(backbone_args: BackboneArgs) -> PreTrainedTokenizerBase:
    """The pretrained model's tokenizer (pad := eos if it has none) or the from-scratch one; always right padding."""
    if backbone_args.pretrained_model is not None:
        tokenizer = AutoTokenizer.from_pretrained(backbone_args.pretrained_model)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {backbone_args.pretrained_model} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
    else:
        path = _repo_relative(backbone_args.tokenizer_path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer folder {backbone_args.tokenizer_path} not found; the KV tokenizers are committed under "
                "tokenizers/ and rebuilt by `python kv_dataset_utils.py --save_tokenizers`"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {path} has no pad token")
    if not tokenizer.is_fast:
        raise ValueError("a fast tokenizer is needed (character offsets locate the target tokens)")
    if tokenizer.padding_side != "right":
        logger.info("tokenizer padding side %r -> 'right' (memory models rely on right padding)", tokenizer.padding_side)
        tokenizer.padding_side = "right"
    return tokenizer


def build_backbone_config(
    base_model: str,
    n_layer: int,
    n_head: int,
    n_embd: int,
    tokenizer: PreTrainedTokenizerBase,
    max_position_embeddings: Optional[int] = None,
) -> PretrainedConfig:
    """A from-scratch backbone config, written locally (no hub access).

    llama:  Llama-3.2-1B family settings (tied embeddings, rope_theta 500000 with llama3 rope scaling, 131072
            positions, rms eps 1e-5, SiLU) with kv heads = heads, head_dim = width / heads, FFN = 4 x width.
            With `max_position_embeddings`, plain RoPE (theta 10000, no scaling) like the reference GPT baseline.
    gpt2:   GPT-2 small settings (1024 positions, gelu_new, dropout 0.1), FFN = 4 x width.
    pythia: Pythia-160m settings (gpt_neox: parallel residual, rotary on 25% of head dims, 2048 positions, untied
            embeddings), FFN = 4 x width.
    mamba:  mamba-130m-hf settings with expand 4 (d_inner = 4 x width), time_step_rank = ceil(width / 16); no heads.
    Vocabulary size and special ids come from the tokenizer.
    """
    vocab = len(tokenizer)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if base_model == "llama":
        from transformers import LlamaConfig

        if max_position_embeddings is None:
            positions = 131072
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
        else:
            positions, rope = max_position_embeddings, {"rope_type": "default", "rope_theta": 10000.0}
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, head_dim=n_embd // n_head, hidden_act="silu",
            max_position_embeddings=positions, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False, initializer_range=0.02, **special,
        )
    elif base_model == "gpt2":
        from transformers import GPT2Config

        config = GPT2Config(
            vocab_size=vocab, n_positions=max_position_embeddings or 1024, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_inner=4 * n_embd, activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1,
            attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02, **special,
        )
    elif base_model == "pythia":
        from transformers import GPTNeoXConfig

        config = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
            intermediate_size=4 * n_embd, hidden_act="gelu", max_position_embeddings=max_position_embeddings or 2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
            hidden_dropout=0.0, initializer_range=0.02, **special,
        )
    elif base_model == "mamba":
        from transformers import MambaConfig

        config = MambaConfig(
            vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer, state_size=16, expand=4,
            intermediate_size=4 * n_embd, conv_kernel=4, time_step_rank=math.ceil(n_embd / 16), use_bias=False,
            use_conv_bias=True, hidden_act="silu", initializer_range=0.1, residual_in_fp32=True,
            layer_norm_epsilon=1e-5, tie_word_embeddings=True, **special,
        )
    else:
        raise ValueError(f"unknown base model {base_model!r}; choose one of {', '.join(BASE_MODELS)}")
    config.use_cache = False
    config.dtype = torch.float32
    return config



def backbone_source(backbone_args: BackboneArgs, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The backbone part of a memory-model config: {pretrained_model} or {base_config} (from scratch)."""
    if backbone_args.pretrained_model is not None:
        return {"pretrained_model": backbone_args.pretrained_model}
    return {"base_config": build_backbone_config(
        backbone_args.base_model, backbone_args.n_layer, backbone_args.n_head, backbone_args.n_embd, tokenizer,
        backbone_args.max_position_embeddings)}


def backbone_tag(backbone_args: BackboneArgs, normalize_path: bool = False) -> str:
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


def build_grad_memgpt(backbone_args: BackboneArgs, g: GradMemArgs, tokenizer: PreTrainedTokenizerBase) -> GradMemGPT:
    """GradMemGPT around a pretrained LM (--pretrained_model) or a from-scratch backbone (--base_model)."""
    check_right_padding(tokenizer)
    options = {name: getattr(g, name) for name in (
        "n_mem_tokens", "K", "last_K_second_order", "use_adam", "grad_mode", "n_ctrl_tokens", "inner_clip_value",
        "inner_clip_norm", "use_mem_proj", "mem_proj_mode", "use_write_head", "use_write_lora", "write_lora_r",
        "write_lora_alpha", "write_lora_dropout", "write_lora_target_modules", "freeze_backbone",
        "use_gradient_checkpointing", "attn_implementation", "add_inner_loss_to_outer", "inner_loss_weight")}
    model = GradMemGPT(GradMemGPTConfig(**backbone_source(backbone_args, tokenizer), lr=g.inner_lr, **options))
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    return model


def gradmem_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, g: GradMemArgs, world_size: int) -> str:
    """The reference's KV run-name scheme, e.g.
    gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_64_lr_1e-04"""
    name = f"gradmem_{backbone_tag(backbone_args)}_mem{g.n_mem_tokens}_K{g.K}_ilr{g.inner_lr:g}"
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


def gradmem_text_run_name(train_args: TrainArgs, backbone_args: BackboneArgs, g: GradMemArgs,
                          context_length: Optional[int] = None, lora_and_frozen: bool = False) -> str:
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


# ----------------------------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------------------------

def pad_right(sequences: list, pad_value: int, pad_to_multiple_of: Optional[int] = 8) -> torch.Tensor:
    """[B, L] right-padded tensor, L = longest rounded up to a multiple (at least 1)."""
    length = max(1, max(len(s) for s in sequences))
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def encode_with_target_labels(
    tokenizer: PreTrainedTokenizerBase,
    prefixes: list,
    targets: list,
    max_length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = 8,
) -> dict:
    """Tokenise `prefix + target` strings; label exactly the tokens whose characters overlap the target span.

    A token is a target token when its character span (st, en) intersects [len(prefix), len(prefix)+len(target)).
    Special tokens (empty spans) and pads are never labels. With `max_length`, the START of the sequence is dropped
    (the target sits at the end). Returns input_ids [B, L], attention_mask [B, L], labels [B, L] (= ids on target
    tokens, -100 elsewhere; aligned with input_ids, not shifted).
    """
    texts = [p + t for p, t in zip(prefixes, targets)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    all_ids, all_labels = [], []
    for ids, offsets, prefix, target in zip(enc["input_ids"], enc["offset_mapping"], prefixes, targets):
        t_start, t_end = len(prefix), len(prefix) + len(target)
        labels = [tok if (st < t_end and en > t_start and en > st) else IGNORE_INDEX
                  for tok, (st, en) in zip(ids, offsets)]
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[-max_length:], labels[-max_length:]
        all_ids.append(ids)
        all_labels.append(labels)
    input_ids = pad_right(all_ids, tokenizer.pad_token_id, pad_to_multiple_of)
    attention_mask = pad_right([[1] * len(s) for s in all_ids], 0, pad_to_multiple_of)
    labels = pad_right(all_labels, IGNORE_INDEX, pad_to_multiple_of)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MemoryModelCollator:
    """Examples {context, query, target} -> {context_input_ids [B,S], query_input_ids [B,Q], labels [B,Q]}.

    Memory models (GradMem, RMT) WRITE the context and READ `query + target`; labels are the target tokens of the
    query sequence, aligned with query_input_ids (no shift). Right padding to a multiple of `pad_to_multiple_of`.
    `max_context_length` keeps the FIRST tokens of the context (as the reference did for memory models).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_context_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.max_context_length = max_context_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list) -> dict:
        context_ids = self.tokenizer([ex["context"] for ex in examples], add_special_tokens=True)["input_ids"]
        if self.max_context_length is not None:
            context_ids = [ids[: self.max_context_length] for ids in context_ids]
        query = encode_with_target_labels(
            self.tokenizer, [ex["query"] for ex in examples], [ex["target"] for ex in examples],
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return {
            "context_input_ids": pad_right(context_ids, self.tokenizer.pad_token_id, self.pad_to_multiple_of),
            "query_input_ids": query["input_ids"],
            "labels": query["labels"],
        }


class CausalLMCollator:
    """Full-context baseline: `context + query + target` -> {input_ids, attention_mask, labels} (all [B, T]).

    Labels are the target tokens, aligned with input_ids (HF causal LMs shift internally). `max_input_length`
    drops the START of the sequence (the beginning of the context), so query and target are always kept.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_input_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list) -> dict:
        return encode_with_target_labels(
            self.tokenizer, [ex["context"] + ex["query"] for ex in examples], [ex["target"] for ex in examples],
            max_length=self.max_input_length, pad_to_multiple_of=self.pad_to_multiple_of,
        )


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

def reduce_logits_to_predictions(logits: Any, labels: torch.Tensor, next_token_logits: bool = False) -> Any:
    """`preprocess_logits_for_metrics`: argmax on the device; keeps the model's stats dict if it returned one.

    Memory models return (logits [B,Q,V], memory, stats) with logits[:, j] predicting label j. A plain causal LM's
    logits[:, t] predicts token t+1 (`next_token_logits=True`): predictions are shifted right by one so that they
    line up with the labels too; compute_metrics then never needs to know which kind of model it evaluates.
    """
    stats = None
    if isinstance(logits, (tuple, list)):
        stats = next((x for x in logits if isinstance(x, dict)), None)
        logits = logits[0]
    predictions = logits.argmax(dim=-1)  # [B, T]
    if next_token_logits:
        first = torch.full_like(predictions[:, :1], IGNORE_INDEX)
        predictions = torch.cat([first, predictions[:, :-1]], dim=1)
    return (predictions, stats) if stats else predictions


def reduce_stats(stats: dict) -> dict:
    """Per-batch stat values -> one number each: max of *_max, min of *_min, mean of the rest."""
    out = {}
    for name, values in stats.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            continue
        if name.endswith("_max"):
            out[name] = float(values.max())
        elif name.endswith("_min"):
            out[name] = float(values.min())
        else:
            out[name] = float(values.mean())
    return out


def single_token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str], what: str = "ignore token") -> list:
    """The ids of tokens that must each be one token of the tokenizer (e.g. the KV target's `!` and `|`); `what`
    names them in the error."""
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{what} {token!r} is not a single token of the tokenizer")
        ids.append(token_id)
    return ids


def make_compute_metrics(tokenizer: PreTrainedTokenizerBase, ignore_tokens: Sequence[str] = ("!", "|")) -> Callable:
    """compute_metrics for predictions already aligned with labels (see reduce_logits_to_predictions).

    token_accuracy: correct / all labelled tokens of the eval set (token-weighted).
    exact_match:    fraction of samples (with at least one labelled token) whose labelled tokens are all correct.
    Label tokens in `ignore_tokens` (the KV target's structural `!` and `|`) count for neither. The mean (max/min
    for *_max/*_min) of every stat the model returned is added.
    """
    ignore_ids = np.asarray(single_token_ids(tokenizer, ignore_tokens), dtype=np.int64)

    def compute_metrics(eval_pred) -> dict:
        predictions, stats = eval_pred.predictions, None
        if isinstance(predictions, (tuple, list)):
            predictions, stats = predictions[0], (predictions[1] if len(predictions) > 1 else None)
        predictions = np.asarray(predictions)
        labels = np.asarray(eval_pred.label_ids)
        mask = (labels != IGNORE_INDEX) & ~np.isin(labels, ignore_ids)  # [N, T]
        correct = (predictions == labels) & mask
        n_tokens = mask.sum()
        has_target = mask.any(axis=1)
        sample_correct = ((predictions == labels) | ~mask).all(axis=1)
        metrics = {
            "token_accuracy": float(correct.sum() / n_tokens) if n_tokens else float("nan"),
            "exact_match": float(sample_correct[has_target].mean()) if has_target.any() else float("nan"),
        }
        if isinstance(stats, dict):
            metrics.update(reduce_stats(stats))
        return metrics

    return compute_metrics


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def _generate_kv_dataset_if_named(path: Path) -> bool:
    """Generate a missing KV dataset whose folder name follows the KV naming scheme. False if the name does not.

    Train size from the name's suffix (`_1M`, `_20K`, none = 1M), 5000 valid and 2000 test samples (fewer for a
    smaller train size: as many as train), seed 0 (as `python kv_dataset_utils.py --name NAME --out PATH --n_test ...`
    would build it).
    """
    import kv_dataset_utils

    try:
        spec = kv_dataset_utils.parse_dataset_name(path.name)
        n_train = kv_dataset_utils.dataset_size(path.name) or 1_000_000
    except ValueError:
        return False
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not path.exists():
            n_valid, n_test, seed = 5_000, min(kv_dataset_utils.DEFAULT_N_TEST, n_train), 0
            logger.info("%s does not exist: generating it (%s: %d train, %d valid, %d test samples, seed %d)", path,
                        spec.task_name, n_train, n_valid, n_test, seed)
            splits = kv_dataset_utils.build_kv_dataset_dict(spec, n_train=n_train, n_valid=n_valid, seed=seed,
                                                            n_test=n_test)
            path.parent.mkdir(parents=True, exist_ok=True)
            kv_dataset_utils.save_kv_dataset(splits, path, spec, seed)
    return True


def _string_column(split, column: str):
    """The Arrow ChunkedArray of a string column over the split's rows (no Python strings are made)."""
    return split.with_format("arrow")[:][column]


def _byte_lengths(split, column: str) -> np.ndarray:
    """UTF-8 byte length of every row of a string column (an upper bound of its characters and tokens)."""
    return np.concatenate([np.diff(_chunk_offsets(chunk)) for chunk in _string_column(split, column).chunks]
                          or [np.zeros(0, dtype=np.int64)])


def _chunk_offsets(chunk) -> np.ndarray:
    import pyarrow as pa

    dtype = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    return np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)


def column_characters(split, column: str) -> set:
    """The characters of a string column over ALL rows, read from the Arrow data buffer: a byte table (ASCII
    data: about a second for a million rows of a hundred characters) or one decode of the buffer (other text)."""
    chars = set()
    for chunk in _string_column(split, column).chunks:
        if len(chunk) == 0 or chunk.buffers()[2] is None:
            continue
        offsets = _chunk_offsets(chunk)
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
        seen = np.zeros(256, dtype=bool)
        seen[data] = True
        present = np.nonzero(seen)[0]
        if present.size and present[-1] >= 128:
            chars |= set(data.tobytes().decode("utf-8"))
        else:
            chars |= {chr(b) for b in present}
    return chars


def check_tokenizer_covers(tokenizer: PreTrainedTokenizerBase, split) -> None:
    """Every character of every row is known to the tokenizer (e.g. V512 data with the 62-symbol tokenizer is an
    error). Tokenizers without a real unknown token (byte-level: unk = eos or pad) cannot fail and are skipped."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        return
    for column in ("context", "query", "target"):
        if column not in split.column_names:
            continue
        chars = sorted(column_characters(split, column))
        ids = tokenizer(chars, add_special_tokens=False)["input_ids"] if chars else []
        bad = [ch for ch, ch_ids in zip(chars, ids) if unk in ch_ids]
        if bad:
            raise ValueError(f"the tokenizer does not know the characters {bad[:10]} of the data ({column!r}); "
                             "use the matching tokenizer (e.g. --tokenizer_path ./tokenizers/kv_alphabet_512/)")


def check_targets(splits) -> None:
    """A row with an empty target has nothing to learn or score: all rows of a split empty is an error, some of
    them a warning with the count (metrics skip such rows)."""
    for name, split in splits.items():
        if "target" not in split.column_names or len(split) == 0:
            continue
        empty = int((_byte_lengths(split, "target") == 0).sum())
        if empty == len(split):
            raise ValueError(f"every target of split {name!r} is empty: there is nothing to train on or to score")
        if empty:
            logger.warning("%d of %d rows of split %r have an empty target: they are neither trained on nor scored",
                           empty, len(split), name)


def check_data(tokenizer: PreTrainedTokenizerBase, splits) -> None:
    """The data checks of the KV-style run scripts: every character known to the tokenizer, targets not empty."""
    for split in splits.values():
        check_tokenizer_covers(tokenizer, split)
    check_targets(splits)


def longest_tokens(tokenizer: PreTrainedTokenizerBase, split, columns: Sequence[str], limit: int) -> int:
    """The most tokens (special tokens included) of the columns joined, over the rows that may exceed `limit`; 0 when
    none can. Vectorised: UTF-8 byte lengths bound the token counts, and only the rows over the bound are tokenised."""
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    suspects = np.nonzero(sum(_byte_lengths(split, c) for c in columns) + n_special > limit)[0]
    if suspects.size == 0:
        return 0
    rows = split.select(suspects)
    texts = ["".join(parts) for parts in zip(*(list(rows[c]) for c in columns))]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])


def check_memory_inputs_fit(tokenizer: PreTrainedTokenizerBase, splits, positions: Optional[int], n_prefix: int,
                            max_context_length: Optional[int] = None) -> None:
    """WRITE reads [n_prefix memory slots; context] and READ [n_prefix; query + target]: both must fit the
    backbone's positions (beyond them a model fails mid-training or trains on positions it cannot embed)."""
    if positions is None:
        return
    room = positions - n_prefix
    for name, split in splits.items():
        for columns, cut in ((("context",), max_context_length), (("query", "target"), None)):
            if cut is not None and cut <= room:
                continue  # the collator keeps the first `cut` tokens
            longest = longest_tokens(tokenizer, split, columns, room)
            if longest > room:
                fix = f"set --max_context_length {room} (keeps the first tokens) or" if columns == ("context",) \
                    else "use"
                raise ValueError(f"split {name!r}: {'+'.join(columns)} of up to {longest} tokens + {n_prefix} memory "
                                 f"positions exceed the backbone's {positions} positions; {fix} a larger "
                                 "--max_position_embeddings")


def check_vocab_fits(model_vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {model_vocab_size}: "
                         "the model and the tokenizer do not belong together")


def load_splits(data_path: str, required: Sequence[str] = ("train", "valid"),
                columns: Sequence[str] = ("context", "query", "target")):
    """`datasets.load_from_disk` with checks: required splits present and non-empty, required columns present.

    A missing folder whose name parses as a KV dataset name (e.g. N8-K2V2-V62_1M) is generated on the spot.
    """
    import datasets

    path = Path(data_path)
    if not path.exists() and not _generate_kv_dataset_if_named(path):
        raise FileNotFoundError(
            f"dataset folder {data_path} does not exist and its name is not a KV dataset name (like N8-K2V2-V62_1M). "
            "Build KV data with `python kv_dataset_utils.py --name N8-K2V2-V62_1M --out <folder>` (see --help), "
            "or name the folder after a KV dataset to have it generated"
        )
    for name in required:  # datasets cannot even load a saved empty split: check its file list first
        state_file = path / name / "state.json"
        if state_file.is_file() and json.loads(state_file.read_text()).get("_data_files") == []:
            raise ValueError(f"split {name!r} of {data_path} is empty")
    splits = datasets.load_from_disk(str(path))
    if not isinstance(splits, datasets.DatasetDict):
        raise ValueError(f"{data_path} holds a single Dataset; expected a DatasetDict with splits {list(required)}")
    for name in required:
        if name not in splits:
            raise ValueError(f"{data_path} has no {name!r} split (splits: {list(splits)})")
    for name, split in splits.items():
        if name in required and len(split) == 0:
            raise ValueError(f"split {name!r} of {data_path} is empty")
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise ValueError(f"split {name!r} of {data_path} lacks columns {missing} (has {split.column_names})")
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def load_init_checkpoint(model: torch.nn.Module, path: str, partial: bool = False) -> None:
    """Warm start from a .safetensors file or a checkpoint folder.

    Every trainable tensor of the model must come from the checkpoint with its shape (the next curriculum stage from
    the previous one: same architecture, other data). Anything else is an error naming the likely cause, unless
    `partial` (--init_checkpoint_partial) asks to load only the tensors that fit; what was not loaded is logged.
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


def _checkpoint_folders(run_dir: Path) -> list:
    """checkpoint-<step> folders, oldest first."""
    folders = [f for f in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f.is_dir() and f.name.split("-")[-1].isdigit()]
    return sorted(folders, key=_step_of)


def newest_usable_checkpoint(run_dir: Path) -> Optional[Path]:
    return next((f for f in reversed(_checkpoint_folders(run_dir)) if checkpoint_problem(f) is None), None)


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def _resume_checkpoint(run_dir: Path) -> tuple:
    """(newest usable checkpoint or None, checkpoints interrupted while saving). Falls back past unusable newer
    checkpoints with a warning; raises, naming the file, when checkpoints exist but none can be resumed from."""
    usable, broken, interrupted = [], [], []
    for folder in _checkpoint_folders(run_dir):
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
    newer = [(f, p) for f, p in broken if resume_from is None or _step_of(f) > _step_of(resume_from)]
    if newer and resume_from is None:
        raise ValueError(f"cannot resume {run_dir}: {newer[-1][1]}, and there is no earlier complete checkpoint. "
                         "Restore or delete that checkpoint, or pass --overwrite to start over")
    if newer:
        logger.warning("falling back to the previous complete checkpoint %s (newer %s cannot be resumed from)",
                       resume_from, ", ".join(f.name for f, _ in newer))
    return resume_from, interrupted


# ----------------------------------------------------------------------------------------------------------------
# Run folder and its run record
# ----------------------------------------------------------------------------------------------------------------

RUN_RECORD = "run_config.json"  # the CLI record of a run (cli_args, versions, git commit); marks a run folder
LEGACY_RUN_RECORD = "config.json"  # where runs written by older code keep their record (a dict with cli_args)
MODEL_CONFIG = "config.json"  # the selected model's config at the run root; a run output only beside a run record
# Names of what a run writes into its folder: --overwrite deletes these and nothing else.
RUN_OUTPUTS = (RUN_RECORD, f"{PREFIX_CHECKPOINT_DIR}-*", "*_results.json", "trainer_state.json", CURVE_FILE,
               "events.out.tfevents.*", "runs", "wandb", "*.safetensors", "model.safetensors.index.json",
               "generation_config.json", "tokenizer*", "special_tokens_map.json", "chat_template.jinja",
               "training_args.bin", "samples.jsonl")  # samples.jsonl: evaluation.SAMPLES_FILE


@dataclass
class RunFolderPlan:
    """What run_experiment does with the run folder; decided (read-only) before anything is written."""

    resume_from: Optional[Path] = None
    clear: list = field(default_factory=list)  # run outputs deleted for a new run (--overwrite)
    remove: list = field(default_factory=list)  # checkpoints interrupted while saving their weights
    finished: Optional[str] = None  # why a finished run is not trained again
    resumed_without_record: bool = False


def resolve_run_dir(train_args: TrainArgs, data_name: str) -> Path:
    if train_args.exp_path is not None:
        return Path(train_args.exp_path)
    if train_args.run_name is None:
        raise ValueError("give --exp_path or --run_name (the run script normally fills run_name in)")
    return Path(train_args.runs_dir) / data_name / train_args.run_name / f"run_{train_args.seed}"


def is_run_output(path: Path, with_model_config: bool = False) -> bool:
    """A file a run writes. The model's config.json counts only where asked (in a folder with a run record): elsewhere
    it may be a saved model's folder, which --overwrite must not clear."""
    return any(fnmatch.fnmatch(path.name, p) for p in RUN_OUTPUTS) or (with_model_config and path.name == MODEL_CONFIG)


def read_json_file(path: Path, what: str = "file"):
    """json.loads of a file; an unreadable file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} is unreadable ({type(e).__name__}: {e})") from None


def _read_run_record(path: Path) -> dict:
    record = read_json_file(path, "run record")
    if not isinstance(record, dict) or "cli_args" not in record:
        raise ValueError(f"{path} is not a run record of this code (no cli_args)")
    return record


def plan_run_folder(run_dir: Path, train_args: TrainArgs, cli_args: dict, num_processes: int) -> RunFolderPlan:
    """Start fresh, start over (--overwrite), resume, or report a finished run; raises on anything unsafe.

    Only run folders are cleared or resumed: a folder with a run record, or one that holds nothing but run outputs.
    Resuming needs the record (to compare the settings) unless --resume_without_record."""
    if not run_dir.exists():
        return RunFolderPlan()
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {run_dir} is a file; choose another --exp_path")
    entries = sorted(run_dir.iterdir())
    if train_args.overwrite:
        has_record = find_run_record(run_dir) is not None
        foreign = [e.name for e in entries if not is_run_output(e, has_record)]
        if foreign and not has_record:
            raise ValueError(f"--overwrite refused: {run_dir} is not a run folder (no run record {RUN_RECORD}; it holds "
                             f"{', '.join(foreign[:5])}). Only run folders are cleared; choose another --exp_path")
        return RunFolderPlan(clear=[e for e in entries if is_run_output(e, has_record)])
    if not entries:
        return RunFolderPlan()
    # resuming deletes nothing but interrupted checkpoints: a model's config.json is the run's own (its record may be lost)
    foreign = [e.name for e in entries if not is_run_output(e, with_model_config=True)]
    record = _resume_record(run_dir, foreign, train_args)
    if record is not None:
        _check_record(run_dir, record, cli_args, num_processes)
    resume_from, interrupted = _resume_checkpoint(run_dir)
    return RunFolderPlan(resume_from=resume_from, remove=interrupted, resumed_without_record=record is None,
                         finished=_finished_reason(run_dir, resume_from, train_args))


def _resume_record(run_dir: Path, foreign: list, train_args: TrainArgs) -> Optional[dict]:
    """The run record of a folder to resume; None only where --resume_without_record resumes without one."""
    path = find_run_record(run_dir) or run_dir / RUN_RECORD
    if foreign and not path.is_file():
        raise ValueError(f"{run_dir} exists and is not a run folder (no run record {RUN_RECORD}; it holds "
                         f"{', '.join(foreign[:5])}): choose a new or empty --exp_path")
    try:
        return _read_run_record(path)
    except ValueError as e:
        problem = str(e) if path.is_file() else f"{run_dir} has no run record {RUN_RECORD}"
        if not train_args.resume_without_record:
            raise ValueError(f"{problem}: its settings cannot be compared with these. Pass --resume_without_record to "
                             "resume anyway, or --overwrite to start over") from None
        logger.warning("%s: resuming anyway (--resume_without_record), settings not compared", problem)
        return None


def _is_run_record(path: Path) -> bool:
    try:
        _read_run_record(path)
    except ValueError:
        return False
    return True


def find_run_record(run_dir: Path) -> Optional[Path]:
    """The run record of a folder: run_config.json, or a legacy config.json that holds cli_args; None if neither."""
    for name in (RUN_RECORD, LEGACY_RUN_RECORD):
        if _is_run_record(run_dir / name):
            return run_dir / name
    return None


def _finished_reason(run_dir: Path, resume_from: Optional[Path], train_args: TrainArgs) -> Optional[str]:
    """Why a run that wrote its results should not train again with these arguments (None: it goes on).

    Finished: its last checkpoint reached --max_steps, or its last evaluation met the (current) stop rule, or early
    stopping ran out of patience. A larger --max_steps, or a changed stop rule, continues it."""
    if resume_from is None or not (run_dir / "all_results.json").is_file():
        return None
    state = read_json_file(resume_from / "trainer_state.json", "trainer state")
    step = state["global_step"]
    if step >= train_args.max_steps:
        return f"it finished at step {step} (--max_steps {train_args.max_steps})"
    if train_args.stop_metric_value is not None:
        rule = StopOnMetricValue(train_args.stop_metric, train_args.stop_metric_value)
        value = next((r[rule.key] for r in reversed(state.get("log_history", []))
                      if r.get("step") == step and rule.key in r), None)
        if value is not None and rule.reached(value):
            return f"it stopped at step {step}: {rule.key} = {value:g} reached --stop_metric_value {rule.value:g}"
    early = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback")
    early = early[-1] if isinstance(early, list) and early else early
    waited = (early or {}).get("attributes", {}).get("early_stopping_patience_counter", 0)
    if 0 < train_args.early_stopping_patience <= waited:
        return f"it stopped early at step {step} ({waited} evaluations without improvement)"
    logger.info("%s ended at step %d: continuing to --max_steps %d", run_dir, step, train_args.max_steps)
    return None


def report_finished_run(run_dir: Path, reason: str) -> dict:
    """The saved results of a finished run, logged; nothing is trained or written."""
    results = read_json_file(run_dir / "all_results.json", "results file")
    logger.info("%s: %s; nothing to train (a larger --max_steps continues it, --overwrite starts over). Results (all "
                "of them in all_results.json):\n%s", run_dir, reason, final_table(results))
    return results


def prepare_run_folder(run_dir: Path, plan: RunFolderPlan) -> None:
    """Carry out a plan: delete the run outputs (--overwrite) or the interrupted checkpoints, create the folder."""
    if plan.clear:
        logger.warning("--overwrite: deleting %s from %s", ", ".join(p.name for p in plan.clear), run_dir)
        kept = [p.name for p in run_dir.iterdir() if p not in plan.clear]
        if kept:
            logger.warning("--overwrite: keeping %s (not written by a run)", ", ".join(kept))
    for path in [*plan.clear, *plan.remove]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    import accelerate
    import datasets

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                "datasets": datasets.__version__, "numpy": np.__version__}
    for name in ("triton", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    versions["cuda"] = torch.version.cuda
    versions["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return versions


def _flat_args(all_args: Sequence) -> dict:
    flat = {}
    for item in all_args:
        flat.update(dataclasses.asdict(item) if dataclasses.is_dataclass(item) else dict(item))
    return flat


def _check_resumable(config_path: Path, cli_args: dict, num_processes: int) -> None:
    _check_record(config_path.parent, _read_run_record(config_path), cli_args, num_processes)


def _check_record(run_dir: Path, saved: dict, cli_args: dict, num_processes: int) -> None:
    """The run record's settings against these: same processes, and only RESUMABLE_ARG_CHANGES may differ."""
    old_processes = saved.get("num_processes", num_processes)
    if old_processes != num_processes:
        raise ValueError(
            f"{run_dir} was trained with {old_processes} processes and is resumed with {num_processes}: "
            f"resume with the same number of processes (NP={old_processes}; each process has its own RNG state in the "
            "checkpoints and its own share of the data), or pass --overwrite to start over")
    old = saved.get("cli_args", {})
    changed = {k: (old.get(k), v) for k, v in cli_args.items()
               if k not in RESUMABLE_ARG_CHANGES and k in old and old.get(k) != v}
    if changed:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{run_dir} was started with other arguments ({lines}); pass --overwrite to start "
                         "over, or choose another --run_name/--exp_path")


# ----------------------------------------------------------------------------------------------------------------
# Several processes (DDP)
# ----------------------------------------------------------------------------------------------------------------

def parameters_without_gradient(model: torch.nn.Module) -> list:
    """Names of the trainable parameters that the training loss cannot reach in the model's configuration, decided
    from the config alone (no forward pass).

    DDP without find_unused_parameters (which costs a traversal of the autograd graph every step) needs every
    trainable parameter to receive a gradient in every step; run_experiment freezes these instead.
    GradMem (grad_memgpt.py's gradient modes):
      write head, write control tokens, write LoRA: used only inside WRITE, so reached only through the inner
          gradients: when K > 0 and either an inner step is differentiated (grad_mode second with
          last_K_second_order != 0) or the inner loss is added to the outer loss;
      memory init, and a per-sample projection (an inner variable): reached unless grad_mode is none (then the
          written memory is a constant);
      everything else (backbone, shared mem_proj, read control tokens): always reached through READ.
    RMT (it rejects options that would create a parameter without gradient) and plain causal LMs: none.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "grad_memgpt":
        return []
    through_write = config.K > 0 and (config.n_second_order_steps > 0 or config.add_inner_loss_to_outer)
    through_memory = config.grad_mode != "none"
    unreached = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        top = name.split(".")[0]
        if top in ("write_head", "write_start", "write_end") or "lora_" in name:
            reached = through_write
        elif top == "mem" or (top == "mem_proj" and config.mem_proj_mode == "per_sample"):
            reached = through_memory
        else:
            reached = True
        if not reached:
            unreached.append(name)
    return unreached


def freeze_parameters_without_gradient(model: torch.nn.Module) -> list:
    """Freeze (requires_grad=False) the parameters named by parameters_without_gradient, with a log line; returns
    their names. Nothing changes numerically: they would get no gradient, and AdamW skips such parameters."""
    names = parameters_without_gradient(model)
    if not names:
        return []
    params = dict(model.named_parameters())
    if all(name in names for name, p in params.items() if p.requires_grad):
        raise ValueError(f"no parameter of this model can receive a gradient (unreachable: {', '.join(names)}); "
                         "with a frozen backbone and grad_mode none, use first/second or add the inner loss")
    for name in names:
        params[name].requires_grad_(False)
    logger.warning("%d parameter tensors cannot receive a gradient in this configuration and are frozen (so that "
                   "DDP runs without find_unused_parameters): %s", len(names), ", ".join(names))
    return names


# ----------------------------------------------------------------------------------------------------------------
# Trainer pieces
# ----------------------------------------------------------------------------------------------------------------

class NonFiniteStepSkippingAdamW(torch.optim.AdamW):
    """AdamW that skips (never applies) a step whose gradients, or whose loss, are not finite, or whose gradient
    norm is a spike (guards.GradNormSpikeGuard, `spike_factor` > 0).

    Inner-loop divergence (too large an inner lr) shows up as inf/nan meta-gradients. Such steps are counted;
    `max_consecutive` non-finite skips in a row raise an error with `hint` (the likely cause). The learning-rate
    schedule still advances on a skipped step. The spike guard's state is part of state_dict() (resumes with the run).
    """

    def __init__(self, params, max_consecutive: int = 20, hint: str = "", spike_factor: float = 0.0,
                 spike_window: int = 200, **kwargs):
        super().__init__(params, **kwargs)
        self.max_consecutive = max_consecutive
        self.hint = hint
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.loss_is_finite = True  # set by the trainer for each optimizer step
        self.step_taken_by_fast_path = False  # set by the trainer when fast_step applied (or skipped) the step
        self.pre_clip_grad_norm = None  # set by the trainer when it clipped the gradients before step()
        device = next((p.device for group in self.param_groups for p in group["params"]), "cpu")
        self.spike_guard = GradNormSpikeGuard(spike_factor, spike_window, max(1, spike_window // 4), device=device)

    def state_dict(self):
        state = super().state_dict()
        state["spike_guard"] = self.spike_guard.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        guard = state_dict.pop("spike_guard", None)
        super().load_state_dict(state_dict)
        if guard is not None:
            self.spike_guard.load_state_dict(guard)

    def record_step(self, finite: bool) -> None:
        """Count an applied (finite) or skipped step; raise after max_consecutive skipped steps in a row."""
        if finite:
            self.consecutive_skipped = 0
            return
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        logger.warning("non-finite loss or gradients: optimizer step skipped (%d in a row, %d in total)",
                       self.consecutive_skipped, self.skipped_steps)
        if self.consecutive_skipped >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive_skipped} optimizer steps in a row had non-finite loss or gradients; training stopped. "
                f"{self.hint or 'Lower --learning_rate, or check the data.'}"
            )

    @torch.no_grad()
    def step(self, closure=None):
        if self.step_taken_by_fast_path:  # the captured step already applied or skipped it (and counted it)
            self.step_taken_by_fast_path = False
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = self.pre_clip_grad_norm
        self.pre_clip_grad_norm = None
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
        norm = torch.as_tensor(norm, dtype=torch.float32, device=self.spike_guard.history.device)
        finite = torch.isfinite(norm) if grads else torch.ones((), dtype=torch.bool, device=norm.device)
        finite = finite & bool(self.loss_is_finite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        self.loss_is_finite = True
        spike = bool(self.spike_guard.check(norm))  # the same norm on every process (gradients are reduced by now)
        self.record_step(bool(finite))
        if not bool(finite):
            return None
        if spike:
            logger.info("gradient norm %.3g is a spike (> %g x the running median): optimizer step skipped",
                        float(norm), self.spike_guard.factor)
            return None
        return super().step(closure)


class StopAfterWallTime(TrainerCallback):
    """Stop at the first evaluation after `minutes` of training (wall clock from the start of trainer.train(), the
    evaluations included; the evaluation at step 0 never stops a run). Checked at evaluations only, where the last
    checkpoint is saved too; under several processes the main process decides and broadcasts, so every process stops
    at the same step."""

    clock = staticmethod(time.monotonic)

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start is None or state.global_step == 0:  # outside trainer.train(), or the evaluation at the start
            return
        elapsed = self.clock() - self.start
        stop = [elapsed >= self.seconds]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(stop, src=0)
        if stop[0]:
            logger.warning("--max_train_minutes %g: %.1f min of training at step %d: stopping", self.seconds / 60,
                           elapsed / 60, state.global_step)
            control.should_training_stop = True


class StopOnMetricValue(TrainerCallback):
    """Stop training once an eval metric reaches a value (>= for accuracies, <= for losses). The evaluation at step 0
    never stops a run: a stop there would train one step and end without a checkpoint to resume or report."""

    def __init__(self, metric: str, value: float):
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.value = value
        self.lower_is_better = metric.endswith("loss")

    def reached(self, current: float) -> bool:
        return current <= self.value if self.lower_is_better else current >= self.value

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        current = (metrics or {}).get(self.key)
        if current is None or state.global_step == 0:
            return
        if self.reached(current):
            logger.warning("%s = %.4f reached %s %s: stopping", self.key, current,
                           "<=" if self.lower_is_better else ">=", self.value)
            control.should_training_stop = True


class NonFiniteGuardState(TrainerCallback, ExportableState):
    """Keeps the counters of the non-finite-step guard (NonFiniteStepSkippingAdamW) in every checkpoint's
    trainer_state.json and restores them on resume, so that skipped steps in a row are counted across a kill and a
    resume. A run whose every optimizer step was skipped trained nothing: that is an error, never a result."""

    COUNTERS = ("skipped_steps", "consecutive_skipped")

    def __init__(self):
        self.guard = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {name: getattr(self.guard, name, 0) for name in self.COUNTERS}}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        while optimizer is not None and not isinstance(optimizer, NonFiniteStepSkippingAdamW):
            optimizer = getattr(optimizer, "optimizer", None)
        self.guard = optimizer
        saved = state.stateful_callbacks.get(type(self).__name__)
        if self.guard is not None and isinstance(saved, dict):
            for name in self.COUNTERS:
                setattr(self.guard, name, int(saved.get("attributes", {}).get(name, 0)))
        # a checkpoint written before this callback existed has no entry, and Trainer._save_checkpoint expects one
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard is not None and 0 < state.global_step <= self.guard.skipped_steps:
            raise FloatingPointError(
                f"all {state.global_step} optimizer steps had non-finite loss or gradients and were skipped: nothing "
                f"was trained. {self.guard.hint or 'Lower --learning_rate, or check the data.'}")


def tied_parameter_names(model: torch.nn.Module, missing: Sequence[str]) -> set:
    """The `missing` names that are the same tensor as a parameter that is not missing (tied weights)."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = set(missing)
    return {name for names in names_of.values() if not set(names) <= missing for name in names if name in missing}


class GradMemTrainer(Trainer):
    """HF Trainer + model stats averaged into the training logs (over the logged steps and the processes), skipped-step and early-stopping counters in every
    log record, and the reference's schedule length (num_training_steps / 0.9: a decaying schedule ends at 10%)."""

    def __init__(self, *args, early_stopping: Optional[EarlyStoppingCallback] = None, fast_step: str = "off",
                 rollback: Optional[CollapseRollback] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.early_stopping = early_stopping
        self.rollback = rollback
        self._stat_sums: dict = {}
        self._stat_count = 0
        self.fast_step_mode = fast_step
        self._fast_step = None  # fast_step.CapturedTrainStep once decided on
        self._fast_step_decided = False
        self._fast_grad_norm = None
        self._training_stream = None  # the CUDA stream train() runs on under several processes

    def train(self, *args, **kwargs):
        """Under several processes with the captured step possible, the whole training loop (DDP's construction
        included) runs on one side stream: DDP keeps each parameter's AccumulateGrad node, which remembers the stream
        it was made on, and CapturedTrainStep can only record a backward through those nodes on that same stream
        (on a side stream, not the default one). See fast_step's module docstring."""
        if not (self.fast_step_mode != "off" and self.args.world_size > 1 and torch.cuda.is_available()
                and self.args.device.type == "cuda"):
            return super().train(*args, **kwargs)
        default = torch.cuda.current_stream(self.args.device)
        self._training_stream = torch.cuda.Stream(self.args.device)
        self._training_stream.wait_stream(default)
        try:
            with torch.cuda.stream(self._training_stream):
                return super().train(*args, **kwargs)
        finally:
            default.wait_stream(self._training_stream)

    def evaluate(self, *args, **kwargs):
        """As the Trainer's; metrics that callbacks add after the Trainer has logged the evaluation (the names in their
        `metric_names`, e.g. SQuAD EM/F1 of generated answers) are sent to the loggers (tensorboard, wandb) too."""
        metrics = super().evaluate(*args, **kwargs)
        names = {n for cb in self.callback_handler.callbacks for n in getattr(cb, "metric_names", ())}
        late = {k: v for k, v in metrics.items() if any(k.endswith("_" + n) for n in names)}
        if late:
            self.control = self.callback_handler.on_log(self.args, self.state, self.control, late)
        return metrics

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        return super().create_scheduler(int(num_training_steps / 0.9), optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        stats = outputs.get("stats") if isinstance(outputs, dict) else None
        if model.training and stats:
            self._add_stats(stats)
        return (loss, outputs) if return_outputs else loss

    def _add_stats(self, stats: dict) -> None:
        for name, value in stats.items():
            value = value.detach().float()
            self._stat_sums[name] = self._stat_sums.get(name, 0.0) + value
        self._stat_count += 1

    def _captured_step(self, model):
        """The fast_step.CapturedTrainStep for this run, or None (decided at the first step, with a log line)."""
        if self._fast_step_decided:
            return self._fast_step
        self._fast_step_decided = True
        from fast_step import CapturedTrainStep, fast_path_problem

        guard = self._step_guard()
        if self.fast_step_mode == "off":
            problem = "--fast_step off"
        elif guard is None:
            problem = "the optimizer is not NonFiniteStepSkippingAdamW"
        else:
            problem = fast_path_problem(self.accelerator.unwrap_model(model), guard,
                                        gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                                        world_size=self.args.world_size)
            if problem is None and self.args.world_size > 1 and self._training_stream is None:
                problem = "several processes, but the step is not taken inside GradMemTrainer.train (no side stream)"
        if problem is not None:
            stated = self.fast_step_mode == "off" or self.args.device.type != "cuda"  # in run_experiment's setup line
            logger.log(logging.DEBUG if stated else logging.INFO, "fast step off (%s): training steps run eagerly",
                       problem)
            return None
        precision = "bf16" if self.args.bf16 else "tf32" if self.args.tf32 else "fp32"
        # Several processes: the step averages gradients and loss over WORLD itself (one all-reduce inside the graph)
        # and runs the unwrapped model, so DDP's hooks stay idle.
        group = torch.distributed.group.WORLD if self.args.world_size > 1 else None
        self._fast_step = CapturedTrainStep(self.accelerator.unwrap_model(model), guard,
                                            max_grad_norm=self.args.max_grad_norm, precision=precision,
                                            process_group=group,
                                            spike_guard=guard.spike_guard if guard.spike_guard.enabled else None)
        logger.info("fast step on: each training step is recorded once per input shape in a CUDA graph and "
                    "replayed (precision %s; --fast_step off for eager steps)", precision)
        return self._fast_step

    def _issue_warnings_after_load(self, load_result) -> None:
        """No alarm for tied weights (lm_head = embeddings): they are saved under one name, the other is "missing"."""
        tied = tied_parameter_names(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
        missing = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _clip_grad_norm(self, model):
        if self._fast_grad_norm is not None:  # the captured step clipped already: report its pre-clip norm
            grad_norm, self._fast_grad_norm = self._fast_grad_norm, None
            return grad_norm
        grad_norm = super()._clip_grad_norm(model)
        guard = self._step_guard()
        if guard is not None:  # the spike test needs the norm before clipping
            guard.pre_clip_grad_norm = grad_norm
        return grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        fast = self._captured_step(model)
        if fast is not None:
            model.train()
            out = fast(self._prepare_inputs(inputs))
            self._add_stats(out.stats)
            self._fast_grad_norm = out.grad_norm
            guard = self._step_guard()
            guard.step_taken_by_fast_path = True
            guard.record_step(bool(out.finite))  # one host read per step (the spike count stays on the device)
            return out.loss
        loss = super().training_step(model, inputs, num_items_in_batch)
        guard = self._step_guard()
        if guard is not None and not torch.isfinite(loss):
            guard.loss_is_finite = False
        return loss

    def _step_guard(self) -> Optional[NonFiniteStepSkippingAdamW]:
        opt = self.optimizer
        while opt is not None and not isinstance(opt, NonFiniteStepSkippingAdamW):
            opt = getattr(opt, "optimizer", None)
        return opt

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log record
            if self._stat_count:
                names = sorted(self._stat_sums)
                means = torch.stack([self._stat_sums[name] / self._stat_count for name in names])  # over the steps
                for name, value in zip(names, _reduce_stats_across_processes(names, means).tolist()):
                    logs[name] = round(value, 6)
                self._stat_sums, self._stat_count = {}, 0
            guard = self._step_guard()
            if guard is not None:
                logs["skipped_steps"] = guard.skipped_steps
                if guard.spike_guard.enabled:
                    logs["spike_skipped_steps"] = int(guard.spike_guard.spikes)
            if self.rollback is not None:
                logs["rollbacks"] = self.rollback.rollbacks
        if self.early_stopping is not None:
            logs["patience"] = self.early_stopping.early_stopping_patience_counter
        super().log(logs, *args, **kwargs)


def _reduce_stats_across_processes(names: list, values: torch.Tensor) -> torch.Tensor:
    """One value per stat over all processes (every process logs at the same steps): max of *_max, min of *_min,
    mean of the rest, as reduce_stats does over evaluation batches. values [S] -> [S]."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    gathered = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, values)
    gathered = torch.stack(gathered)  # [P, S]
    return torch.stack([gathered[:, i].max() if name.endswith("_max") else
                        gathered[:, i].min() if name.endswith("_min") else gathered[:, i].mean()
                        for i, name in enumerate(names)])


def report_targets(report_to: str) -> list:
    """The --report_to list without 'none'; an unknown name is an error."""
    wanted = [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]
    unknown = [r for r in wanted if r not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"--report_to {report_to}: unknown {unknown}; use tensorboard, wandb or none")
    return wanted


def _report_callbacks(report_to: str, run_dir: Path, run_name: str, is_main: bool) -> tuple:
    """(HF report_to list, extra callbacks). Tensorboard events go straight into the run folder."""
    wanted = report_targets(report_to)
    callbacks, hf_report = [], []
    if "tensorboard" in wanted and is_main:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run_dir)  # instead of <run>/runs/<date>; also for the writer re-opened after train
        callbacks.append(tensorboard)
    if "wandb" in wanted:
        has_key = bool(os.environ.get("WANDB_API_KEY"))
        netrc = Path.home() / ".netrc"
        has_key = has_key or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
        if not has_key and "WANDB_MODE" not in os.environ:
            logger.warning("no wandb key: logging to wandb offline in %s (sync later with `wandb sync`)", run_dir)
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", "gradmem")
        hf_report.append("wandb")
    return hf_report, callbacks


def plot_learning_curve(log_history: list, path: Path, title: str = "") -> None:
    """PNG with eval exact match / token accuracy (left) and train / eval loss (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = next((i for i, r in enumerate(log_history) if "train_runtime" in r), len(log_history))
    log_history = log_history[:end]  # what was logged while training (not the re-evaluation of the best checkpoint)

    def series(key):
        points = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("eval_exact_match", "exact match"), ("eval_token_accuracy", "token accuracy")):
        x, y = series(key)
        if x:
            left.plot(x, y, marker="o", markersize=3, label=label)
    left.set_xlabel("step"), left.set_ylabel("eval"), left.set_ylim(-0.02, 1.02), left.grid(alpha=0.3)
    left.legend(loc="lower right")
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        x, y = series(key)
        if x:
            right.plot(x, y, label=label)
    right.set_xlabel("step"), right.set_ylabel("loss"), right.set_yscale("log"), right.grid(alpha=0.3)
    right.legend(loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _use_one_gpu_per_process(args: TrainingArguments) -> None:
    """A single process on a machine with several GPUs trains on one of them.

    HF's Trainer would otherwise wrap the model in nn.DataParallel over every visible GPU, which silently multiplies
    the batch by the GPU count (breaking --total_batch_size), gathers the model's stats into vectors and replicates
    the second-order WRITE graph per GPU. Several GPUs are used through DDP processes instead (NP=... in the presets).
    """
    if args.parallel_mode.value == "not_distributed":  # one process, several GPUs: nn.DataParallel
        logger.warning("%d GPUs are visible to this single process: training on one (cuda:0). Use several of them "
                       "with DDP: NP=%d bash scripts/<preset>.sh, or accelerate launch --config_file "
                       "accelerate_ddp.yaml --num_processes %d ...", args.n_gpu, args.n_gpu, args.n_gpu)
        args._n_gpu = 1  # transformers has no public switch for this; n_gpu is read from here


def _ensure_fp32(model: torch.nn.Module) -> None:
    """Master weights are fp32 (mixed precision = autocast only); a bf16-loaded pretrained model is upcast."""
    low = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if low:
        logger.warning("model parameters in %s: upcast to float32 (fp32 master weights; use --bf16 for autocast)", low)
        model.float()


def evaluate_splits(trainer: Trainer, eval_split, test_split, answer_metrics: Optional[Callable] = None,
                    prefix: str = "") -> dict:
    """Metrics of the model as it is now on valid (eval_) and test (test_), with generated-answer metrics when given."""
    metrics = {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, split in (("eval", eval_split), ("test", test_split)):
        if split is None:
            continue
        metrics.update(trainer.evaluate(split, metric_key_prefix=prefix + name))
        if answer_metrics is not None:
            metrics.update({f"{prefix}{name}_{k}": v for k, v in answer_metrics(model, split).items()})
    return metrics


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation the backbone runs (memory models keep their causal LM in `.model`)."""
    backbone = getattr(model, "model", model)
    return getattr(getattr(backbone, "config", None), "_attn_implementation", None) or "default"


def setup_line(trainer: Trainer, precision: str, fast_step: str) -> str:
    """One line at the start of a run: where and how it computes."""
    device = trainer.args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    tf32 = " (tf32 matmuls)" if trainer.args.tf32 and precision == "no" else ""
    if fast_step == "off":
        fast = "off (--fast_step off)"
    elif device.type != "cuda":
        fast = "off (not on CUDA)"
    else:
        fast = "auto (decided, and logged, at the first step)"
    return (f"device {device} ({name}) x {trainer.args.world_size} process(es) | precision "
            f"{'bf16 autocast, fp32 weights' if precision == 'bf16' else 'fp32'}{tf32} | attention "
            f"{attention_implementation(trainer.accelerator.unwrap_model(trainer.model))} | fast step {fast}")


def final_table(metrics: dict) -> str:
    """A few lines that end a run: the selected checkpoint, its exact match, steps and what the guards did."""
    def value(key):
        v = metrics.get(key)
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("best checkpoint", value("best_model_checkpoint"))]
    for split, name in (("eval", "valid"), ("test", "test")):
        if f"{split}_exact_match" in metrics:
            generated = f"{split}_generated_exact_match"
            rows.append((f"{name} exact match", value(f"{split}_exact_match") + (
                f" (generated answers: {value(generated)})" if generated in metrics else "")))
    rows += [("steps", value("global_step")), ("skipped steps", value("skipped_steps")),
             ("spike-skipped steps", value("spike_skipped_steps")), ("rollbacks", value("rollbacks"))]
    return "\n".join(f"  {name:<20} {text}" for name, text in rows)


def check_scheduler_name(name: str) -> None:
    from transformers import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        raise ValueError(f"--lr_scheduler_type {name!r} is not a scheduler; choose one of "
                         f"{', '.join(t.value for t in SchedulerType)}") from None


def evaluation_metric_names(model, collator: Callable, compute_metrics: Callable, eval_split,
                            next_token_logits: bool = False, callbacks: Sequence = ()) -> set:
    """The metric names an evaluation reports (without the eval_ prefix), found by one forward pass on two eval rows:
    loss, compute_metrics' names (with the model's stats) and the callbacks' `metric_names`."""
    from transformers.trainer_utils import EvalPrediction

    batch = collator([eval_split[i] for i in range(min(2, len(eval_split)))])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train(was_training)
    stats = out.get("stats") if isinstance(out, dict) else None
    predictions = reduce_logits_to_predictions(out["logits"], batch["labels"], next_token_logits=next_token_logits)
    if stats:
        predictions = (predictions.numpy(), {k: v.detach().float().cpu().numpy() for k, v in stats.items()})
    else:
        predictions = predictions.numpy()
    metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=batch["labels"].numpy()))
    return {"loss", *metrics, *(name for cb in callbacks for name in getattr(cb, "metric_names", ()))}


def check_metric_names(train_args: TrainArgs, metric_names: Callable[[], set]) -> None:
    """--metric_for_best_model and --stop_metric name metrics that the evaluation reports. Names other than the
    common ones (loss, token_accuracy, exact_match) are looked up with `metric_names()` (a forward pass)."""
    options = ["metric_for_best_model"] + (["stop_metric"] if train_args.stop_metric_value is not None else [])
    wanted = {option: getattr(train_args, option) for option in options}
    if all(value.removeprefix("eval_") in COMMON_METRICS for value in wanted.values()):
        return
    names = metric_names()
    for option, value in wanted.items():
        if value.removeprefix("eval_") not in names:
            raise ValueError(f"--{option} {value!r} is not a metric of this evaluation; choose one of "
                             f"{', '.join(sorted(names))}")


def run_experiment(
    train_args: TrainArgs,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits,
    collator: Callable,
    compute_metrics: Callable,
    data_name: str,
    all_args: Sequence = (),
    next_token_logits: bool = False,
    nonfinite_hint: str = "",
    extra_callbacks: Sequence[TrainerCallback] = (),
    answer_metrics: Optional[Callable] = None,
) -> dict:
    """Train, evaluate the best checkpoint on valid (and test if present), write the run folder. Returns metrics.

    The best checkpoint is selected on valid; test is only evaluated (prefix test_). Where the final checkpoint is not
    the best one, it is evaluated too (prefix final_eval_, final_test_).

    data_name:          folder name of the data (run folder runs/<data_name>/<run_name>/run_<seed>).
    all_args:           the other CLI dataclasses, stored in run_config.json together with train_args.
    next_token_logits:  the model's logits[:, t] predict token t+1 (plain causal LMs); memory models: False.
    nonfinite_hint:     the likely cause named when many steps in a row are not finite (e.g. the inner lr).
    answer_metrics:     (model, split) -> dict of metrics of generated answers (evaluation.make_generated_answer_metrics),
                        added for valid and test with the same prefixes.
    """
    from accelerate import PartialState

    state = PartialState(cpu=train_args.use_cpu)  # with --use_cpu, several processes run DDP over gloo
    run_dir = resolve_run_dir(train_args, data_name)
    cli_args = {**_flat_args([train_args, *all_args]), "mixed_precision": train_args.mixed_precision()}
    config_path = run_dir / RUN_RECORD

    # ---- decide and validate everything before the run folder is touched (every process raises alike) ----
    check_scheduler_name(train_args.lr_scheduler_type)
    report_targets(train_args.report_to)
    plan = plan_run_folder(run_dir, train_args, cli_args, state.num_processes)
    if plan.finished is not None:
        return report_finished_run(run_dir, plan.finished)
    resume_from = plan.resume_from
    _ensure_fp32(model)
    if train_args.init_checkpoint is not None:
        if resume_from is None:
            load_init_checkpoint(model, train_args.init_checkpoint, partial=train_args.init_checkpoint_partial)
        else:
            logger.info("resuming from %s: --init_checkpoint is not loaded again", resume_from)
    freeze_parameters_without_gradient(model)  # then DDP needs no find_unused_parameters
    eval_split = splits["valid"]
    if train_args.max_eval_samples is not None:
        eval_split = eval_split.select(range(min(train_args.max_eval_samples, len(eval_split))))
    check_metric_names(train_args, lambda: evaluation_metric_names(model, collator, compute_metrics, eval_split,
                                                                   next_token_logits, extra_callbacks))

    # ---- run folder: start over, resume, or start fresh (the main process writes, the others wait) ----
    if state.is_main_process:
        prepare_run_folder(run_dir, plan)
        config = {"cli_args": cli_args,
                  "args": {type(a).__name__: dataclasses.asdict(a) for a in [train_args, *all_args]
                           if dataclasses.is_dataclass(a)},
                  "command": [sys.executable, *sys.argv], "versions": package_versions(), "git": _git_commit(),
                  "num_processes": state.num_processes, "resumed_from": str(resume_from) if resume_from else None,
                  "resumed_without_record": plan.resumed_without_record}
        config_path.write_text(json.dumps(config, indent=2, default=str))
    state.wait_for_everyone()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("run folder %s | %s trainable parameters | train %d, valid %d%s", run_dir, f"{n_params:,}",
                len(splits["train"]), len(eval_split), f" | resuming from {resume_from.name}" if resume_from else "")

    # ---- Trainer ----
    precision = train_args.mixed_precision()
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # the flags win over `accelerate launch --mixed_precision`
    greater_is_better = not train_args.metric_for_best_model.endswith("loss")
    run_name = train_args.run_name or run_dir.parent.name
    hf_report, report_callbacks = _report_callbacks(train_args.report_to, run_dir, run_name, state.is_main_process)
    args = TrainingArguments(
        output_dir=str(run_dir),
        run_name=run_name,
        max_steps=train_args.max_steps,
        per_device_train_batch_size=train_args.per_device_batch_size,
        per_device_eval_batch_size=train_args.per_device_eval_batch_size or train_args.per_device_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        learning_rate=train_args.learning_rate,
        lr_scheduler_type=train_args.lr_scheduler_type,
        warmup_steps=train_args.warmup_steps,
        weight_decay=train_args.weight_decay,
        adam_beta1=train_args.adam_beta1,
        adam_beta2=train_args.adam_beta2,
        adam_epsilon=train_args.adam_epsilon,
        max_grad_norm=train_args.max_grad_norm,
        bf16=precision == "bf16",
        tf32=train_args.tf32 if torch.cuda.is_available() else None,
        eval_strategy="steps",
        eval_steps=train_args.eval_steps,
        eval_on_start=resume_from is None,
        save_strategy="steps",
        save_steps=train_args.eval_steps,
        save_total_limit=2,  # the latest (to resume) and the best; 1 would delete the latest at the end
        load_best_model_at_end=True,
        metric_for_best_model=train_args.metric_for_best_model,
        greater_is_better=greater_is_better,
        logging_steps=train_args.logging_steps,
        report_to=hf_report or "none",
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient (see parameters_without_gradient)
        ddp_broadcast_buffers=False,  # the models' buffers are constants (rotary frequencies): no broadcast per forward
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=train_args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not train_args.use_cpu,
        use_cpu=train_args.use_cpu,
        disable_tqdm=not sys.stderr.isatty(),  # progress bars only on a terminal, not in log files
        seed=train_args.seed,
    )
    _use_one_gpu_per_process(args)
    callbacks = list(report_callbacks) + list(extra_callbacks) + [NonFiniteGuardState()]
    early_stopping = None
    if train_args.early_stopping_patience > 0:
        early_stopping = EarlyStoppingCallback(early_stopping_patience=train_args.early_stopping_patience)
        callbacks.append(early_stopping)
    if train_args.stop_metric_value is not None:
        callbacks.append(StopOnMetricValue(train_args.stop_metric, train_args.stop_metric_value))
    if train_args.max_train_minutes is not None:
        callbacks.append(StopAfterWallTime(train_args.max_train_minutes))
    rollback = None
    if train_args.collapse_ratio > 0:
        rollback = CollapseRollback(train_args.metric_for_best_model, ratio=train_args.collapse_ratio,
                                    max_rollbacks=train_args.max_rollbacks)
        callbacks.append(rollback)
    optimizer_kwargs = {"lr": train_args.learning_rate, "betas": (train_args.adam_beta1, train_args.adam_beta2),
                        "eps": train_args.adam_epsilon, "max_consecutive": train_args.max_consecutive_skipped_steps,
                        "hint": nonfinite_hint, "spike_factor": train_args.spike_factor,
                        "spike_window": train_args.spike_window}
    trainer = GradMemTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=splits["train"],
        eval_dataset=eval_split,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: reduce_logits_to_predictions(
            logits, labels, next_token_logits=next_token_logits),
        callbacks=callbacks,
        optimizer_cls_and_kwargs=(NonFiniteStepSkippingAdamW, optimizer_kwargs),
        early_stopping=early_stopping,
        fast_step=train_args.fast_step,
        rollback=rollback,
    )

    if state.is_main_process:
        logger.info("%s", setup_line(trainer, precision, train_args.fast_step))

    # ---- train, then evaluate the best checkpoint ----
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trained = time.monotonic()
    trainer.remove_callback(EarlyStoppingCallback)  # training is over: no "metric not found" on test evaluations
    test_split = splits["test"] if "test" in splits and len(splits["test"]) > 0 else None
    metrics = evaluate_splits(trainer, eval_split, test_split, answer_metrics)
    best, final = trainer.state.best_model_checkpoint, newest_usable_checkpoint(run_dir)
    if final is not None and best is not None and final.resolve() != Path(best).resolve():
        model = trainer.accelerator.unwrap_model(trainer.model)
        best_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        restore_checkpoint_in_place(model, None, final)
        metrics.update(evaluate_splits(trainer, eval_split, test_split, answer_metrics, prefix="final_"))
        metrics["final_checkpoint"] = str(final)
        model.load_state_dict(best_weights)
    metrics["train_wall_s"] = round(trained - started, 2)  # trainer.train(), its evaluations and checkpoints included
    metrics["final_evaluation_wall_s"] = round(time.monotonic() - trained, 2)
    guard = trainer._step_guard()
    metrics["skipped_steps"] = guard.skipped_steps if guard is not None else 0
    if guard is not None and guard.spike_guard.enabled:
        metrics["spike_skipped_steps"] = int(guard.spike_guard.spikes)
    if trainer.rollback is not None:
        metrics["rollbacks"] = trainer.rollback.rollbacks
    metrics["global_step"] = trainer.state.global_step
    metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    # the selected model at the run root (config with the backbone's, weights, tokenizer): from_pretrained(run_dir)
    # needs nothing else. Every process calls it; the main one writes.
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        plot_learning_curve(trainer.state.log_history, run_dir / CURVE_FILE, title=f"{data_name} / {run_name}")
        logger.info("results of %s (all of them in all_results.json):\n%s", run_dir, final_table(metrics))
    return metrics
