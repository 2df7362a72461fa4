"""List the selected checkpoint's weights (model.safetensors) of every run under a folder that finished after a marker
file was touched, up to a total size: what a GPU sitting brings back so that a later sitting can warm-start from them.

    python bench/finished_weights.py runs/kv_matrix /tmp/sitting_start --max_mb 15 > weights.list

A run finished when its all_results.json was written; its selected checkpoint is the one all_results.json names
(best_model_checkpoint, a path from where the run was started). Weights that would pass --max_mb are left out and
named on stderr.
"""
import argparse
import json
import sys
from pathlib import Path


def finished_weights(runs: Path, since: float, max_mb: float) -> tuple:
    """(weights to keep, weights left out by the size cap), of the runs whose all_results.json is newer than since."""
    kept, left_out, total = [], [], 0
    for results in sorted(runs.rglob("all_results.json")):
        if results.stat().st_mtime <= since:
            continue
        best = json.loads(results.read_text()).get("best_model_checkpoint")
        weights = Path(best or "", "model.safetensors")
        if not best or not weights.is_file():
            continue
        size = weights.stat().st_size
        if total + size > max_mb * 2**20:
            left_out.append(weights)
        else:
            total += size
            kept.append(weights)
    return kept, left_out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="folder of run folders")
    parser.add_argument("marker", type=Path, help="a file touched when the sitting started")
    parser.add_argument("--max_mb", type=float, default=15.0, help="total size of the weights listed")
    args = parser.parse_args(argv)
    if not args.marker.is_file():
        parser.error(f"{args.marker}: no such file; touch it before the runs start")
    kept, left_out = finished_weights(args.runs, args.marker.stat().st_mtime, args.max_mb)
    for weights in kept:
        print(weights)
    for weights in left_out:
        print(f"weights: {weights} left out (--max_mb {args.max_mb:g} reached)", file=sys.stderr)


if __name__ == "__main__":
    main()
