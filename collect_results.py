"""Collect the metrics of finished runs into a markdown table and PNG plots.

Reads run folders `<runs>/<task>/<run_name>/run_<seed>/` as run_experiment writes them (run_config.json
or a legacy config.json that holds cli_args, all_results.json, trainer_state.json; checkpoints and the model are not
read), or copies of them that hold only those three files
(`--copy_metrics results/runs` makes such copies, so the tables can be rebuilt from git).
Runs are grouped by (task = data folder, run_name); eval_exact_match / eval_token_accuracy are averaged over seeds,
written as `mean (std) [per-seed values]` like the reference notebook (std over seeds with ddof=1; `nan` = a seed
without all_results.json, e.g. still running or crashed; mean and std skip it). A malformed all_results.json or
trainer_state.json (not JSON, not a dict, a metric that is not a number, a bad log_history) is skipped with a
warning naming it, as if it were missing.

    python collect_results.py --runs runs --out results/summary          # summary.md, summary.json, *.png
    python collect_results.py --runs runs --copy_metrics results/runs    # copy the three json files of every run

Plots (under --out): learning_curves_<task>.png (eval exact match vs step, one colour per run group, seeds thin,
mean thick), em_vs_n.png (exact match vs N of the KV tasks, one panel per model family gradmem / rmt2segm /
llama / mamba / other), ablation_K.png and ablation_grad_mode.png (runs whose saved arguments differ only in K or
in grad_mode: the run records are read, the names are not parsed).

The comparison matrix (scripts/run_paper_claims.sh), for the KV runs whose saved arguments name a family: matrix.md,
matrix.json, k_scaling.png and matrix_curves_<task>.png.
- A cell is (task, family, K, swept lr): family and K from the saved arguments (training_runs.family_of_arguments;
  K is GradMem's WRITE steps or RMT's forward writes, none for full-context LMs), the swept lr is GradMem's inner lr
  and the others' outer lr. Runs whose other settings (training_runs.setting, without the data path) differ are
  other cells: the table names the options where they differ ("variant"). The seeds of a cell are its runs.
- Per cell and seed: the selected checkpoint's valid exact match (teacher-forced, what selected it), its test exact
  match of generated answers, and the same two of the final checkpoint (the selected one where it is the last);
  means skip seeds without results, every seed is shown.
- Best lr: per (task, family, K, variant), the lr whose cell has the best mean VALID exact match (ties: the smaller
  lr); test numbers never choose. The whole sweep is shown as well.
- k_scaling.png: test generated exact match against K, one panel per task (N), GradMem and RMT at their best lr per
  K, the full-context LMs as horizontal lines. matrix_curves_<task>.png: valid exact match against step of each
  (family, K) at its best lr.
- Problem runs (listed, never dropped: their numbers stay in the means), one or more of:
  unfinished  no readable all_results.json (running, crashed or killed; the newest checkpoint's step is shown);
  diverged    a non-finite loss logged while training (loss, eval_loss) or in all_results.json (eval_loss,
              test_loss, final_eval_loss, final_test_loss);
  collapsed   the final checkpoint's valid exact match is below COLLAPSE_FRACTION (0.5) of the best one logged
              while training, that best being at least COLLAPSE_MIN_BEST (0.2);
  rolled back the trainer's collapse guard rolled the run back (all_results.json: rollbacks > 0);
  non-finite steps skipped  the trainer skipped optimizer steps with a non-finite loss or gradient (skipped_steps > 0).
  Spike-skipped steps are shown as a count, not as a problem.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from training_runs import (FAMILIES, LEGACY_RUN_RECORD, RUN_RECORD, family_of_arguments, is_run_record, model_family,
                           saved_arguments, setting)

METRICS = ("eval_token_accuracy", "eval_exact_match")
METRIC_LABELS = {"eval_token_accuracy": "token_acc", "eval_exact_match": "exact_match"}
RUN_FILES = (RUN_RECORD, "all_results.json", "trainer_state.json")
RUN_DIR_PATTERN = re.compile(r"run_(\d+)")  # the run folder of a seed
ABLATIONS = ("K", "grad_mode")  # options whose ablation plots are drawn


@dataclass
class Run:
    task: str
    run_name: str
    seed: int
    path: Path
    metrics: dict  # all_results.json, {} when missing
    log_history: list  # trainer_state.json's records logged while training, [] when missing
    args: dict = field(default_factory=dict)  # the saved arguments (the run record's cli_args), {} without a record


@dataclass
class Group:
    task: str
    run_name: str
    seeds: list
    values: dict = field(default_factory=dict)  # metric -> per-seed values (nan where missing)
    args: dict = field(default_factory=dict)  # the saved arguments of its first run with a record

    def mean(self, metric: str) -> float:
        v = np.asarray(self.values[metric], dtype=float)
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan

    def std(self, metric: str) -> float:
        v = np.asarray(self.values[metric], dtype=float)
        v = v[~np.isnan(v)]
        return float(v.std(ddof=1)) if len(v) > 1 else math.nan


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
        runs.append(Run(task=path.parent.parent.name, run_name=path.parent.name, seed=int(m[1]), path=path,
                        metrics=read_results(path / "all_results.json"),
                        log_history=read_log_history(path / "trainer_state.json"), args=saved_arguments(path)))
    if not runs:
        raise FileNotFoundError(f"no run folders <task>/<run_name>/run_<seed>/ with {' / '.join(RUN_FILES)} under "
                                f"{root}")
    return runs


def group_runs(runs: list) -> list:
    """One Group per (task, run_name), seeds in increasing order."""
    by_key = {}
    for run in sorted(runs, key=lambda r: (r.task, r.run_name, r.seed)):
        by_key.setdefault((run.task, run.run_name), []).append(run)
    groups = []
    for (task, run_name), members in by_key.items():
        values = {m: [float(r.metrics.get(m, math.nan)) for r in members] for m in METRICS}
        args = next((r.args for r in members if r.args), {})
        groups.append(Group(task, run_name, [r.seed for r in members], values, args))
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------

def format_cell(group: Group, metric: str) -> str:
    """`0.998100 (0.002687) [1.0, 0.9962]`, as the reference notebook printed it."""
    mean, std = group.mean(metric), group.std(metric)
    per_seed = ", ".join(repr(round(v, 4)) for v in group.values[metric])
    if math.isnan(mean):
        return f"NaN [{per_seed}]"
    return f"{mean:.6f} ({'NaN' if math.isnan(std) else f'{std:.6f}'}) [{per_seed}]"


def sort_groups(groups: list) -> list:
    """By task (KV tasks by N, then name), then exact match (mean) from best to worst, groups without a number last."""
    def key(g):
        em, n = g.mean("eval_exact_match"), kv_task_n(g.task)
        return (n is None, n or 0, g.task, math.isnan(em), -em if not math.isnan(em) else 0.0, g.run_name)
    return sorted(groups, key=key)


def markdown_table(groups: list) -> str:
    head = ["task", "run_name", "seeds"] + [f"{METRIC_LABELS[m]} mean (std) [runs]" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in sort_groups(groups):
        cells = [g.task, g.run_name, ", ".join(map(str, g.seeds))] + [format_cell(g, m) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_records(groups: list) -> list:
    """JSON-friendly rows (nan -> None)."""
    def num(x):
        return None if math.isnan(x) else x
    return [{"task": g.task, "run_name": g.run_name, "seeds": g.seeds,
             **{m: {"mean": num(g.mean(m)), "std": num(g.std(m)), "per_seed": [num(v) for v in g.values[m]]}
                for m in METRICS}} for g in sort_groups(groups)]


# ----------------------------------------------------------------------------------------------------------------
# Grouping for plots
# ----------------------------------------------------------------------------------------------------------------

def kv_task_n(task: str) -> Optional[int]:
    """N (number of key-value pairs) of a KV task folder name, None for other tasks (SQuAD, bAbI, ...)."""
    from kv_dataset_utils import parse_dataset_name

    try:
        return parse_dataset_name(task).num_kv_pairs
    except ValueError:
        return None


def task_variant(task: str) -> str:
    """The task name with its N replaced by `N*` (`N16-K2V2-V62_1M` -> `N*-K2V2-V62_1M`)."""
    return re.sub(r"^N\d+", "N*", task)


def ablation_groups(groups: list, option: str) -> dict:
    """{(task, label): {value: Group}} for groups whose saved arguments differ only in `option` (e.g. K), apart from
    the seed, name, place and what may change on a resume (training_runs.setting); single values are dropped.
    The label is the groups' run names with their differing middle as * (e.g. gradmem_..._K*_ilr0.04_...)."""
    found = {}
    for g in groups:
        if option not in g.args:
            continue
        rest = setting(g.args)
        value = str(rest.pop(option))
        found.setdefault((g.task, json.dumps(rest, sort_keys=True, default=str)), {})[value] = g
    ablations = {}
    for (task, _), vals in found.items():
        if len(vals) > 1:
            label = _common_name([g.run_name for g in vals.values()])
            ablations[(task, label)] = dict(sorted(vals.items(), key=lambda kv: _natural(kv[0])))
    return dict(sorted(ablations.items()))


def _common_name(names: list) -> str:
    """The names' common start and end around a `*` (the part where they differ)."""
    start = os.path.commonprefix(names)
    room = min(len(n) for n in names) - len(start)
    end = os.path.commonprefix([n[::-1] for n in names])[:room][::-1]
    return f"{start}*{end}"


def _natural(value: str):
    order = {"none": 0, "first": 1, "second": 2}
    return (0, int(value), "") if value.isdigit() else (1, order.get(value, 9), value)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(log_history: list, key: str = "eval_exact_match") -> tuple:
    points = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_learning_curves(runs: list, out_dir: Path) -> list:
    """learning_curves_<task>.png: eval exact match vs step; per run group one colour, seeds thin, mean thick."""
    plt = _pyplot()
    paths = []
    for task in sorted({r.task for r in runs}):
        by_name = {}
        for r in runs:
            if r.task == task:
                by_name.setdefault(r.run_name, []).append(r)
        if not any(_series(r.log_history)[0] for rs in by_name.values() for r in rs):
            continue  # no eval records yet
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, (name, members) in enumerate(sorted(by_name.items())):
            color = f"C{i % 10}"
            per_step = {}
            for r in members:
                x, y = _series(r.log_history)
                ax.plot(x, y, color=color, linewidth=0.7, alpha=0.5)
                for s, v in zip(x, y):
                    per_step.setdefault(s, []).append(v)
            if per_step:
                steps = sorted(per_step)
                ax.plot(steps, [np.mean(per_step[s]) for s in steps], color=color, linewidth=2,
                        label=f"{name} ({len(members)} seeds)")
        ax.set_xlabel("step"), ax.set_ylabel("eval exact match"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"learning_curves_{_safe(task)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _points_with_seeds(ax, x, groups: list, color: str, label: str, metric: str = "eval_exact_match") -> None:
    means = [g.mean(metric) for g in groups]
    stds = [0.0 if math.isnan(g.std(metric)) else g.std(metric) for g in groups]
    ax.errorbar(x, means, yerr=stds, color=color, marker="o", capsize=3, label=label)
    for xi, g in zip(x, groups):
        seeds = [v for v in g.values[metric] if not math.isnan(v)]
        ax.scatter([xi] * len(seeds), seeds, color=color, s=8, alpha=0.5)


def plot_em_vs_n(groups: list, out_dir: Path) -> Optional[Path]:
    """em_vs_n.png: one panel per model family, one line per (run name, task variant) over the KV tasks' N."""
    lines = {}  # family -> {(run_name, variant): [(n, group)]}
    for g in groups:
        n = kv_task_n(g.task)
        if n is not None:
            lines.setdefault(model_family(g.run_name), {}).setdefault((g.run_name, task_variant(g.task)), []).append((n, g))
    if not lines:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    families = [f for f in (*FAMILIES, "other") if f in lines]
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.5), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for i, ((name, variant), points) in enumerate(sorted(lines[family].items())):
            points.sort(key=lambda p: p[0])
            _points_with_seeds(ax, [p[0] for p in points], [p[1] for p in points], f"C{i % 10}", f"{name} [{variant}]")
        ax.set_xscale("log", base=2), ax.set_xlabel("N (key-value pairs)"), ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted({p[0] for pts in lines[family].values() for p in pts}))
        ax.xaxis.set_major_formatter(ScalarFormatter()), ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3), ax.set_title(family), ax.legend(fontsize=5, loc="lower left")
    axes[0][0].set_ylabel("eval exact match (mean ± std over seeds)")
    fig.tight_layout()
    path = out_dir / "em_vs_n.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(groups: list, option: str, out_dir: Path) -> Optional[Path]:
    """ablation_<option>.png: exact match against the option's value, one panel per task, one line per setting."""
    found = ablation_groups(groups, option)
    if not found:
        return None
    plt = _pyplot()
    tasks = sorted({task for task, _ in found})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        bases = [(base, vals) for (t, base), vals in found.items() if t == task]
        labels = sorted({v for _, vals in bases for v in vals}, key=_natural)
        for i, (base, vals) in enumerate(bases):
            _points_with_seeds(ax, [labels.index(v) for v in vals], list(vals.values()), f"C{i % 10}", base)
        ax.set_xticks(range(len(labels)), labels), ax.set_xlabel(option), ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3), ax.set_title(task, fontsize=10), ax.legend(fontsize=5, loc="lower left")
    axes[0][0].set_ylabel("eval exact match (mean ± std over seeds)")
    fig.tight_layout()
    path = out_dir / f"ablation_{option}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The comparison matrix (scripts/run_paper_claims.sh)
# ----------------------------------------------------------------------------------------------------------------

COLLAPSE_FRACTION = 0.5  # a final valid exact match below this fraction of the best one logged ...
COLLAPSE_MIN_BEST = 0.2  # ... that best being at least this much: collapsed
LOSS_RESULTS = ("eval_loss", "test_loss", "final_eval_loss", "final_test_loss")
MATRIX_ORDER = ("gradmem", "rmt", "llama", "mamba")  # families in this order, others after them
GUARD_COUNTS = ("rollbacks", "spike_skipped_steps", "skipped_steps")  # what the trainer's guards did (all_results)


@dataclass
class MatrixRun:
    """One run of the matrix: its cell and the numbers the tables show (nan where missing)."""

    run: Run
    family: str
    K: Optional[int]  # GradMem's WRITE steps, RMT's forward writes; None for full-context LMs
    lr_name: str  # inner_lr (GradMem) or learning_rate
    lr: float
    rest: str  # the other settings (json), which must agree within a cell
    valid_em: float = math.nan  # selected checkpoint, teacher-forced (what selection used)
    test_gen_em: float = math.nan  # selected checkpoint, generated answers on test
    final_valid_em: float = math.nan  # final checkpoint (the selected one where it is the last)
    final_test_gen_em: float = math.nan
    final_is_selected: bool = True
    best_logged_valid_em: float = math.nan  # the best valid exact match logged while training
    steps: Optional[int] = None  # global_step of the results, or the newest checkpoint's step when unfinished
    problems: list = field(default_factory=list)
    variant: str = ""  # filled by matrix_cells where one (task, family, K) has several settings

    @property
    def seed(self) -> int:
        return self.run.seed


@dataclass
class Cell:
    task: str
    family: str
    K: Optional[int]
    lr_name: str
    lr: float
    variant: str
    runs: list  # MatrixRun, by seed

    def values(self, name: str) -> list:
        return [getattr(r, name) for r in self.runs]

    def mean(self, name: str) -> float:
        v = np.asarray(self.values(name), dtype=float)
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan

    @property
    def n(self) -> Optional[int]:
        return kv_task_n(self.task)

    @property
    def label(self) -> str:
        """e.g. gradmem K=2 inner lr 0.04, rmt K=1 lr 0.0003, llama lr 5e-05 (and the variant, where there is one)."""
        k = "" if self.K is None else f" K={self.K}"
        lr = f"{'inner lr' if self.lr_name == 'inner_lr' else 'lr'} {self.lr:g}"
        return f"{self.family}{k} {lr}" + (f" [{self.variant}]" if self.variant else "")

    @property
    def finished(self) -> int:
        return sum(not math.isnan(r.valid_em) for r in self.runs)


def _number(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return float(value) if _is_number(value) else math.nan


def _newest_checkpoint_step(run_dir: Path) -> Optional[int]:
    steps = [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps) if steps else None


def run_problems(run: Run) -> list:
    """The problem flags of a run (see the module docstring for the rules)."""
    metrics, problems = run.metrics, []
    if not metrics:
        return ["unfinished"]
    logged_losses = [r[key] for r in run.log_history for key in ("loss", "eval_loss") if key in r]
    result_losses = [metrics[key] for key in LOSS_RESULTS if _is_number(metrics.get(key))]
    if any(not math.isfinite(v) for v in logged_losses + result_losses):
        problems.append("diverged")
    best = max((r["eval_exact_match"] for r in run.log_history if _is_number(r.get("eval_exact_match"))
                and math.isfinite(r["eval_exact_match"])), default=math.nan)
    final = metrics.get("final_eval_exact_match", metrics.get("eval_exact_match"))
    if _is_number(final) and best >= COLLAPSE_MIN_BEST and final < COLLAPSE_FRACTION * best:
        problems.append("collapsed")
    if _number(metrics, "rollbacks") > 0:
        problems.append("rolled back")
    if _number(metrics, "skipped_steps") > 0:
        problems.append("non-finite steps skipped")
    return problems


def matrix_run(run: Run) -> Optional[MatrixRun]:
    """The run as a matrix run; None for a run without a family (no record, other scripts) or not on a KV task."""
    family = family_of_arguments(run.args)
    if family is None or kv_task_n(run.task) is None:
        return None
    lr_name = "inner_lr" if family == "gradmem" else "learning_rate"
    if not _is_number(run.args.get(lr_name)):
        return None
    K = run.args.get("K") if family in ("gradmem", "rmt") else None
    rest = {k: v for k, v in setting(run.args).items() if k not in ("data_path", lr_name, "K")}
    metrics = run.metrics
    m = MatrixRun(run=run, family=family, K=K, lr_name=lr_name, lr=float(run.args[lr_name]),
                  rest=json.dumps(rest, sort_keys=True, default=str))
    m.valid_em = _number(metrics, "eval_exact_match")
    m.test_gen_em = _number(metrics, "test_generated_exact_match")
    m.final_is_selected = "final_eval_exact_match" not in metrics
    m.final_valid_em = m.valid_em if m.final_is_selected else _number(metrics, "final_eval_exact_match")
    m.final_test_gen_em = m.test_gen_em if m.final_is_selected else _number(metrics,
                                                                             "final_test_generated_exact_match")
    logged = [r["eval_exact_match"] for r in run.log_history if "eval_exact_match" in r]
    m.best_logged_valid_em = float(max(logged)) if logged else math.nan
    step = metrics.get("global_step")
    m.steps = int(step) if _is_number(step) else _newest_checkpoint_step(run.path)
    m.problems = run_problems(run)
    return m


def _family_order(family: str) -> int:
    return MATRIX_ORDER.index(family) if family in MATRIX_ORDER else len(MATRIX_ORDER)


def matrix_cells(runs: list) -> list:
    """The cells of the matrix runs among `runs`, sorted by N, family, K, variant, lr."""
    matrix = [m for m in map(matrix_run, runs) if m is not None]
    # one (task, family, K) with several other settings: name where they differ
    rests = {}
    for m in matrix:
        rests.setdefault((m.run.task, m.family, m.K), {}).setdefault(m.rest, json.loads(m.rest))
    for m in matrix:
        variants = rests[(m.run.task, m.family, m.K)]
        if len(variants) > 1:
            differing = sorted({k for r in variants.values() for k in r
                                if len({json.dumps(v.get(k), default=str) for v in variants.values()}) > 1})
            m.variant = ", ".join(f"{k}={variants[m.rest].get(k)}" for k in differing)
    by_cell = {}
    for m in sorted(matrix, key=lambda m: m.seed):
        by_cell.setdefault((m.run.task, m.family, m.K, m.variant, m.lr_name, m.lr), []).append(m)
    cells = [Cell(task, family, K, lr_name, lr, variant, members)
             for (task, family, K, variant, lr_name, lr), members in by_cell.items()]
    return sorted(cells, key=lambda c: (c.n, c.task, _family_order(c.family), c.family, c.K or 0, c.variant, c.lr))


def best_lr_cells(cells: list) -> dict:
    """{(task, family, K, variant): the cell with the best mean valid exact match} (ties: the smaller lr; cells
    without any finished seed are never chosen; a sweep with none is left out)."""
    best = {}
    for cell in cells:
        key = (cell.task, cell.family, cell.K, cell.variant)
        em = cell.mean("valid_em")
        if math.isnan(em):
            continue
        if key not in best or em > best[key].mean("valid_em") or (
                em == best[key].mean("valid_em") and cell.lr < best[key].lr):
            best[key] = cell
    return best


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _mean_and_seeds(cell: Cell, name: str) -> str:
    """`0.9500 [0.9600, 0.9400, -]`: the mean over the seeds with a number, then every seed."""
    return f"{_fmt(cell.mean(name))} [{', '.join(_fmt(v) for v in cell.values(name))}]"


CELL_COLUMNS = ("N", "family", "K", "swept lr", "seeds (finished)", "valid EM, selected", "test generated EM, selected",
                "valid EM, final", "test generated EM, final", "steps", "problems")


def _cell_row(cell: Cell, chosen: bool = False) -> list:
    problems = sorted({p for r in cell.runs for p in r.problems})
    steps = sorted({r.steps for r in cell.runs if r.steps is not None})
    return [str(cell.n), cell.family + (f" [{cell.variant}]" if cell.variant else ""),
            "-" if cell.K is None else str(cell.K),
            f"{'inner ' if cell.lr_name == 'inner_lr' else ''}{cell.lr:g}" + (" **best**" if chosen else ""),
            f"{', '.join(str(r.seed) for r in cell.runs)} ({cell.finished})",
            _mean_and_seeds(cell, "valid_em"), _mean_and_seeds(cell, "test_gen_em"),
            _mean_and_seeds(cell, "final_valid_em"), _mean_and_seeds(cell, "final_test_gen_em"),
            ", ".join(map(str, steps)) or "-", ", ".join(problems) or "-"]


def _markdown(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


PROBLEM_COLUMNS = ("task", "cell", "seed", "problems", "steps", "best valid EM logged", "valid EM, final",
                   "rollbacks", "spike-skipped steps", "non-finite skipped steps", "run folder")


def problem_rows(cells: list) -> list:
    rows = []
    for cell in cells:
        for r in cell.runs:
            if r.problems:
                m = r.run.metrics
                rows.append([cell.task, cell.label, str(r.seed), ", ".join(r.problems),
                             "-" if r.steps is None else str(r.steps), _fmt(r.best_logged_valid_em),
                             _fmt(r.final_valid_em), *(str(m.get(key, "-")) for key in GUARD_COUNTS), str(r.run.path)])
    return rows


def k_scaling(cells: list) -> list:
    """The K-scaling points: per task and family, each K's best-lr cell (full-context LMs: their best cell, K None)."""
    points = []
    for (task, family, K, variant), cell in best_lr_cells(cells).items():
        points.append({"task": task, "n": cell.n, "family": family, "K": K, "variant": variant, "lr": cell.lr,
                       "lr_name": cell.lr_name, "test_generated_exact_match_mean": _num(cell.mean("test_gen_em")),
                       "test_generated_exact_match_per_seed": [_num(v) for v in cell.values("test_gen_em")],
                       "valid_exact_match_mean": _num(cell.mean("valid_em")),
                       "seeds": [r.seed for r in cell.runs]})
    return sorted(points, key=lambda p: (p["n"], p["task"], _family_order(p["family"]), p["family"], p["variant"],
                                         p["K"] or 0))


def _num(x: float):
    return None if x is None or math.isnan(x) else x


def matrix_markdown(cells: list, runs_root, n_outside: int) -> str:
    best = best_lr_cells(cells)
    chosen = {id(c) for c in best.values()}
    out = [f"# The comparison matrix collected from `{runs_root}`\n",
           f"{sum(len(c.runs) for c in cells)} runs in {len(cells)} cells (task, family, K, swept lr) from their saved "
           f"arguments; {n_outside} other runs (not a KV task, or no run record naming a family) are not in it.\n",
           "Exact match (EM): valid = the selected checkpoint's teacher-forced exact match on the valid samples "
           "evaluated (what selected it); test generated = answers generated greedily on the separate test split. "
           "`selected` is the checkpoint chosen on valid, `final` the last one (the selected one where it is the "
           "last). Each entry: mean over the seeds with results [every seed; - = no results].\n",
           "## Best lr per (N, family, K), chosen on the mean valid EM\n",
           _markdown(CELL_COLUMNS, [_cell_row(c, True) for c in sorted(best.values(), key=lambda c: (
               c.n, c.task, _family_order(c.family), c.family, c.K or 0, c.variant))]),
           "\n## Every cell (the whole sweep; **best** = chosen)\n",
           _markdown(CELL_COLUMNS, [_cell_row(c, id(c) in chosen) for c in cells]),
           "\n## Diverged, collapsed, unfinished runs\n",
           "Rules (collect_results.py): unfinished = no all_results.json; diverged = a non-finite loss logged or in "
           f"the results; collapsed = final valid EM below {COLLAPSE_FRACTION:g} x the best logged one (best >= "
           f"{COLLAPSE_MIN_BEST:g}); rolled back = the trainer's collapse guard acted; non-finite steps skipped = "
           "skipped_steps > 0. These runs stay in the means above.\n"]
    rows = problem_rows(cells)
    out.append(_markdown(PROBLEM_COLUMNS, rows) if rows else "None.\n")
    return "\n".join(out)


def matrix_records(cells: list) -> dict:
    best = best_lr_cells(cells)
    chosen = {id(c) for c in best.values()}

    def run_record(r: MatrixRun) -> dict:
        return {"seed": r.seed, "path": str(r.run.path), "steps": r.steps, "valid_exact_match": _num(r.valid_em),
                "test_generated_exact_match": _num(r.test_gen_em), "final_valid_exact_match": _num(r.final_valid_em),
                "final_test_generated_exact_match": _num(r.final_test_gen_em), "final_is_selected": r.final_is_selected,
                "best_logged_valid_exact_match": _num(r.best_logged_valid_em), "problems": r.problems,
                **{key: r.run.metrics.get(key) for key in GUARD_COUNTS}}

    return {"cells": [{"task": c.task, "n": c.n, "family": c.family, "K": c.K, "lr_name": c.lr_name, "lr": c.lr,
                       "variant": c.variant, "best_lr": id(c) in chosen,
                       **{f"{name}_mean": _num(c.mean(attr)) for name, attr in (
                           ("valid_exact_match", "valid_em"), ("test_generated_exact_match", "test_gen_em"),
                           ("final_valid_exact_match", "final_valid_em"),
                           ("final_test_generated_exact_match", "final_test_gen_em"))},
                       "runs": [run_record(r) for r in c.runs]} for c in cells],
            "k_scaling": k_scaling(cells)}


def plot_k_scaling(cells: list, out_dir: Path) -> Optional[Path]:
    """k_scaling.png: test generated EM against K, one panel per task; GradMem and RMT at their best lr per K (mean ±
    std over seeds, seeds as dots), full-context LMs as horizontal lines."""
    points = k_scaling(cells)
    if not any(p["K"] is not None for p in points):
        return None
    plt = _pyplot()
    tasks = sorted({p["task"] for p in points}, key=lambda t: (kv_task_n(t), t))
    colors = {}  # one colour per (family, variant) in every panel
    for p in sorted(points, key=lambda p: (_family_order(p["family"]), p["family"], p["variant"])):
        colors.setdefault((p["family"], p["variant"]), f"C{len(colors) % 10}")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        lines = {}
        for p in points:
            if p["task"] == task:
                lines.setdefault((p["family"], p["variant"]), []).append(p)
        ks = sorted({p["K"] for p in points if p["task"] == task and p["K"] is not None})
        for (family, variant), line in sorted(lines.items(), key=lambda kv: (_family_order(kv[0][0]), kv[0])):
            label = family + (f" [{variant}]" if variant else "")
            color = colors[(family, variant)]
            if line[0]["K"] is None:  # full-context: one number for every K
                y = line[0]["test_generated_exact_match_mean"]
                if y is not None:
                    ax.axhline(y, color=color, linestyle="--", linewidth=1, label=f"{label} (lr {line[0]['lr']:g})")
                continue
            line.sort(key=lambda p: p["K"])
            x = [p["K"] for p in line]
            seeds = [[v for v in p["test_generated_exact_match_per_seed"] if v is not None] for p in line]
            means = [np.mean(v) if v else np.nan for v in seeds]
            stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in seeds]
            ax.errorbar(x, means, yerr=stds, color=color, marker="o", capsize=3, label=label)
            for xi, v in zip(x, seeds):
                ax.scatter([xi] * len(v), v, color=color, s=8, alpha=0.5)
            for xi, mean, p in zip(x, means, line):
                if not np.isnan(mean):
                    ax.annotate(f"{p['lr']:g}", (xi, mean), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xticks(ks), ax.set_xlabel("K (WRITE steps / forward writes)"), ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3), ax.set_title(task, fontsize=10), ax.legend(fontsize=6, loc="lower left")
    axes[0][0].set_ylabel("test generated exact match (best lr per K)")
    fig.tight_layout()
    path = out_dir / "k_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrix_curves(cells: list, out_dir: Path) -> list:
    """matrix_curves_<task>.png: valid exact match against step of each (family, K) at its best lr; seeds thin, mean
    thick."""
    best = best_lr_cells(cells)
    plt = _pyplot()
    paths = []
    for task in sorted({t for t, *_ in best}, key=lambda t: (kv_task_n(t), t)):
        chosen = sorted((c for (t, *_), c in best.items() if t == task),
                        key=lambda c: (_family_order(c.family), c.family, c.K or 0, c.variant))
        if not any(_series(r.run.log_history)[0] for c in chosen for r in c.runs):
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, cell in enumerate(chosen):
            color = f"C{i % 10}"
            per_step = {}
            for r in cell.runs:
                x, y = _series(r.run.log_history)
                ax.plot(x, y, color=color, linewidth=0.7, alpha=0.5)
                for step, v in zip(x, y):
                    per_step.setdefault(step, []).append(v)
            if per_step:
                steps = sorted(per_step)
                ax.plot(steps, [np.mean(per_step[s]) for s in steps], color=color, linewidth=2,
                        label=f"{cell.label} ({len(cell.runs)} seeds)")
        ax.set_xlabel("step"), ax.set_ylabel("valid exact match"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
        ax.set_title(f"{task}: best lr per (family, K)", fontsize=10), ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"matrix_curves_{_safe(task)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_matrix(runs: list, out_dir: Path, runs_root) -> list:
    """matrix.md, matrix.json, k_scaling.png, matrix_curves_<task>.png under out_dir; [] when no run is a matrix run."""
    cells = matrix_cells(runs)
    if not cells:
        return []
    n_inside = sum(len(c.runs) for c in cells)
    (out_dir / "matrix.md").write_text(matrix_markdown(cells, runs_root, len(runs) - n_inside))
    (out_dir / "matrix.json").write_text(json.dumps(matrix_records(cells), indent=2))
    files = [out_dir / "matrix.md", out_dir / "matrix.json"]
    path = plot_k_scaling(cells, out_dir)
    if path is not None:
        files.append(path)
    return files + plot_matrix_curves(cells, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------

def write_summary(runs_root, out_dir) -> dict:
    """Write summary.md, summary.json and the PNGs under out_dir. Returns {"table": str, "files": [Path]}."""
    runs = find_runs(runs_root)
    groups = group_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(groups)
    header = (f"# Results collected from `{runs_root}`\n\n{len(runs)} runs in {len(groups)} groups. Metrics of "
              "the best checkpoint on the valid split (all_results.json); mean (std over seeds, ddof=1) "
              "[per-seed values, nan = no all_results.json].\n\n")
    (out / "summary.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps(summary_records(groups), indent=2))
    files = [out / "summary.md", out / "summary.json", *plot_learning_curves(runs, out)]
    for path in (plot_em_vs_n(groups, out), *(plot_ablation(groups, option, out) for option in ABLATIONS)):
        if path is not None:
            files.append(path)
    files += write_matrix(runs, out, runs_root)
    return {"table": table, "files": files}


def copy_metrics(runs_root, dest) -> list:
    """Copy the run record / all_results.json / trainer_state.json of every run to dest/<task>/<run_name>/run_<seed>/."""
    root, dest = Path(runs_root).resolve(), Path(dest).resolve()
    if dest == root or root in dest.parents:
        raise ValueError(f"--copy_metrics {dest} lies inside --runs {root}; copy to a folder outside it "
                         "(e.g. results/runs)")
    copied = []
    for run in find_runs(root):
        target = dest / run.path.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for name in run_files(run.path):
            shutil.copy2(run.path / name, target / name)
            copied.append(target / name)
    return copied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder holding <task>/<run_name>/run_<seed>/ (default: runs)")
    parser.add_argument("--out", default=None, help="write summary.md, summary.json and the PNG plots here")
    parser.add_argument("--copy_metrics", default=None,
                        help="copy the three json files of every run (not checkpoints) to this folder")
    args = parser.parse_args(argv)
    if args.out is None and args.copy_metrics is None:
        parser.error("nothing to do: give --out results/summary (table and plots) and/or --copy_metrics results/runs")
    if args.copy_metrics is not None:
        copied = copy_metrics(args.runs, args.copy_metrics)
        print(f"copied {len(copied)} files to {args.copy_metrics}")
    if args.out is not None:
        result = write_summary(args.runs, args.out)
        print(result["table"])
        print("wrote " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    main()
