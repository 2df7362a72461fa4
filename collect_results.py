"""Collect the metrics of finished runs into a markdown table and PNG plots.

Reads run folders `<runs>/<task>/<run_name>/run_<seed>/` as run_experiment writes them (run_config.json
or a legacy config.json that holds cli_args, all_results.json, trainer_state.json; of a run that has not finished, its
newest checkpoint's trainer_state.json, the log so far; the model is not read), or copies of them that hold only those
three files (`--copy_metrics results/runs` makes such copies of the finished runs, so the tables can be rebuilt from
git).
Runs are grouped by (task = data folder, run_name); eval_exact_match / eval_token_accuracy are averaged over seeds,
written as `mean (std) [per-seed values]` like the reference notebook (std over seeds with ddof=1; `nan` = a seed
without all_results.json, e.g. still running or crashed; mean and std skip it). A malformed all_results.json or
trainer_state.json (not JSON, not a dict, a metric that is not a number, a bad log_history) is skipped with a
warning naming it, as if it were missing.

    python collect_results.py --runs runs --out results/summary          # summary.md, summary.json, *.png
    python collect_results.py --runs runs --copy_metrics results/runs    # the three json files of each finished run

Plots (under --out): learning_curves_<task>.png (eval exact match vs step, one colour per run group, seeds thin,
mean thick), em_vs_n.png (exact match vs N of the KV tasks, one panel per model family gradmem / rmt2segm /
llama / mamba / other), ablation_K.png and ablation_grad_mode.png (runs whose saved arguments differ only in K or
in grad_mode: the run records are read, the names are not parsed).

The comparison matrix (matrix.md, k_scaling.png, ...) is results_matrix.py's; reading run folders is run_metrics.py's.
"""
import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from results_matrix import write_matrix
from run_metrics import (LEGEND_ROW_INCHES, METRICS, _pyplot, _safe, _series, find_runs, kv_task_n, legend_below,
                         plot_mean_and_seeds, plot_seeds_and_mean, run_files, save_figure, series_style)
from training_runs import FAMILIES, model_family, setting

METRIC_LABELS = {"eval_token_accuracy": "token_acc", "eval_exact_match": "exact_match"}
ABLATIONS = ("K", "grad_mode")  # options whose ablation plots are drawn


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
            plot_seeds_and_mean(ax, [r.log_history for r in members], series_style(i), name)
        ax.set_xlabel("step"), ax.set_ylabel("eval exact match"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=6, loc="lower right")
        paths.append(save_figure(fig, out_dir / f"learning_curves_{_safe(task)}.png"))
    return paths


def _points_with_seeds(ax, x, groups: list, style: dict, label: str, metric: str = "eval_exact_match") -> None:
    plot_mean_and_seeds(ax, x, [[v for v in g.values[metric] if not math.isnan(v)] for g in groups], style, label)


def plot_em_vs_n(groups: list, out_dir: Path) -> Optional[Path]:
    """em_vs_n.png: one panel per model family, one line per (run name, task variant) over the KV tasks' N."""
    lines = {}  # family -> {(run_name, variant): [(n, group)]}
    for g in groups:
        n = kv_task_n(g.task)
        if n is not None and not math.isnan(g.mean("eval_exact_match")):  # unfinished runs have no point to plot
            lines.setdefault(model_family(g.run_name), {}).setdefault((g.run_name, task_variant(g.task)), []).append((n, g))
    if not lines:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    families = [f for f in (*FAMILIES, "other") if f in lines]
    height = 4.5 + LEGEND_ROW_INCHES * max(len(family_lines) for family_lines in lines.values())
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), height), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for i, ((name, variant), points) in enumerate(sorted(lines[family].items())):
            points.sort(key=lambda p: p[0])
            _points_with_seeds(ax, [p[0] for p in points], [p[1] for p in points], series_style(i),
                               f"{name} [{variant}]")
        ax.set_xscale("log", base=2), ax.set_xlabel("N (key-value pairs)"), ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted({p[0] for pts in lines[family].values() for p in pts}))
        ax.xaxis.set_major_formatter(ScalarFormatter()), ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3), ax.set_title(family), legend_below(ax)
    axes[0][0].set_ylabel("eval exact match (mean ± std over seeds)")
    return save_figure(fig, out_dir / "em_vs_n.png")


def plot_ablation(groups: list, option: str, out_dir: Path) -> Optional[Path]:
    """ablation_<option>.png: exact match against the option's value, one panel per task, one line per setting."""
    found = ablation_groups(groups, option)
    if not found:
        return None
    plt = _pyplot()
    tasks = sorted({task for task, _ in found})
    height = 4.5 + LEGEND_ROW_INCHES * max(sum(t == task for t, _ in found) for task in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), height), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        bases = [(base, vals) for (t, base), vals in found.items() if t == task]
        labels = sorted({v for _, vals in bases for v in vals}, key=_natural)
        for i, (base, vals) in enumerate(bases):
            _points_with_seeds(ax, [labels.index(v) for v in vals], list(vals.values()), series_style(i), base)
        ax.set_xticks(range(len(labels)), labels), ax.set_xlabel(option), ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3), ax.set_title(task, fontsize=10), legend_below(ax)
    axes[0][0].set_ylabel("eval exact match (mean ± std over seeds)")
    return save_figure(fig, out_dir / f"ablation_{option}.png")


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
    """Copy the run record / all_results.json / trainer_state.json of every finished run (one with results) to
    dest/<task>/<run_name>/run_<seed>/. Unfinished runs are left out: on another machine a copied record without a
    checkpoint would be a run folder to start over in, its settings recorded by the code of its first attempt."""
    root, dest = Path(runs_root).resolve(), Path(dest).resolve()
    if dest == root or root in dest.parents:
        raise ValueError(f"--copy_metrics {dest} lies inside --runs {root}; copy to a folder outside it "
                         "(e.g. results/runs)")
    copied = []
    for run in find_runs(root):
        if not run.metrics:
            print(f"not copied (no results: unfinished, or a malformed all_results.json): {run.path}")
            continue
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
                        help="copy the three json files of every finished run (not checkpoints) to this folder")
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
