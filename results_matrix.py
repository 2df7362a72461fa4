"""The comparison matrix (scripts/run_paper_claims.sh), from the KV runs whose saved arguments name a family:
matrix.md, matrix.json, k_scaling.png and matrix_curves_<task>.png (written by `python collect_results.py --out`).

- A cell is (task, family, K, swept lr): family and K from the saved arguments (training_runs.family_of_arguments;
  K is GradMem's WRITE steps or RMT's forward writes, none for full-context LMs), the swept lr is GradMem's inner lr
  and the others' outer lr. Runs whose other settings (training_runs.setting, without the data path) differ are
  other cells: the table names the options where they differ ("variant"). The seeds of a cell are its runs.
- Per cell and seed: the selected checkpoint's valid exact match (teacher-forced, what selected it), its test exact
  match of generated answers, and the same two of the final checkpoint (the selected one where it is the last);
  means skip seeds without results, every seed is shown.
- Best lr: per (task, family, K, variant), the lr whose cell has the best mean VALID exact match over the seeds every
  lr of the sweep finished (ties: the smaller lr); test numbers never choose. The whole sweep is shown as well.
- k_scaling.png: test generated exact match against K, one panel per task (N), GradMem and RMT at their best lr per
  K (GradMem: and its outer lr per K, chosen on valid too), the full-context LMs as horizontal lines.
  matrix_curves_<task>.png: valid exact match against step of each (family, K) at its best lr.
- Problem runs (listed, never dropped: their numbers stay in the means), one or more of:
  unfinished  no readable all_results.json (running, crashed or killed; the newest checkpoint's step is shown);
  diverged    a non-finite loss logged while training (loss, eval_loss) or in all_results.json (eval_loss,
              test_loss, final_eval_loss, final_test_loss), or a logged gradient norm (before clipping) of at least
              DIVERGED_GRAD_NORM (1e6; runs that learn log at most a few thousand);
  collapsed   the final checkpoint's valid exact match is below COLLAPSE_FRACTION (0.5) of the best one logged
              while training, that best being at least COLLAPSE_MIN_BEST (0.2);
  rolled back the trainer's collapse guard rolled the run back (all_results.json: rollbacks > 0);
  non-finite steps skipped  the trainer skipped optimizer steps with a non-finite loss or gradient (skipped_steps > 0).
  Spike-skipped steps are shown as a count, not as a problem.
- The lr sweep of run_paper_claims.sh's two-phase protocol (SWEEP_SEEDS): lr_sweep_choice picks each sweep's lr from
  its phase-1 runs with best_lr_cells (the same rule), write_lr_choice records it (lr_choice.md, lr_choice.json).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from run_metrics import (Run, _is_number, _pyplot, _safe, _series, kv_task_n, plot_mean_and_seeds,
                         plot_seeds_and_mean, read_run, save_figure, series_style)
from training_runs import checkpoint_folders, checkpoint_step, family_of_arguments, setting

COLLAPSE_FRACTION = 0.5  # a final valid exact match below this fraction of the best one logged ...
COLLAPSE_MIN_BEST = 0.2  # ... that best being at least this much: collapsed
DIVERGED_GRAD_NORM = 1e6  # a logged gradient norm (before clipping) this large: diverged
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
    max_grad_norm: float = math.nan  # the largest gradient norm (before clipping) logged while training
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
    folders = checkpoint_folders(run_dir)
    return checkpoint_step(folders[-1]) if folders else None


def logged_grad_norms(run: Run) -> list:
    """The gradient norms (before clipping) the trainer logged, in order."""
    return [r["grad_norm"] for r in run.log_history if _is_number(r.get("grad_norm"))]


def run_problems(run: Run) -> list:
    """The problem flags of a run (see the module docstring for the rules)."""
    metrics, problems = run.metrics, []
    if not metrics:
        return ["unfinished"]
    logged_losses = [r[key] for r in run.log_history for key in ("loss", "eval_loss") if key in r]
    result_losses = [metrics[key] for key in LOSS_RESULTS if _is_number(metrics.get(key))]
    grad_norms = logged_grad_norms(run)
    if (any(not math.isfinite(v) for v in logged_losses + result_losses + grad_norms)
            or any(v >= DIVERGED_GRAD_NORM for v in grad_norms)):
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
    norms = [v for v in logged_grad_norms(run) if not math.isnan(v)]
    m.max_grad_norm = float(max(norms)) if norms else math.nan
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


def best_lr_cells(cells: list, sweep_seeds: Optional[set] = None) -> dict:
    """{(task, family, K, variant): the cell with the best mean valid exact match} (_best_on_shared_seeds) of each
    sweep; cells without any finished seed are never chosen; a sweep with none is left out."""
    sweeps = {}
    for cell in cells:
        if cell.finished:
            sweeps.setdefault((cell.task, cell.family, cell.K, cell.variant), []).append(cell)
    return {key: _best_on_shared_seeds(sweep, sweep_seeds) for key, sweep in sweeps.items()}


def _best_on_shared_seeds(cells: list, sweep_seeds: Optional[set] = None) -> "Cell":
    """The cell (each with a finished seed) with the best mean valid exact match over the seeds that all of them
    finished (all of a cell's finished seeds where they share none), so that an lr run on more seeds (the two-phase
    protocol's chosen one) is compared on the same seeds as the others; of those, only `sweep_seeds` (run seeds)
    where given and shared: the protocol's phase 2 also runs other lrs on other seeds, as warm starts. Ties: the
    smaller lr."""
    finished = [{r.seed for r in cell.runs if not math.isnan(r.valid_em)} for cell in cells]
    shared = set.intersection(*finished)
    if sweep_seeds and shared & sweep_seeds:
        shared &= sweep_seeds

    def score(cell):
        values = [r.valid_em for r in cell.runs if not math.isnan(r.valid_em) and (not shared or r.seed in shared)]
        return sum(values) / len(values)

    return max(cells, key=lambda cell: (score(cell), -cell.lr))


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
                   "largest gradient norm logged", "rollbacks", "spike-skipped steps", "non-finite skipped steps",
                   "run folder")


def problem_rows(cells: list) -> list:
    rows = []
    for cell in cells:
        for r in cell.runs:
            if r.problems:
                m = r.run.metrics
                rows.append([cell.task, cell.label, str(r.seed), ", ".join(r.problems),
                             "-" if r.steps is None else str(r.steps), _fmt(r.best_logged_valid_em),
                             _fmt(r.final_valid_em), "-" if math.isnan(r.max_grad_norm) else f"{r.max_grad_norm:.3g}",
                             *(str(m.get(key, "-")) for key in GUARD_COUNTS), str(r.run.path)])
    return rows


def k_scaling_cells(best: dict) -> list:
    """(cell, the cells it was chosen from) per K-scaling point: per task and family, each K's best-lr cell
    (full-context LMs: their best cell, K None). GradMem's outer lr is part of its recipe per K (K=5 trains at a
    smaller one): where one (task, family, K) has best cells at several outer lrs (variants that differ in
    learning_rate alone), its point is the one chosen as the inner lr is, on valid exact match (_best_on_shared_seeds),
    and it joins the line of the other K. Ordered as the matrix is."""
    groups = {}
    for (task, family, K, _), cell in best.items():
        groups.setdefault((task, family, K, _recipe(cell)), []).append(cell)
    chosen = [(_best_on_shared_seeds(group), group) for group in groups.values()]
    return sorted(chosen, key=lambda pair: (pair[0].n, pair[0].task, _family_order(pair[0].family), pair[0].family,
                                            _recipe(pair[0]), pair[0].K or 0))


def k_scaling(best: dict) -> list:
    """The K-scaling points (k_scaling_cells) as records: the chosen lr, outer lr, per-seed and mean exact match."""
    return [{"task": cell.task, "n": cell.n, "family": cell.family, "K": cell.K, "variant": _recipe(cell),
             "lr": cell.lr, "lr_name": cell.lr_name,
             "outer_lr": _outer_lr(cell) if cell.lr_name == "inner_lr" else None,
             "outer_lrs_compared": sorted(map(_outer_lr, group)) if len(group) > 1 else [],
             "test_generated_exact_match_mean": _num(cell.mean("test_gen_em")),
             "test_generated_exact_match_per_seed": [_num(v) for v in cell.values("test_gen_em")],
             "valid_exact_match_mean": _num(cell.mean("valid_em")),
             "seeds": [r.seed for r in cell.runs], "finished_seeds": cell.finished,
             "problems": sorted({p for r in cell.runs for p in r.problems})}
            for cell, group in k_scaling_cells(best)]


def _recipe(cell: "Cell") -> str:
    """A cell's variant as its K-scaling line knows it: GradMem's without the outer lr (part of each K's recipe)."""
    return _without_outer_lr(cell.variant) if cell.lr_name == "inner_lr" else cell.variant


def _outer_lr(cell: "Cell") -> Optional[float]:
    """The outer (model) lr a cell's runs trained with, from their saved arguments."""
    return cell.runs[0].run.args.get("learning_rate")


def _without_outer_lr(variant: str) -> str:
    """A variant's label (`learning_rate=0.001, warmup_steps=300`) without its outer lr."""
    return ", ".join(part for part in variant.split(", ") if part and not part.startswith("learning_rate="))


def _num(x: float):
    return None if x is None or math.isnan(x) else x


def matrix_markdown(cells: list, best: dict, runs_root, n_outside: int) -> str:
    chosen = {id(c) for c in best.values()}
    out = [f"# The comparison matrix collected from `{runs_root}`\n",
           f"{sum(len(c.runs) for c in cells)} runs in {len(cells)} cells (task, family, K, swept lr) from their saved "
           f"arguments; {n_outside} other runs (not a KV task, or no run record naming a family) are not in it.\n",
           "Exact match (EM): valid = the selected checkpoint's teacher-forced exact match on the valid samples "
           "evaluated (what selected it); test generated = answers generated greedily on the separate test split. "
           "`selected` is the checkpoint chosen on valid, `final` the last one (the selected one where it is the "
           "last). Each entry: mean over the seeds with results [every seed; - = no results].\n",
           "## Best lr per (N, family, K), chosen on the mean valid EM over the seeds every lr finished (the sweep "
           "seeds of lr_choice.json where the two-phase protocol ran)\n",
           _markdown(CELL_COLUMNS, [_cell_row(c, True) for c in sorted(best.values(), key=lambda c: (
               c.n, c.task, _family_order(c.family), c.family, c.K or 0, c.variant))]),
           "\n## K scaling (the points of k_scaling.png): per family and K its best lr; where a K has best cells at "
           "several outer lrs (GradMem K=5), the one with the better valid EM\n",
           _markdown(CELL_COLUMNS, [_cell_row(c) for c, _ in k_scaling_cells(best)]),
           "\n## Every cell (the whole sweep; **best** = chosen)\n",
           _markdown(CELL_COLUMNS, [_cell_row(c, id(c) in chosen) for c in cells]),
           "\n## Diverged, collapsed, unfinished runs\n",
           "Rules (collect_results.py): unfinished = no all_results.json; diverged = a non-finite loss logged or in "
           f"the results, or a logged gradient norm (before clipping) >= {DIVERGED_GRAD_NORM:g}; collapsed = final "
           f"valid EM below {COLLAPSE_FRACTION:g} x the best logged one (best >= {COLLAPSE_MIN_BEST:g}); rolled back = "
           "the trainer's collapse guard acted; non-finite steps skipped = skipped_steps > 0. These runs stay in the "
           "means above.\n"]
    rows = problem_rows(cells)
    out.append(_markdown(PROBLEM_COLUMNS, rows) if rows else "None.\n")
    return "\n".join(out)


def matrix_records(cells: list, best: dict) -> dict:
    chosen = {id(c) for c in best.values()}

    def run_record(r: MatrixRun) -> dict:
        return {"seed": r.seed, "path": str(r.run.path), "steps": r.steps, "valid_exact_match": _num(r.valid_em),
                "test_generated_exact_match": _num(r.test_gen_em), "final_valid_exact_match": _num(r.final_valid_em),
                "final_test_generated_exact_match": _num(r.final_test_gen_em), "final_is_selected": r.final_is_selected,
                "best_logged_valid_exact_match": _num(r.best_logged_valid_em),
                "max_logged_grad_norm": _num(r.max_grad_norm), "problems": r.problems,
                **{key: r.run.metrics.get(key) for key in GUARD_COUNTS}}

    return {"cells": [{"task": c.task, "n": c.n, "family": c.family, "K": c.K, "lr_name": c.lr_name, "lr": c.lr,
                       "variant": c.variant, "best_lr": id(c) in chosen,
                       **{f"{name}_mean": _num(c.mean(attr)) for name, attr in (
                           ("valid_exact_match", "valid_em"), ("test_generated_exact_match", "test_gen_em"),
                           ("final_valid_exact_match", "final_valid_em"),
                           ("final_test_generated_exact_match", "final_test_gen_em"))},
                       "runs": [run_record(r) for r in c.runs]} for c in cells],
            "k_scaling": k_scaling(best)}


def _point_note(p: dict) -> str:
    """A K-scaling point's note: its lr (and outer lr where several were compared), finished seeds, problems."""
    note = f"{p['lr']:g}" + (f", outer {p['outer_lr']:g}" if p["outer_lrs_compared"] else "")
    return note + f" (n={p['finished_seeds']}" + "".join(f", {x}" for x in p["problems"]) + ")"


def plot_k_scaling(best: dict, out_dir: Path) -> Optional[Path]:
    """k_scaling.png: test generated EM against K, one panel per task; GradMem and RMT at their best lr per K (mean ±
    std over seeds, seeds as dots; each point notes its lr, finished seeds and problems such as diverged), full-context
    LMs as horizontal lines."""
    points = k_scaling(best)
    if not any(p["K"] is not None for p in points):
        return None
    plt = _pyplot()
    tasks = sorted({p["task"] for p in points}, key=lambda t: (kv_task_n(t), t))
    styles = {}  # one style per (family, variant) in every panel
    for p in sorted(points, key=lambda p: (_family_order(p["family"]), p["family"], p["variant"])):
        styles.setdefault((p["family"], p["variant"]), series_style(len(styles)))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        lines = {}
        for p in points:
            if p["task"] == task:
                lines.setdefault((p["family"], p["variant"]), []).append(p)
        ks = sorted({p["K"] for p in points if p["task"] == task and p["K"] is not None})
        for (family, variant), line in sorted(lines.items(), key=lambda kv: (_family_order(kv[0][0]), kv[0])):
            label = family + (f" [{variant}]" if variant else "")
            style = styles[(family, variant)]
            if line[0]["K"] is None:  # full-context: one number for every K
                y = line[0]["test_generated_exact_match_mean"]
                if y is not None:
                    ax.axhline(y, color=style["color"], linestyle="--", linewidth=1,
                               label=f"{label} (lr {_point_note(line[0])})")
                continue
            line.sort(key=lambda p: p["K"])
            x = [p["K"] for p in line]
            seeds = [[v for v in p["test_generated_exact_match_per_seed"] if v is not None] for p in line]
            means = plot_mean_and_seeds(ax, x, seeds, style, label)
            for xi, mean, p in zip(x, means, line):
                if not np.isnan(mean):
                    ax.annotate(_point_note(p), (xi, mean), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xticks(ks), ax.set_xlabel("K (WRITE steps / forward writes)"), ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3), ax.set_title(task, fontsize=10), ax.legend(fontsize=6, loc="best")
    axes[0][0].set_ylabel("test generated exact match (best lr per K)")
    return save_figure(fig, out_dir / "k_scaling.png")


def plot_matrix_curves(best: dict, out_dir: Path) -> list:
    """matrix_curves_<task>.png: valid exact match against step of each (family, K) at its best lr (best_lr_cells);
    seeds thin, mean thick."""
    plt = _pyplot()
    paths = []
    for task in sorted({t for t, *_ in best}, key=lambda t: (kv_task_n(t), t)):
        chosen = sorted((c for (t, *_), c in best.items() if t == task),
                        key=lambda c: (_family_order(c.family), c.family, c.K or 0, c.variant))
        if not any(_series(r.run.log_history)[0] for c in chosen for r in c.runs):
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, cell in enumerate(chosen):
            plot_seeds_and_mean(ax, [r.run.log_history for r in cell.runs], series_style(i), cell.label)
        ax.set_xlabel("step"), ax.set_ylabel("valid exact match"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
        ax.set_title(f"{task}: best lr per (family, K)", fontsize=10), ax.legend(fontsize=6, loc="lower right")
        paths.append(save_figure(fig, out_dir / f"matrix_curves_{_safe(task)}.png"))
    return paths


def write_matrix(runs: list, out_dir: Path, runs_root) -> list:
    """matrix.md, matrix.json, k_scaling.png, matrix_curves_<task>.png under out_dir; [] when no run is a matrix run."""
    cells = matrix_cells(runs)
    if not cells:
        return []
    n_inside = sum(len(c.runs) for c in cells)
    best = best_lr_cells(cells, lr_choice_seeds(out_dir))
    (out_dir / "matrix.md").write_text(matrix_markdown(cells, best, runs_root, len(runs) - n_inside))
    (out_dir / "matrix.json").write_text(json.dumps(matrix_records(cells, best), indent=2))
    files = [out_dir / "matrix.md", out_dir / "matrix.json"]
    path = plot_k_scaling(best, out_dir)
    if path is not None:
        files.append(path)
    return files + plot_matrix_curves(best, out_dir)


def lr_choice_seeds(out_dir: Path) -> Optional[set]:
    """The run seeds the two-phase protocol's lr sweeps compared (out_dir/lr_choice.json, written by
    run_paper_claims.sh into the folder it collects into); None without that file."""
    path = Path(out_dir) / "lr_choice.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {run["seed"] for sweep in record["sweeps"] for lr in sweep["lrs"] for run in lr["runs"]} or None



# ----------------------------------------------------------------------------------------------------------------
# The lr sweep of run_paper_claims.sh's two-phase protocol (SWEEP_SEEDS)
# ----------------------------------------------------------------------------------------------------------------

def lr_sweep_choice(entries: list) -> list:
    """The lr each sweep chooses from its phase-1 runs (scripts/run_paper_claims.sh with SWEEP_SEEDS).

    entries: one per phase-1 run, (sweep, N, lr, run id, run folder, planned --max_steps, failed "1"/"0"), where sweep
    is the script's (family, K) name (gradmem_K2, rmt_K1) and lr is written as the script writes it. The lr is chosen
    by best_lr_cells, the collector's rule: the best mean over the sweep's seeds of the selected checkpoint's valid
    exact match (all_results.json's eval_exact_match), ties: the smaller lr; no test metric is read. A sweep with a
    run that failed (or was skipped), has no results of the planned --max_steps or no valid exact match chooses
    nothing; its problems say why. One record per (sweep, N) in the order of entries: {"sweep", "family", "K", "n",
    "chosen" (the lr as written, None), "problems", "lrs": [{"lr", "valid_exact_match_mean", "runs": [{"run",
    "seed", "path", "valid_exact_match"}]}]}."""
    sweeps = {}
    for sweep, n, *rest in entries:
        sweeps.setdefault((sweep, int(n)), []).append(rest)
    records = []
    for (sweep, n), members in sweeps.items():
        family, _, k = sweep.partition("_K")
        problems, runs, lr_of_path, lrs = [], [], {}, {}
        for lr, run_id, path, max_steps, failed in members:
            run = read_run(Path(path))
            m = matrix_run(run)
            if failed == "1":
                problems.append(f"{run_id} failed or was skipped")
            elif not run.metrics:
                problems.append(f"{run_id} has no all_results.json ({path})")
            elif run.args.get("max_steps") != int(max_steps):
                problems.append(f"{run_id}'s results are of --max_steps {run.args.get('max_steps')}, not the planned "
                                f"{max_steps} ({path})")
            elif m is None or math.isnan(m.valid_em):
                problems.append(f"{run_id} has no valid exact match in all_results.json ({path})")
            else:
                runs.append(run)
                lr_of_path[run.path] = lr
            valid = m.valid_em if run.path in lr_of_path else math.nan
            lrs.setdefault(lr, []).append({"run": run_id, "seed": run.seed, "path": str(path),
                                           "valid_exact_match": _num(valid)})
        chosen = None
        if not problems:
            best = best_lr_cells(matrix_cells(runs))
            if len(best) == 1:
                chosen = lr_of_path[next(iter(best.values())).runs[0].run.path]
            else:
                problems.append("its runs differ in more than the lr and the seed: "
                                + "; ".join(sorted({c.variant for c in best.values()})))
        records.append({"sweep": sweep, "family": family, "K": int(k) if k else None, "n": n, "chosen": chosen,
                        "problems": problems,
                        "lrs": [{"lr": lr, "valid_exact_match_mean": _num(_mean([r["valid_exact_match"] for r in rs])),
                                 "runs": rs} for lr, rs in lrs.items()]})
    return records


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def lr_choice_summary(record: dict) -> str:
    """One line: every lr's mean valid exact match and the chosen lr, or why the sweep chose none."""
    if record["problems"]:
        return "no choice: " + "; ".join(record["problems"])
    return ("valid EM " + ", ".join(f"{e['lr']}: {_fmt(e['valid_exact_match_mean'])}" for e in record["lrs"])
            + f" -> {record['chosen']}")


def lr_choice_markdown(records: list, sweep_seeds: list, other_seeds: list) -> str:
    other = " ".join(other_seeds) or "none (SWEEP_SEEDS names every seed of SEEDS)"
    out = ["# The lr sweep of the two-phase protocol (scripts/run_paper_claims.sh, SWEEP_SEEDS)\n",
           f"Phase 1 ran every swept lr (GradMem: the inner lr of each K; RMT: the outer lr) on the sweep seeds "
           f"{' '.join(sweep_seeds)} (a seed s runs with --seed 142+s). Per (N, family, K) the lr with the best valid "
           "exact match of the selected checkpoint (all_results.json's eval_exact_match, the mean over the sweep "
           "seeds; ties: the smaller lr) was chosen; phase 2 runs it, at each N the lr chosen at that N, on the other "
           f"seeds: {other}. No test metric was read. Cells with a single lr (llama, mamba) ran every seed in phase 1 "
           "and are not listed.\n"]
    head = ("N", "family", "K", "swept lr", "valid EM, selected checkpoint: mean [run seed: value]", "chosen")
    rows = []
    for r in records:
        for e in r["lrs"]:
            seeds = ", ".join(f"{x['seed']}: {_fmt(x['valid_exact_match'])}" for x in e["runs"])
            rows.append([str(r["n"]), r["family"], "-" if r["K"] is None else str(r["K"]),
                         f"{'inner ' if r['family'] == 'gradmem' else ''}{e['lr']}",
                         f"{_fmt(e['valid_exact_match_mean'])} [{seeds}]",
                         "**chosen**" if e["lr"] == r["chosen"] else ("-" if r["chosen"] else "none: phase 2 skipped")])
    out.append(_markdown(head, rows))
    skipped = [r for r in records if r["problems"]]
    if skipped:
        out.append("\n## Sweeps without a choice (their phase 2 was skipped)\n")
        out += [f"- N{r['n']} {r['sweep']}: {'; '.join(r['problems'])}" for r in skipped]
        out.append("")
    return "\n".join(out)


def write_lr_choice(records: list, out_dir, sweep_seeds: list, other_seeds: list) -> list:
    """lr_choice.md and lr_choice.json under out_dir. The sweeps of an lr_choice.json already there on the same sweep
    seeds that these records do not choose again (another family, K or N) are kept, and its other seeds joined, so
    that runs of the protocol over parts of the matrix (one K per sitting) add up to one record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = json.loads((out / "lr_choice.json").read_text()) if (out / "lr_choice.json").is_file() else {}
    if before.get("sweep_seeds") == [int(s) for s in sweep_seeds]:
        chosen_again = {(r["sweep"], r["n"]) for r in records}
        records = sorted([r for r in before["sweeps"] if (r["sweep"], r["n"]) not in chosen_again] + records,
                         key=lambda r: (r["n"], r["family"], -1 if r["K"] is None else r["K"]))
        other_seeds = sorted({int(s) for s in other_seeds} | set(before["other_seeds"]))
    sweep_seeds, other_seeds = [str(s) for s in sweep_seeds], [str(s) for s in other_seeds]
    (out / "lr_choice.md").write_text(lr_choice_markdown(records, sweep_seeds, other_seeds))
    (out / "lr_choice.json").write_text(json.dumps(
        {"sweep_seeds": [int(s) for s in sweep_seeds], "other_seeds": [int(s) for s in other_seeds],
         "rule": "per (N, family, K): the best mean valid exact match (selected checkpoint) over the sweep seeds; "
                 "ties: the smaller lr; test metrics not read", "sweeps": records}, indent=2))
    return [out / "lr_choice.md", out / "lr_choice.json"]


def merge_lr_choice(path, out_dir) -> list:
    """The sweeps of the lr_choice.json at path into out_dir's (write_lr_choice: a sweep chosen in both is path's)."""
    choice = json.loads(Path(path).read_text())
    return write_lr_choice(choice["sweeps"], out_dir, choice["sweep_seeds"], choice["other_seeds"])
