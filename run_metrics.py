"""Reading the metrics of finished runs: `Run`, one per `<task>/<run_name>/run_<seed>/` folder, and the helpers the
reports share (collect_results.py: tables and plots per run group; results_matrix.py: the comparison matrix).

A run folder holds what run_experiment writes (run_config.json or a legacy config.json that holds cli_args,
all_results.json, trainer_state.json; of the checkpoints, only the newest one's trainer_state.json is read, the log so
far of a run that has not finished; the model is not read), or copies of those three files.
A malformed all_results.json or trainer_state.json (not JSON, not a dict, a metric that is not a number, a bad
log_history) is skipped with a warning naming it, as if it were missing.
"""
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from figures import save_png
from training_runs import LEGACY_RUN_RECORD, RUN_RECORD, checkpoint_folders, is_run_record, saved_arguments

METRICS = ("eval_token_accuracy", "eval_exact_match")
RUN_FILES = (RUN_RECORD, "all_results.json", "trainer_state.json")
RUN_DIR_PATTERN = re.compile(r"run_(\d+)")  # the run folder of a seed


@dataclass
class Run:
    task: str
    run_name: str
    seed: int
    path: Path
    metrics: dict  # all_results.json, {} when missing
    log_history: list  # trainer_state.json's records logged while training, [] when missing
    args: dict = field(default_factory=dict)  # the saved arguments (the run record's cli_args), {} without a record


# ----------------------------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------------------------

def _read_json(path: Path):
    """The parsed file; None when it is missing, or malformed (skipped with a warning naming it)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _skip(path, f"not valid JSON ({e})")
        return None


def _skip(path: Path, problem: str) -> None:
    print(f"warning: skipping {path}: {problem}", file=sys.stderr)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(path: Path) -> dict:
    """all_results.json as a dict whose metrics are numbers; {} when missing or malformed (with a warning)."""
    results = _read_json(path)
    if results is None:
        return {}
    if not isinstance(results, dict):
        _skip(path, f"a {type(results).__name__}, not a dict of results")
        return {}
    bad = [m for m in METRICS if m in results and not _is_number(results[m])]
    if bad:
        _skip(path, f"{', '.join(bad)} not a number")
        return {}
    return results


def read_log_history(path: Path) -> list:
    """trainer_state.json's log_history as records logged while training; [] when missing or malformed."""
    state = _read_json(path)
    if state is None:
        return []
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        _skip(path, "log_history is not a list of records")
        return []
    if any(not _is_number(r[key]) for r in history for key in ("step", *METRICS) if key in r):
        _skip(path, "a step or metric of log_history is not a number")
        return []
    return training_log(history)


def training_log(log_history: list) -> list:
    """The records logged while training (drops the re-evaluation of the best checkpoint after train_runtime)."""
    end = next((i for i, r in enumerate(log_history) if "train_runtime" in r), len(log_history))
    return log_history[:end]


def run_files(run_dir: Path) -> list:
    """The RUN_FILES a run folder holds, with a legacy record config.json (not a model's config.json)."""
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    if is_run_record(run_dir / LEGACY_RUN_RECORD):
        names.append(LEGACY_RUN_RECORD)
    return names


def trainer_state_file(run_dir: Path) -> Path:
    """The trainer_state.json that holds a run's log: the run folder's own (written when training ends), or, in a run
    still training or cut short (no all_results.json), its newest checkpoint's: the log so far."""
    own = run_dir / "trainer_state.json"
    if (run_dir / "all_results.json").exists():
        return own
    saved = [f / "trainer_state.json" for f in checkpoint_folders(run_dir) if (f / "trainer_state.json").is_file()]
    return saved[-1] if saved else own


def read_run(path: Path) -> Run:
    """The run folder `<task>/<run_name>/run_<seed>` as a Run (metrics, log and arguments empty where missing)."""
    path = Path(path)
    return Run(task=path.parent.parent.name, run_name=path.parent.name,
               seed=int(RUN_DIR_PATTERN.fullmatch(path.name)[1]), path=path,
               metrics=read_results(path / "all_results.json"),
               log_history=read_log_history(trainer_state_file(path)), args=saved_arguments(path))


def find_runs(runs_root) -> list:
    """Every `<task>/<run_name>/run_<seed>` folder under runs_root (at any depth) holding at least one of RUN_FILES."""
    root = Path(runs_root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist; pass --runs with the folder that holds "
                                "<task>/<run_name>/run_<seed>/ (e.g. runs or results/runs)")
    runs = []
    for path in sorted(root.rglob("run_*")):
        m = RUN_DIR_PATTERN.fullmatch(path.name)
        if not m or not path.is_dir() or not run_files(path):
            continue
        if len(path.relative_to(root).parts) < 3:
            raise ValueError(f"{path} is not laid out as <task>/<run_name>/run_<seed> under {root}; pass --runs with "
                             "the folder above the task folders")
        runs.append(read_run(path))
    if not runs:
        raise FileNotFoundError(f"no run folders <task>/<run_name>/run_<seed>/ with {' / '.join(RUN_FILES)} under "
                                f"{root}")
    return runs


def kv_task_n(task: str) -> Optional[int]:
    """N (number of key-value pairs) of a KV task folder name, None for other tasks (SQuAD, bAbI, ...)."""
    from kv_dataset_utils import parse_dataset_name

    try:
        return parse_dataset_name(task).num_kv_pairs
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Plot helpers
# ----------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(log_history: list, key: str = "eval_exact_match") -> tuple:
    points = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def series_style(i: int) -> dict:
    """Colour, line style and marker of a plot's i-th series: the ten colours of the cycle, then the same colours
    dashed with squares, and so on, so that no two series of a legend look alike."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4], "marker": "osD^"[i // 10 % 4]}


def plot_seeds_and_mean(ax, log_histories: list, style: dict, label: str) -> None:
    """Valid exact match against step: each seed's curve thin, their mean per step thick (labelled with the seeds);
    style: series_style's."""
    per_step = {}
    for history in log_histories:
        x, y = _series(history)
        ax.plot(x, y, color=style["color"], linewidth=0.7, alpha=0.5)
        for step, value in zip(x, y):
            per_step.setdefault(step, []).append(value)
    if per_step:
        steps = sorted(per_step)
        ax.plot(steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], color=style["color"],
                linestyle=style["linestyle"], linewidth=2, label=f"{label} ({len(log_histories)} seeds)")


def plot_mean_and_seeds(ax, x, seed_values: list, style: dict, label: str) -> list:
    """At each x, the mean of its seeds' values with their std (ddof=1; none for one seed) as an error bar and every
    seed as a dot; style: series_style's. Returns the means (nan where x has no value)."""
    means = [sum(v) / len(v) if v else math.nan for v in seed_values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in seed_values]
    ax.errorbar(x, means, yerr=stds, capsize=3, label=label, **style)
    for xi, v in zip(x, seed_values):
        ax.scatter([xi] * len(v), v, color=style["color"], s=8, alpha=0.5)
    return means


def legend_below(ax, fontsize: int = 5) -> None:
    """The axes' legend under the plot and its x label, outside it: a long legend inside would hide the points it
    names (give the figure LEGEND_ROW_INCHES of height per legend entry)."""
    ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)


LEGEND_ROW_INCHES = 0.1  # one entry of legend_below's legend at fontsize 5


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure."""
    fig.tight_layout()
    save_png(fig, path)
    _pyplot().close(fig)
    return path
