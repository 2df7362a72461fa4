"""Compare time-to-accuracy runs of bench/bench_learning.py: one table row and one curve per run.

    python bench/compare_learning.py --out_prefix bench/results/learning_n16_recipes_h100 \
        "lr 5e-4=bench/results/learning_n16_recipes/a.jsonl" "lr 5e-4, decay, beta2 0.95=.../d.jsonl" ...

Each argument is LABEL=PATH of a bench_learning .jsonl log (one record per evaluation; a run cut short is fine).
Per run: when the first stage ended (its last evaluation), when the last stage first reached --target (wall time from
the start of the run, and steps into that stage), the last stage's best exact match, the largest training loss
logged in the last stage (a divergence shows as a jump) and where the log ends. Writes PREFIX.md (the table) and
PREFIX.png (last-stage exact match against wall time); --notes_file adds text above the table.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import save_png  # noqa: E402


def load(path: str) -> list:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no records (expected one JSON object per line, as bench_learning writes)")
    return records


def summarize(records: list, target: float) -> dict:
    """The numbers of one run's table row (see the module docstring)."""
    last_stage = max(r["stage"] for r in records)
    first = [r for r in records if r["stage"] == 0]
    final = [r for r in records if r["stage"] == last_stage]
    hit = next((r for r in final if r["exact_match"] >= target), None)
    best = max(final, key=lambda r: r["exact_match"])
    return {"n_last": final[0]["N"], "first_end_s": first[-1]["wall_s"], "first_end_step": first[-1]["step"],
            "first_end_em": first[-1]["exact_match"],
            "target_s": hit["wall_s"] if hit else None, "target_step": hit["step"] if hit else None,
            "best_em": best["exact_match"], "best_s": best["wall_s"],
            "max_loss": max(r["loss"] for r in final), "end_s": records[-1]["wall_s"],
            "end_em": records[-1]["exact_match"], "skipped": records[-1].get("skipped_steps", 0)}


def markdown(rows: list, target: float, title: str, notes: str) -> str:
    n = rows[0][1]["n_last"]
    lines = [f"# {title}", ""] + ([notes.strip(), ""] if notes.strip() else []) + [f"| run | first stage ends (s, step, EM) | N{n} >= {target:g} at (s, N{n} steps) | best N{n} EM (at s) | "
             f"max N{n} train loss | log ends (s, EM) | skipped steps |", "|---|---|---|---|---|---|---|"]
    for label, s in rows:
        hit = f"**{s['target_s']:.0f} s** ({s['target_step']})" if s["target_s"] is not None else "not reached"
        lines.append(f"| {label} | {s['first_end_s']:.0f}, {s['first_end_step']}, {s['first_end_em']:.3f} | {hit} | "
                     f"{s['best_em']:.3f} ({s['best_s']:.0f}) | {s['max_loss']:.2f} | {s['end_s']:.0f}, "
                     f"{s['end_em']:.3f} | {s['skipped']} |")
    return "\n".join(lines) + "\n"


def plot(runs: list, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, records in runs:
        last_stage = max(r["stage"] for r in records)
        points = [(r["wall_s"], r["exact_match"]) for r in records if r["stage"] == last_stage]
        ax.plot(*zip(*points), linewidth=1, label=label)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("wall time from the start of the run (s)")
    ax.set_ylabel("last-stage eval exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=PATH of a bench_learning .jsonl")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--out_prefix", required=True, help="writes PREFIX.md and PREFIX.png")
    parser.add_argument("--title", default="GradMem KV time to accuracy")
    parser.add_argument("--notes_file", default=None, help="markdown put between the title and the table")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            parser.error(f"{item!r}: give each run as LABEL=PATH")
        runs.append((label, load(path)))
    notes = Path(args.notes_file).read_text() if args.notes_file else ""
    text = markdown([(label, summarize(records, args.target)) for label, records in runs], args.target, args.title,
                    notes)
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(text)
    plot(runs, args.target, prefix.with_suffix(".png"), args.title)
    print(text)


if __name__ == "__main__":
    main()
