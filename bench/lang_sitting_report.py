"""Table and curves of the language-task sitting (bench/language_tasks_sitting.sh) from its run folders.

    python bench/lang_sitting_report.py --runs runs/lang --out runs/lang_sitting   # report.md, report.json, curves.png

Run folders are `<runs>/<task>/<family>/run_<seed>/` (task: phonebook_N<n> or babi_qa1; family: gradmem, lm, rmt).
Per task, family and seed: the exact match of the answers the selected checkpoint (best valid exact match of generated
answers) decodes greedily on the test split (`test_squad_exact_match`: SQuAD v1.1 normalisation, so the phone number
'415-202-7731' must come out digit for digit), the same on valid, the teacher-forced token accuracy on test, the
chance level, the steps trained against the run's cap (fewer: the wall-clock guard stopped it, or valid exact match
reached 1.0) and the minutes of training (of the last launch, where a run was resumed); then mean (std over seeds)
per task and family. A run without all_results.json (still training, or crashed) shows `-`.

Chance level: answering with one of the candidates uniformly at random: 1/N for phonebook N (a number of the book),
1/6 for bAbI task 1 (the six rooms). Shortcut level (bAbI task 1, from its test file under --data): answering with
the last room the story names, whoever went there; a model at this level has not shown that it reads the question.
curves.png: valid exact match of generated answers against the step, one panel per task, one colour per family
(seeds thin, their mean thick: mean_curve), chance dashed, shortcut dotted.
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from babi_generator import ROOMS  # noqa: E402
from babi_utils import parse_babi_lines  # noqa: E402
from figures import save_png  # noqa: E402

FAMILY_ORDER = ("gradmem", "rmt", "lm")
FAMILY_LABELS = {"gradmem": "GradMem", "rmt": "RMT", "lm": "full-context LM"}
CURVE_KEY = "eval_squad_exact_match"  # valid, generated answers (on --generation_eval_samples during training)


def chance_level(task: str) -> float:
    """Exact match of a uniformly random candidate answer: 1/N for phonebook_N<n>, 1/6 for bAbI task 1."""
    match = re.fullmatch(r"phonebook_N(\d+)", task)
    if match:
        return 1.0 / int(match[1])
    if task.startswith("babi_qa1"):
        return 1.0 / len(ROOMS)
    return math.nan


def shortcut_level(task: str, data: Path) -> float:
    """bAbI task 1: the share of test questions whose answer is the last room the story names (nan for other tasks or
    without the test file `<data>/<task>/qa1_single-supporting-fact_test.txt`)."""
    path = Path(data) / task / "qa1_single-supporting-fact_test.txt"
    if not task.startswith("babi_qa1") or not path.is_file():
        return math.nan
    rows = parse_babi_lines(path.read_text().splitlines(), source=str(path))
    rooms = re.compile(r"\b(" + "|".join(ROOMS) + r")\b")
    return sum(rooms.findall(r["context"])[-1:] == [r["target"]] for r in rows) / len(rows)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run(run_dir: Path) -> dict:
    """One row: the run's final metrics (None where missing) and its valid curve [(step, exact match)]."""
    results = _read(run_dir / "all_results.json") or {}
    state = _read(run_dir / "trainer_state.json") or {}
    history = state.get("log_history", []) if isinstance(state, dict) else []
    end = next((i for i, r in enumerate(history) if "train_runtime" in r), len(history))
    curve = sorted({r["step"]: r[CURVE_KEY] for r in history[:end] if CURVE_KEY in r and "step" in r}.items())
    runtimes = [r["train_runtime"] for r in history if "train_runtime" in r]
    record = _read(run_dir / "run_config.json") or {}
    cap = record.get("cli_args", {}).get("max_steps") if isinstance(record, dict) else None
    return {"test_em": results.get("test_squad_exact_match"), "valid_em": results.get("eval_squad_exact_match"),
            "test_token_accuracy": results.get("test_token_accuracy"), "steps": results.get("global_step"),
            "max_steps": cap, "train_minutes": runtimes[-1] / 60 if runtimes else None, "curve": curve}


def find_rows(runs: Path, data: Path) -> list:
    rows, shortcut = [], {}
    for run_dir in sorted(runs.glob("*/*/run_*")):
        seed = re.fullmatch(r"run_(\d+)", run_dir.name)
        if not run_dir.is_dir() or seed is None:
            continue
        task, family = run_dir.parent.parent.name, run_dir.parent.name
        if task not in shortcut:
            shortcut[task] = shortcut_level(task, data)
        rows.append({"task": task, "family": family, "seed": int(seed[1]), "chance": chance_level(task),
                     "shortcut": shortcut[task], **read_run(run_dir)})
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(rows, key=lambda r: (r["task"], order.get(r["family"], len(order)), r["family"], r["seed"]))


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.{digits}f} ({_fmt(std, digits)})"


def summaries(rows: list) -> list:
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["family"]), []).append(r)
    return [{"task": task, "family": family, "seeds": [r["seed"] for r in members],
             "test_em": _mean_std([r["test_em"] for r in members]),
             "valid_em": _mean_std([r["valid_em"] for r in members]), "chance": members[0]["chance"],
             "shortcut": members[0]["shortcut"], "steps": _mean_std([r["steps"] for r in members], digits=0)}
            for (task, family), members in groups.items()]


def markdown(rows: list) -> str:
    lines = ["| task | family | seed | test EM (generated) | valid EM | test token acc | chance | steps / cap | "
             "train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['family']} | {r['seed']} | {_fmt(r['test_em'])} | {_fmt(r['valid_em'])} | "
                     f"{_fmt(r['test_token_accuracy'])} | {_fmt(r['chance'])} | {_fmt(r['steps'])} / "
                     f"{_fmt(r['max_steps'])} | {_fmt(r['train_minutes'], 1)} |")
    lines += ["", "Mean (std over seeds):", "",
              "| task | family | seeds | test EM | valid EM | chance | shortcut | steps |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summaries(rows):
        lines.append(f"| {s['task']} | {s['family']} | {', '.join(map(str, s['seeds']))} | {s['test_em']} | "
                     f"{s['valid_em']} | {_fmt(s['chance'])} | {_fmt(s['shortcut'])} | {s['steps']} |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list) -> list:
    """The seeds' mean (step, value) curve: each seed interpolated linearly between its own evaluations at every step
    any seed evaluated, over the steps that every seed covers. Seeds evaluate on different grids (their step caps
    differ), and a mean of whichever seeds evaluated at a step would zigzag between subsets of seeds."""
    first, last = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    steps = sorted({s for c in curves for s, _ in c if first <= s <= last})
    return [(s, statistics.mean(float(np.interp(s, *zip(*c))) for c in curves)) for s in steps]


def plot_curves(rows: list, path: Path) -> bool:
    """curves.png; False when no run has an evaluation yet."""
    tasks = sorted({r["task"] for r in rows if r["curve"]})
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        families = sorted({r["family"] for r in rows if r["task"] == task},
                          key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f))
        for i, family in enumerate(families):
            color = f"C{i}"
            curves = [r["curve"] for r in rows if r["task"] == task and r["family"] == family and r["curve"]]
            for curve in curves:
                ax.plot(*zip(*curve), color=color, linewidth=0.7, alpha=0.5)
            if curves:
                ax.plot(*zip(*mean_curve(curves)), color=color, linewidth=2, label=FAMILY_LABELS.get(family, family))
        first = next(r for r in rows if r["task"] == task)  # the levels are the task's, the same in every row
        for value, style, name in ((first["chance"], "--", "chance"), (first["shortcut"], ":", "shortcut")):
            if not math.isnan(value):
                ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"{name} {value:.2f}")
        ax.set_title(task), ax.set_xlabel("step"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("valid exact match, generated answers")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def write_report(runs, out, data="data/lang") -> str:
    runs, out = Path(runs), Path(out)
    rows = find_rows(runs, Path(data))
    if not rows:
        raise FileNotFoundError(f"no run folders <task>/<family>/run_<seed> under {runs}")
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    (out / "report.md").write_text(
        f"# Language-task sitting: {runs}\n\nTest EM: exact match of greedily generated answers on the test split, "
        "for the checkpoint selected on valid (valid EM, generated answers). Chance: a uniformly random candidate; "
        "shortcut (bAbI): the last room the story names.\n\n" + text)
    (out / "report.json").write_text(json.dumps({"runs": rows, "summary": summaries(rows)}, indent=1))
    plot_curves(rows, out / "curves.png")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/lang", help="folder holding <task>/<family>/run_<seed>/")
    parser.add_argument("--out", default="runs/lang_sitting", help="where report.md, report.json, curves.png go")
    parser.add_argument("--data", default="data/lang", help="the sitting's data folder (bAbI test file: shortcut)")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.out, args.data))


if __name__ == "__main__":
    main()
