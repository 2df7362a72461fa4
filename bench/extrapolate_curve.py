"""Fit a training run's valid exact match against log(step) and extrapolate: at which step would the curve reach a
target, and what does it predict for a continuation?

    python bench/extrapolate_curve.py results/kv_capacity/seed_1_n96_ilr30/N96 --target 0.90 --at 20000 36000
    python bench/extrapolate_curve.py runs/kv_capacity/seed_1_n96_ilr30/N96 --fit_until 10000   # test a prediction

Reads the evaluations of each run folder's trainer_state.json (eval_exact_match per step; a step evaluated twice, as
the last step is when the selected checkpoint is evaluated again after training, keeps its first evaluation), fits
em = a + b ln(step) by least squares over the steps >= --from_step, and prints per run the fit, its gain per doubling
of the steps, its RMS error, the step at which the fit reaches --target, and its value at the --at steps. This is an
extrapolation, not a measurement: it says how many steps a curve of this shape would need, and a continuation of the
run is what tests it. --fit_until STEP fits the evaluations up to STEP only and compares the later ones (up to
--compare_until, where given) with the fit's prediction (their count and steps, mean and median measured, mean
predicted, mean difference).
"""
import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Optional


def evaluations(run_dir: Path) -> list:
    """(step, valid exact match) of every evaluation in order, the first one where a step was evaluated twice."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    seen = {}
    for entry in history:
        if "eval_exact_match" in entry and entry["step"] not in seen:
            seen[entry["step"]] = float(entry["eval_exact_match"])
    return sorted(seen.items())


def log_fit(points: list) -> tuple:
    """Least-squares (a, b, rms) of em = a + b ln(step) over (step, em) points with step > 0."""
    xs = [math.log(step) for step, _ in points]
    ys = [em for _, em in points]
    if len(points) < 2 or max(xs) == min(xs):
        raise ValueError(f"a fit needs evaluations at two or more steps; got {len(points)} "
                         "(lower --from_step, or pick a run with more evaluations)")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    a = mean_y - b * mean_x
    rms = math.sqrt(sum((a + b * x - y) ** 2 for x, y in zip(xs, ys)) / len(xs))
    return a, b, rms


def step_reaching(a: float, b: float, target: float):
    """The step at which a + b ln(step) reaches target; None where the fit does not rise."""
    return math.exp((target - a) / b) if b > 0 else None


def report(run_dirs: list, target: float, from_step: int, at: list, fit_until: Optional[int] = None,
           compare_until: Optional[int] = None) -> str:
    columns = ["run", "evaluations fitted (steps)", "fit: valid EM = a + b ln(step)", "per doubling", "RMS error",
               f"fit reaches {target} at step", *(f"fit at step {s:,}" for s in at)]
    if fit_until is not None:
        columns += ["later evaluations (steps)", "measured, mean", "measured, median", "predicted, mean",
                    "measured - predicted"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for run_dir in run_dirs:
        points = [(step, em) for step, em in evaluations(run_dir) if step >= max(from_step, 1)]
        fitted = [p for p in points if fit_until is None or p[0] <= fit_until]
        a, b, rms = log_fit(fitted)
        reach = step_reaching(a, b, target)
        row = [str(run_dir), f"{len(fitted)} ({fitted[0][0]:,}-{fitted[-1][0]:,})", f"{a:.3f} + {b:.4f} ln(step)",
               f"{b * math.log(2):+.3f}", f"{rms:.3f}", "never" if reach is None else f"{reach:,.0f}",
               *(f"{a + b * math.log(s):.3f}" for s in at)]
        if fit_until is not None:
            later = [p for p in points[len(fitted):] if compare_until is None or p[0] <= compare_until]
            if later:
                measured = statistics.mean(em for _, em in later)
                predicted = statistics.mean(a + b * math.log(step) for step, _ in later)
                row += [f"{len(later)} ({later[0][0]:,}-{later[-1][0]:,})", f"{measured:.3f}",
                        f"{statistics.median(em for _, em in later):.3f}", f"{predicted:.3f}",
                        f"{measured - predicted:+.3f}"]
            else:
                row += ["none", "-", "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run folders holding a trainer_state.json")
    parser.add_argument("--target", type=float, default=0.90, help="the valid exact match to reach")
    parser.add_argument("--from_step", type=int, default=1000, help="fit the evaluations from this step on")
    parser.add_argument("--at", type=int, nargs="*", default=[], help="steps to print the fit's value at")
    parser.add_argument("--fit_until", type=int, default=None,
                        help="fit the evaluations up to this step only; compare the later ones with the fit")
    parser.add_argument("--compare_until", type=int, default=None,
                        help="with --fit_until: compare the later evaluations up to this step only")
    args = parser.parse_args(argv)
    if args.compare_until is not None and (args.fit_until is None or args.compare_until <= args.fit_until):
        parser.error(f"--compare_until {args.compare_until} needs --fit_until below it (the evaluations after "
                     "--fit_until and up to --compare_until are compared with the fit)")
    for run_dir in args.run_dirs:
        if not (run_dir / "trainer_state.json").is_file():
            parser.error(f"{run_dir}: no trainer_state.json; pass a run folder (a stage folder such as "
                         "results/kv_capacity/seed_1_n96_ilr30/N96)")
    try:
        print(report(args.run_dirs, args.target, args.from_step, args.at, args.fit_until, args.compare_until))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
