"""Tables and curves of the KV capacity runs (scripts/run_kv_capacity.sh) from their run folders.

    python bench/kv_capacity_report.py results/kv_capacity        # writes summary.md and curves.png there

Per seed and stage: the steps and the wall time until the stage's valid exact match reached its threshold (wall time
from the start of the first stage, summed over sittings; datasets are built before the clock starts), the selected
checkpoint's valid and test exact match (generated answers, test split never used for selection), the final
checkpoint's where it differs, and the guards' interventions (steps skipped as gradient-norm spikes, rollbacks).
Unfinished stages are listed as such.
"""
import argparse
import json
from pathlib import Path


def stage_rows(seed_dir: Path) -> list:
    """One row per stage of a seed, from curriculum.json (wall time) and the stage's all_results.json."""
    record = json.loads((seed_dir / "curriculum.json").read_text())
    rows, elapsed, seen = [], 0.0, {}
    for invocation in record["invocations"]:
        offset = elapsed
        for entry in invocation["stages"]:
            seen[entry["stage"]] = {**entry, "wall_s": offset + entry["end_s"], "threshold": entry["threshold"]}
            elapsed = offset + entry["end_s"]
    for name, entry in seen.items():
        results = json.loads((seed_dir / name / "all_results.json").read_text())
        history = json.loads((seed_dir / name / "trainer_state.json").read_text())["log_history"]
        rows.append({"stage": name, "N": int(name[1:]), "threshold": entry["threshold"],
                     "steps": results["global_step"], "wall_s": entry["wall_s"],
                     "valid": results["eval_exact_match"], "test": results.get("test_generated_exact_match"),
                     "final_test": results.get("final_test_generated_exact_match"),
                     "done": results["eval_exact_match"] >= entry["threshold"],
                     "spikes": results.get("spike_skipped_steps", 0), "rollbacks": results.get("rollbacks", 0),
                     "curve": [(r["step"], r["eval_exact_match"]) for r in history
                               if "eval_exact_match" in r and "step" in r and "train_runtime" not in r]})
    return rows


def summary(root: Path) -> str:
    seeds = sorted(p for p in root.glob("seed_*") if (p / "curriculum.json").is_file())
    lines = ["| seed | stage | reached threshold | steps | wall time from start | valid EM (selected) | "
             "test EM, generated (selected) | test EM, final checkpoint | spike-skipped steps | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seed_dir in seeds:
        for r in stage_rows(seed_dir):
            final = "" if r["final_test"] is None else f"{r['final_test']:.4f}"
            lines.append(f"| {seed_dir.name[5:]} | N{r['N']} | {'yes' if r['done'] else '**no (unfinished)**'} "
                         f"({r['threshold']:g}) | {r['steps']} | {r['wall_s']:.0f} s | {r['valid']:.4f} | "
                         f"{r['test']:.4f} | {final} | {r['spikes']} | {r['rollbacks']} |")
    return "\n".join(lines) + "\n"


def plot(root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(p for p in root.glob("seed_*") if (p / "curriculum.json").is_file())
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.5 * len(seeds), 3.6), squeeze=False)
    for ax, seed_dir in zip(axes[0], seeds):
        offset = 0
        for r in stage_rows(seed_dir):
            steps, values = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot([offset + s for s in steps], values, label=f"N{r['N']}")
            offset += r["steps"]
        ax.set_title(f"seed {seed_dir.name[5:]}", fontsize=9)
        ax.set_xlabel("total training steps")
        ax.set_ylabel("valid exact match")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder of seed_<s>/ run folders")
    args = parser.parse_args(argv)
    text = summary(args.root)
    (args.root / "summary.md").write_text(text)
    plot(args.root, args.root / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
