"""Bring a capacity sitting's records (`metrics.tgz` of bench/capacity_sitting.sh) into a results folder.

A sitting packs, for every run folder it trained, `curriculum.json`, each stage's records (`N<n>/*.json`, the learning
curve) and the console output `sittings.log`, which holds every command of the session on that machine. This copies the
records of one run folder into a results folder and appends the log to its `sittings.log.gz` (one more gzip member;
after a command of the same session was ingested, only what the log gained since), so that a branch's records never land
in another branch's folder by hand. Everything is checked before anything is written: a run folder the archive does not
hold, a results folder whose records the incoming run did not go on from (another branch: a training loss it logged
differs or is missing), or a log already ingested is an error.

    python bench/ingest_metrics.py metrics.tgz runs/kv_capacity/seed_1_n96_ilr30 \
        results/kv_capacity/seed_1_n96_ilr30_retry
"""
import argparse
import gzip
import json
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath


def run_members(archive: tarfile.TarFile, run_dir: str) -> dict:
    """The archive's files under run_dir, keyed by their path relative to it (checkpoints are never in it)."""
    root = PurePosixPath(run_dir)
    members = {}
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if member.isfile() and root in path.parents:
            relative = path.relative_to(root)
            if not any(part.startswith("checkpoint-") for part in relative.parts):
                members[str(relative)] = member
    return members


def log_members(results_dir: Path) -> list:
    """The texts of the gzip members of results_dir/sittings.log.gz, one per ingest, oldest first."""
    log = results_dir / "sittings.log.gz"
    data, members = (log.read_bytes() if log.is_file() else b""), []
    while data:
        stream = zlib.decompressobj(wbits=31)
        members.append(stream.decompress(data).decode())
        data = stream.unused_data
    return members


def training_losses(state: dict) -> dict:
    """{step: training loss} of a trainer_state.json: what a run that went on from these records still holds."""
    return {r["step"]: r["loss"] for r in state.get("log_history", []) if "loss" in r and "step" in r}


def check_continues(results_dir: Path, files: dict, archive: tarfile.TarFile) -> None:
    """Each stage already recorded in results_dir must be a past of the incoming one: every training loss it logged
    is in the incoming history at the same step. A branch that went other steps from the same start is refused."""
    for name, member in files.items():
        if not name.endswith("trainer_state.json") or not (results_dir / name).is_file():
            continue
        present = training_losses(json.loads((results_dir / name).read_text()))
        incoming = training_losses(json.load(archive.extractfile(member)))
        differ = sorted(step for step, loss in present.items() if incoming.get(step) != loss)
        if differ:
            raise ValueError(f"{results_dir / name} is not a past of the archive's run: {len(differ)} logged steps "
                             f"differ or are missing, from step {differ[0]} (another branch?); name the folder of "
                             "the run it went on from, or a new folder")


def ingest(tgz: Path, run_dir: str, results_dir: Path) -> list:
    """Copy run_dir's records from tgz into results_dir and append its log; returns the paths written."""
    if not tgz.is_file():
        raise FileNotFoundError(f"{tgz}: no such archive (the sitting's $OUT/metrics.tgz)")
    with tarfile.open(tgz) as archive:
        files = run_members(archive, run_dir.rstrip("/"))
        if not files:
            held = sorted({str(PurePosixPath(m.name).parent) for m in archive.getmembers() if m.isfile()})
            raise ValueError(f"{tgz} holds nothing under {run_dir}; its folders: {', '.join(held) or 'none'}")
        check_continues(results_dir, files, archive)
        log = files.pop("sittings.log", None)
        log_text = archive.extractfile(log).read().decode() if log else ""
        members = log_members(results_dir)
        if log_text and log_text in "".join(members):
            raise ValueError(f"{results_dir / 'sittings.log.gz'} already holds this sitting's log: it was ingested "
                             "before")
        if members and log_text.startswith(members[-1]):  # a later command of the session ingested last time
            log_text = log_text[len(members[-1]):]
        results_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, member in sorted(files.items()):
            target = results_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            written.append(target)
    if log_text:
        with open(results_dir / "sittings.log.gz", "ab") as out:
            out.write(gzip.compress(log_text.encode(), compresslevel=9))
        written.append(results_dir / "sittings.log.gz")
    return written


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="the sitting's metrics.tgz")
    parser.add_argument("run_dir", help="the run folder as the sitting named it (e.g. runs/kv_capacity/seed_1)")
    parser.add_argument("results_dir", type=Path, help="the results folder its records go into (created if new)")
    args = parser.parse_args(argv)
    written = ingest(args.metrics, args.run_dir, args.results_dir)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"ingest_metrics: {error}")
