"""A curriculum over the number of KV pairs N: train each stage until its valid exact match reaches a threshold, then
warm-start the next stage from the selected (best-on-valid) checkpoint.

Stages are written `N[:threshold[:option=value,option=value...]]`, e.g. `8:0.95` or `64:0.95:K=5,inner_lr=0.08`: the
options are run-script options of that stage only (any `--name value` the KV run script takes), so per-stage K, inner
lr, outer lr or step budget are written in the stage list and nowhere else.

A stage's state is read from its run folder: finished (all_results.json) at or above the threshold -> done, the next
stage starts from its best checkpoint; finished below it with steps left (a wall-clock budget stopped it) -> resumed;
finished below it with no steps left -> the curriculum stops there and says so.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Stage:
    n_pairs: int
    threshold: float
    options: dict = field(default_factory=dict)  # run-script option name -> value (strings)

    @property
    def name(self) -> str:
        return f"N{self.n_pairs}"


def parse_stage(text: str, default_threshold: float = 0.95) -> Stage:
    """`N[:threshold[:k=v,k=v]]` -> Stage, with an error naming the stage and the format."""
    parts = text.split(":", 2)
    fmt = "a stage is N[:threshold[:option=value,...]], e.g. 8:0.95 or 64:0.95:K=5,inner_lr=0.08"
    try:
        n_pairs = int(parts[0])
        threshold = float(parts[1]) if len(parts) > 1 and parts[1] else default_threshold
    except ValueError:
        raise ValueError(f"stage {text!r}: {fmt}") from None
    if n_pairs < 1 or not 0 < threshold <= 1:
        raise ValueError(f"stage {text!r}: need N >= 1 and 0 < threshold <= 1; {fmt}")
    options = {}
    if len(parts) > 2 and parts[2]:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"stage {text!r}: option {item!r} is not option=value; {fmt}")
            options[key.strip().lstrip("-")] = value.strip()
    return Stage(n_pairs, threshold, options)


def parse_stages(texts, default_threshold: float = 0.95) -> list:
    stages = [parse_stage(t, default_threshold) for t in texts]
    if not stages:
        raise ValueError("the curriculum needs at least one stage")
    names = [s.n_pairs for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"a curriculum visits each N once, got {names}")
    return stages


@dataclass
class StageStatus:
    state: str  # "new", "resume", "done", "stuck"
    exact_match: Optional[float] = None  # valid exact match of the selected checkpoint
    best_checkpoint: Optional[str] = None
    global_step: Optional[int] = None


def stage_status(run_dir: Path, stage: Stage, max_steps: int) -> StageStatus:
    """Where a stage's run folder stands (see the module docstring)."""
    results_file = run_dir / "all_results.json"
    if not results_file.is_file():
        return StageStatus("resume" if run_dir.is_dir() and any(run_dir.glob("checkpoint-*")) else "new")
    try:
        results = json.loads(results_file.read_text())
        exact_match = float(results["eval_exact_match"])
        step = int(results["global_step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{results_file} is unreadable ({error}); move the folder away to redo the stage") from None
    best = results.get("best_model_checkpoint")
    if math.isfinite(exact_match) and exact_match >= stage.threshold:
        return StageStatus("done", exact_match, best, step)
    return StageStatus("resume" if step < max_steps else "stuck", exact_match, best, step)
