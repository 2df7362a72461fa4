"""The shared trainer's command line: TrainArgs, BackboneArgs, DataArgs, parse_cli and run_cli.

Every run script parses its options into these dataclasses (plus its model's own, e.g. grad_memgpt.GradMemArgs),
each validated before any work; run_cli turns user errors into one line and exit status 2. A run script may offer
named presets (`--preset NAME`, e.g. grad_memgpt.PRESETS): sets of option values that replace the defaults, while
options given on the command line still win.

The trainer's defaults here are the paper's KV recipe (reference `scripts/run_gradmemgpt_on_kv_retrieval.sh`: lr 1e-4,
10k warmup steps, batch 64, ...), not the reference script's own. A model's options keep their model's defaults
(GradMem: the reference config's); the paper's KV model is `--preset paper_kv`.
"""
import argparse
import dataclasses
import errno
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import transformers
from transformers import HfArgumentParser

logger = logging.getLogger("gradmem")

REPO_DIR = Path(__file__).resolve().parent
LOG_LEVELS = ("debug", "info", "warning", "error")
BASE_MODELS = ("llama", "gpt2", "pythia", "mamba")
SCHEDULERS = typing.Literal[tuple(t.value for t in transformers.SchedulerType)]  # --lr_scheduler_type choices


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
        metadata={"help": "wall-clock budget of this invocation: the first step that ends after this many minutes of "
                          "training is evaluated and saved, and training stops (then the best checkpoint is evaluated "
                          "as usual); None: no budget"},
    )
    final_evaluation: bool = field(
        default=True,
        metadata={"help": "after training, evaluate the selected checkpoint on valid (generated answers too) and test, "
                          "and the final checkpoint where it differs; false (a warm-up stage whose numbers are not "
                          "reported): no test numbers, the valid metrics are those the selected checkpoint had when "
                          "it was evaluated during training"},
    )
    max_consecutive_skipped_steps: int = field(
        default=20, metadata={"help": "error after this many optimizer steps in a row with non-finite loss/gradients"}
    )
    spike_factor: float = field(
        default=10.0,
        metadata={"help": "skip an optimizer step whose gradient norm (before clipping) is above this many times the "
                          "median of the last --spike_window norms and above --max_grad_norm (counted as "
                          "spike_skipped_steps); 0: off"})
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


def _apply_preset(parser: HfArgumentParser, presets: dict, args: list) -> list:
    """Offer --preset on `parser` (for --help) and take it out of `args`; the named preset's values become the
    parser's defaults. Returns the other arguments. An unknown name, or a preset that sets an option the parser does
    not have, is a ValueError naming what is known."""
    names = ", ".join(presets)
    parser.add_argument("--preset", choices=list(presets), default=argparse.SUPPRESS, help=(
        f"named set of option values ({names}): they replace the defaults; options given here win"))
    choose = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    choose.add_argument("--preset")
    chosen, args = choose.parse_known_args(args)
    if chosen.preset is None:
        return args
    if chosen.preset not in presets:
        raise ValueError(f"unknown --preset {chosen.preset!r}; known presets: {names}")
    values = presets[chosen.preset]
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise ValueError(f"--preset {chosen.preset} sets {', '.join(unknown)}, which this script does not take")
    parser.set_defaults(**values)
    return args


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


def parse_cli(*types, args: Optional[Sequence[str]] = None, presets: Optional[dict] = None) -> tuple:
    """Parse the command line into the given dataclasses and validate each (errors before any work), then seed
    python, numpy and torch with the run's --seed, so that the model built next starts from the same weights.
    Optional number options accept `None` (e.g. --stop_metric_value None: never stop on a metric value).

    presets: {name: {option: value}} offered as `--preset NAME`: the preset's values replace the defaults of those
    options, options given on the command line win, and the dataclasses hold the resolved values (so a run record
    holds them, not the preset's name)."""
    args, none_names = _take_none_values(types, list(sys.argv[1:] if args is None else args))
    parser = HfArgumentParser(types)
    if presets:
        args = _apply_preset(parser, presets, args)
    parsed = parser.parse_args_into_dataclasses(args=args)
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

