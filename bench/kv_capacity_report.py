"""Tables and curves of the KV capacity runs (scripts/run_kv_capacity.sh) from their run folders.

    python bench/kv_capacity_report.py results/kv_capacity        # writes summary.md and curves.png there

Per seed and stage: the steps and the wall time until the stage's valid exact match reached its threshold (wall time
from the start of the first stage, summed over sittings; datasets are built before the clock starts), the same less
every stage's final evaluations so far (the selected and final checkpoints on valid and test: measurement after a
stage, which another process could do; "-" for records without their timings), the selected
checkpoint's valid and test exact match (generated answers, test split never used for selection; over all sittings of
a stage: a later sitting that selected nothing better leaves an earlier one's selection), the final checkpoint's where
it differs, and the guards' interventions (steps skipped as gradient-norm spikes, rollbacks). Unfinished, budget-spent
and collapsed stages are listed as such. Continuations of a seed (another recipe started
from one of its checkpoints) live in seed_<s>_<variant>/ folders and are listed after it.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import save_png  # noqa: E402


COLLAPSE_RATIO = 0.5  # a final valid exact match below this x the selected one's: collapsed (the trainer's default)


def cli_args(stage_dir: Path) -> dict:
    """A stage's command-line arguments, from its record (run_config.json; older runs: config.json)."""
    for name in ("run_config.json", "config.json"):
        path = stage_dir / name
        record = json.loads(path.read_text()) if path.is_file() else {}
        if "cli_args" in record:
            return record["cli_args"]
    return {}


def stage_rows(seed_dir: Path) -> list:
    """One row per stage of a seed, from curriculum.json (wall time) and the stage's all_results.json."""
    record = json.loads((seed_dir / "curriculum.json").read_text())
    rows, elapsed, seen, best_sitting = [], 0.0, {}, {}
    test_s = 0.0  # the final evaluations so far (valid and test of the selected and final checkpoints); None: unknown
    for invocation in record["invocations"]:
        offset = elapsed
        for entry in invocation["stages"]:
            final = entry.get("final_evaluation_wall_s")
            test_s = None if test_s is None or final is None else test_s + final
            wall = offset + entry["end_s"]
            seen[entry["stage"]] = {**entry, "wall_s": wall, "threshold": entry["threshold"],
                                    "wall_s_without_tests": None if test_s is None else wall - test_s}
            elapsed = wall
            if entry.get("eval_exact_match", -1) > best_sitting.get(entry["stage"], {}).get("eval_exact_match", -1):
                best_sitting[entry["stage"]] = entry
    for name, entry in seen.items():
        results = json.loads((seed_dir / name / "all_results.json").read_text())
        history = json.loads((seed_dir / name / "trainer_state.json").read_text())["log_history"]
        args = cli_args(seed_dir / name)
        selected, final_test = results, results.get("final_test_generated_exact_match")
        earlier = best_sitting.get(name, {})
        if earlier.get("eval_exact_match", -1) > results["eval_exact_match"]:  # an earlier sitting's selection was
            selected = earlier  # better than any checkpoint since: the run's selection on valid, the newest is final
            final_test = final_test if final_test is not None else results.get("test_generated_exact_match")
        rows.append({"stage": name, "N": int(name[1:]), "threshold": entry["threshold"], "K": args.get("K"),
                     "inner_lr": args.get("inner_lr"), "eval_K": args.get("eval_K"),
                     "eval_inner_lr": args.get("eval_inner_lr"), "max_steps": args.get("max_steps"),
                     "max_rollbacks": args.get("max_rollbacks", 3),
                     "steps": results["global_step"], "wall_s": entry["wall_s"],
                     "wall_s_without_tests": entry["wall_s_without_tests"],
                     "valid": selected["eval_exact_match"], "test": selected.get("test_generated_exact_match"),
                     "final_test": final_test,
                     "final_valid": results.get("final_eval_exact_match", results["eval_exact_match"]),
                     "done": selected["eval_exact_match"] >= entry["threshold"],
                     "spikes": results.get("spike_skipped_steps", 0), "rollbacks": results.get("rollbacks", 0),
                     "curve": [(r["step"], r["eval_exact_match"]) for r in history
                               if "eval_exact_match" in r and "step" in r and "train_runtime" not in r]})
    return rows


def run_folders(root: Path) -> list:
    """The run folders of root (subfolders with a curriculum.json), grouped by seed (the record's --seed, else the
    seed_<s> in the name): seed_<s>/ first, then the seed's other runs (continuations seed_<s>_<variant>/, variants
    such as w100_seed_<s>/) in the order they were started."""
    def order(p: Path) -> tuple:
        first = json.loads((p / "curriculum.json").read_text())["invocations"][0]
        match = re.search(r"--seed[ =](\d+)", " ".join(first.get("argv", []))) or re.search(r"seed_(\d+)", p.name)
        seed = int(match.group(1)) if match else -1
        return seed, p.name != f"seed_{seed}", first.get("started", ""), p.name

    return sorted((p for p in root.iterdir() if (p / "curriculum.json").is_file()), key=order)


def write_settings(row: dict) -> str:
    """'K / inner lr' of training, then those of evaluation (selection, stopping, test) where a stage set them."""
    text = f"{row['K']} / {row['inner_lr']}"
    if row["eval_K"] is not None or row["eval_inner_lr"] is not None:
        K = row["K"] if row["eval_K"] is None else row["eval_K"]
        lr = row["inner_lr"] if row["eval_inner_lr"] is None else row["eval_inner_lr"]
        text += f" (evaluated {K} / {lr})"
    return text


def summary(root: Path) -> str:
    lines = ["| run | stage | K / inner lr (evaluation's where it differs) | reached threshold | steps | "
             "wall time from start | without the final evaluations | valid EM (selected) | "
             "test EM, generated (selected) | test EM, final checkpoint | spike-skipped steps | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed_dir in run_folders(root):
        for r in stage_rows(seed_dir):
            final = "" if r["final_test"] is None else f"{r['final_test']:.4f}"
            test = "- (warm-up stage: not evaluated)" if r["test"] is None else f"{r['test']:.4f}"
            outcome = ("yes" if r["done"] else
                       f"**no: collapsed {r['rollbacks']} times, stopped**" if r["rollbacks"] >= r["max_rollbacks"] else
                       f"**no: collapsed (final checkpoint: valid {r['final_valid']:.4f})**"
                       if r["final_valid"] < COLLAPSE_RATIO * r["valid"] else
                       f"**no: step budget ({r['max_steps']}) spent**" if r["steps"] >= (r["max_steps"] or 1e18) else
                       "**no (unfinished)**")
            without = "-" if r["wall_s_without_tests"] is None else f"{r['wall_s_without_tests']:.0f} s"
            lines.append(f"| {seed_dir.name} | N{r['N']} | {write_settings(r)} | {outcome} ({r['threshold']:g}) | "
                         f"{r['steps']} | {r['wall_s']:.0f} s | {without} | {r['valid']:.4f} | {test} | "
                         f"{final} | {r['spikes']} | {r['rollbacks']} |")
    return "\n".join(lines) + "\n"


def plot(root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = run_folders(root)
    columns = min(len(seeds), 4)
    rows = -(-len(seeds) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(seeds):]:
        ax.axis("off")
    for ax, seed_dir in zip(axes.flat, seeds):
        offset = 0
        for r in stage_rows(seed_dir):
            steps, values = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot([offset + s for s in steps], values, label=f"N{r['N']}")
            offset += r["steps"]
        ax.set_title(seed_dir.name, fontsize=9)
        ax.set_xlabel("total training steps")
        ax.set_ylabel("valid exact match")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder of run folders (seed_<s>/, seed_<s>_<variant>/, ...)")
    args = parser.parse_args(argv)
    if not args.root.is_dir() or not run_folders(args.root):
        parser.error(f"{args.root} holds no run folder (a folder with a curriculum.json, written by "
                     "run_gradmemgpt_kv_curriculum.py); pass the folder above the runs, e.g. results/kv_capacity")
    text = summary(args.root)
    (args.root / "summary.md").write_text(text)
    plot(args.root, args.root / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
