"""Markdown table of short runs: python bench/summarize_runs.py FOLDER (reads <name>.trainer_state.json /
<name>.all_results.json written by bench/gpu_acceptance.sh)."""
import json
import sys
from pathlib import Path

KEYS = ("eval_exact_match", "eval_token_accuracy", "eval_squad_f1", "eval_read_bits_per_token")


def summarize(folder: Path) -> str:
    lines = ["| run | steps | steps/s | train loss first → last logged | eval loss first → best | "
             + " | ".join(k.removeprefix("eval_") for k in KEYS) + " |",
             "|---|---|---|---|---|" + "---|" * len(KEYS)]
    for state_file in sorted(folder.glob("*.trainer_state.json")):
        name = state_file.name.removesuffix(".trainer_state.json")
        history = json.loads(state_file.read_text())["log_history"]
        results_file = folder / f"{name}.all_results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        train = [r["loss"] for r in history if "loss" in r]
        evals = [r["eval_loss"] for r in history if "eval_loss" in r]
        runtime = next((r for r in history if "train_runtime" in r), {})
        step = max((r.get("step", 0) for r in history), default=0)
        speed = runtime.get("train_steps_per_second", float("nan"))
        metrics = " | ".join(f"{results[k]:.3f}" if k in results else "–" for k in KEYS)
        train_s = f"{train[0]:.3f} → {train[-1]:.3f}" if train else "–"
        eval_s = f"{evals[0]:.3f} → {min(evals):.3f}" if evals else "–"
        lines.append(f"| {name} | {step} | {speed:.2f} | {train_s} | {eval_s} | {metrics} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
