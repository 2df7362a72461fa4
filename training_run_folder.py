"""The run folder: start fresh, start over (--overwrite), resume or report a finished run, decided before anything is
written; the run record's settings compared with these; package versions and the git commit for the record.

Only run folders are ever cleared or resumed: a folder with a run record, or one that holds nothing but run outputs.
"""
import dataclasses
import fnmatch
import json
import logging
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from training_args import REPO_DIR, TrainArgs
from training_checkpoints import resume_checkpoint
from training_loop import StopOnMetricValue
from training_runs import (RESUMABLE_ARG_CHANGES, RUN_RECORD, find_run_record, read_json_file,
                           read_run_record)

logger = logging.getLogger("gradmem")

CURVE_FILE = "learning_curve.png"
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
    resume_from, interrupted = resume_checkpoint(run_dir)
    return RunFolderPlan(resume_from=resume_from, remove=interrupted, resumed_without_record=record is None,
                         finished=_finished_reason(run_dir, resume_from, train_args))


def _resume_record(run_dir: Path, foreign: list, train_args: TrainArgs) -> Optional[dict]:
    """The run record of a folder to resume; None only where --resume_without_record resumes without one."""
    path = find_run_record(run_dir) or run_dir / RUN_RECORD
    if foreign and not path.is_file():
        raise ValueError(f"{run_dir} exists and is not a run folder (no run record {RUN_RECORD}; it holds "
                         f"{', '.join(foreign[:5])}): choose a new or empty --exp_path")
    try:
        return read_run_record(path)
    except ValueError as e:
        problem = str(e) if path.is_file() else f"{run_dir} has no run record {RUN_RECORD}"
        if not train_args.resume_without_record:
            raise ValueError(f"{problem}: its settings cannot be compared with these. Pass --resume_without_record to "
                             "resume anyway, or --overwrite to start over") from None
        logger.warning("%s: resuming anyway (--resume_without_record), settings not compared", problem)
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


def _check_resumable(config_path: Path, cli_args: dict, num_processes: int) -> None:
    _check_record(config_path.parent, read_run_record(config_path), cli_args, num_processes)


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


def write_run_record(run_dir: Path, all_args: Sequence, cli_args: dict, num_processes: int,
                     plan: RunFolderPlan) -> None:
    """run_config.json: the arguments (flat, and per dataclass), the command, package versions and git commit."""
    record = {"cli_args": cli_args,
              "args": {type(a).__name__: dataclasses.asdict(a) for a in all_args if dataclasses.is_dataclass(a)},
              "command": [sys.executable, *sys.argv], "versions": package_versions(), "git": _git_commit(),
              "num_processes": num_processes, "resumed_from": str(plan.resume_from) if plan.resume_from else None,
              "resumed_without_record": plan.resumed_without_record}
    (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str))
