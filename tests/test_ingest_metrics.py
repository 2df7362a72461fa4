"""bench/ingest_metrics.py: a sitting's records land in the named results folder with the log appended once; another
branch's folder, a log ingested before or a run folder the archive lacks is refused with nothing written."""
import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ingest_metrics  # noqa: E402

RUN = "runs/kv_capacity/seed_1"


def state(losses: dict) -> str:
    return json.dumps({"log_history": [{"step": s, "loss": v} for s, v in losses.items()] + [{"step": 0}]})


def sitting(path: Path, losses: dict, log: str, run: str = RUN) -> Path:
    """A metrics.tgz as capacity_sitting.sh packs it (records, a learning curve, the session's log)."""
    files = {f"{run}/curriculum.json": json.dumps({"invocations": [{"stages": [{"stage": "N96"}]}]}),
             f"{run}/N96/trainer_state.json": state(losses), f"{run}/N96/learning_curve.png": "png",
             f"{run}/sittings.log": log}
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def log_of(folder: Path) -> str:
    return gzip.decompress((folder / "sittings.log.gz").read_bytes()).decode()


def test_records_land_and_the_session_log_is_appended_once(tmp_path):
    results = tmp_path / "results" / "seed_1_retry"
    written = ingest_metrics.main([str(sitting(tmp_path / "a.tgz", {100: 1.0}, "command 1\n")), RUN, str(results)])
    assert sorted(p.relative_to(results).as_posix() for p in written) == [
        "N96/learning_curve.png", "N96/trainer_state.json", "curriculum.json", "sittings.log.gz"]
    assert log_of(results) == "command 1\n"
    # the session's later command: its log holds command 1's too, and only what it gained is appended
    later = sitting(tmp_path / "b.tgz", {100: 1.0, 200: 0.9}, "command 1\ncommand 2\n")
    ingest_metrics.main([str(later), RUN, str(results)])
    assert log_of(results) == "command 1\ncommand 2\n"
    assert json.loads((results / "N96" / "trainer_state.json").read_text())["log_history"][1]["loss"] == 0.9
    # a later session (a fresh machine: a new log) appends all of it as one more member
    ingest_metrics.main([str(sitting(tmp_path / "c.tgz", {100: 1.0, 200: 0.9, 300: 0.8}, "command 3\n")), RUN,
                         str(results)])
    assert log_of(results) == "command 1\ncommand 2\ncommand 3\n"
    assert len(ingest_metrics.log_members(results)) == 3


def test_a_log_ingested_before_is_refused_with_nothing_written(tmp_path):
    results = tmp_path / "retry"
    archive = sitting(tmp_path / "a.tgz", {100: 1.0}, "command 1\n")
    ingest_metrics.main([str(archive), RUN, str(results)])
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds this sitting's log"):
        ingest_metrics.main([str(archive), RUN, str(results)])
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before


def test_another_branchs_folder_is_refused_with_nothing_written(tmp_path):
    """Two branches from the same step: the records of one are not a past of the other."""
    diverged = tmp_path / "seed_1"
    ingest_metrics.main([str(sitting(tmp_path / "a.tgz", {100: 1.0, 200: 5.0}, "diverged\n")), RUN, str(diverged)])
    before = {p: p.read_bytes() for p in diverged.rglob("*") if p.is_file()}
    retry = sitting(tmp_path / "b.tgz", {100: 1.0, 200: 0.9, 300: 0.8}, "retry\n")
    with pytest.raises(ValueError, match="not a past of the archive's run: 1 logged steps differ .* from step 200"):
        ingest_metrics.main([str(retry), RUN, str(diverged)])
    assert {p: p.read_bytes() for p in diverged.rglob("*") if p.is_file()} == before


def test_a_run_folder_the_archive_lacks_is_refused_naming_what_it_holds(tmp_path):
    archive = sitting(tmp_path / "a.tgz", {100: 1.0}, "log\n", run="runs/kv_capacity/seed_1_n96")
    with pytest.raises(ValueError, match="nothing under runs/kv_capacity/seed_1; its folders: .*seed_1_n96"):
        ingest_metrics.main([str(archive), RUN, str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no such archive"):
        ingest_metrics.main([str(tmp_path / "missing.tgz"), RUN, str(tmp_path / "out")])
