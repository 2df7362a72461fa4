"""bench/sittings/claims.sh: each part's selection reaches scripts/run_paper_claims.sh (a sweep can be split over
sittings, a part left out, N16 chained from N8), the committed metrics are copied in first, and the runs and the lr
choices are packed (DRY_RUN: plans only)."""
import json
import os
import subprocess
import tarfile
from pathlib import Path

import results_matrix as rm

REPO = Path(__file__).resolve().parents[1]


def run_sitting(tmp_path, *args, **env):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "RUNS_DIR": str(tmp_path / "runs"),
           "WORK": str(tmp_path / "work"), **env}
    done = subprocess.run(["bash", "bench/sittings/claims.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp_path / "out"


def planned_runs(log: Path) -> list:
    """(cell, seed) of every run in the plans a run_paper_claims.sh log prints."""
    rows = [line.split() for line in log.read_text().splitlines() if line.startswith("0/")]
    return sorted((row[3], row[4]) for row in rows)


def test_a_split_k5_sweep_on_seed_1_without_part_b(tmp_path):
    out = run_sitting(tmp_path, SERIAL="1", A_K="5", A_SEEDS="1", GRADMEM_ILRS_K5="0.3 2.0", RMT_LRS="1e-4 3e-4",
                      B_ONLY="")
    assert planned_runs(out / "a.log") == [("gradmem_K5_ilr0.3", "1"), ("gradmem_K5_ilr2.0", "1"),
                                           ("rmt_K5_lr1e-4", "1"), ("rmt_K5_lr3e-4", "1")]
    assert not (out / "b.log").exists()
    # the committed metrics were copied into RUNS_DIR first (so finished runs are skipped) and come back packed
    committed = {p.relative_to(REPO / "results" / "kv_matrix" / "runs").as_posix()
                 for p in (REPO / "results" / "kv_matrix" / "runs").rglob("all_results.json")}
    assert committed
    prefix = str(tmp_path / "runs").lstrip("/") + "/"  # tar drops the leading /
    with tarfile.open(out / "runs.tgz") as tar:
        packed = {name[len(prefix):] for name in tar.getnames() if name.endswith("all_results.json")}
    assert committed <= packed


def test_b_alone_runs_the_mamba_sweep_with_the_arguments_given(tmp_path):
    out = run_sitting(tmp_path, "--fast_step", "off", A_ONLY="", B_ONLY="mamba")
    assert not (out / "a.log").exists()
    assert planned_runs(out / "b.log") == [("mamba_lr1e-3", "1"), ("mamba_lr1e-4", "1"), ("mamba_lr3e-4", "1")]
    commands = [line for line in (out / "b.log").read_text().splitlines() if line.startswith("N8_mamba_")]
    assert len(commands) == 3 and all(line.rstrip().endswith("--fast_step off") for line in commands)


def test_ns_chains_n16_from_n8(tmp_path):
    out = run_sitting(tmp_path, NS="8 16", A_ONLY="gradmem", A_K="2", A_SEEDS="1", GRADMEM_ILRS_K2="0.04", B_ONLY="")
    rows = [line.split() for line in (out / "a.log").read_text().splitlines() if line.startswith("0/")]
    assert sorted((row[2], row[3]) for row in rows) == [("16", "gradmem_K2_ilr0.04"), ("8", "gradmem_K2_ilr0.04")]
    n16 = next(row for row in rows if row[2] == "16")
    assert " ".join(n16[6:]) == "best checkpoint of N8_gradmem_K2_ilr0.04_s1"  # the N8 run of its cell and seed


def test_the_lr_choices_come_back_as_one_record(tmp_path):
    """The committed lr_choice.json goes in first; part (b)'s choice is merged into it, so that lr_choice.tgz holds
    every sweep's choice (results/kv_matrix's file is replaced by it)."""
    committed = json.loads((REPO / "results" / "kv_matrix" / "lr_choice.json").read_text())
    mamba = {"sweep": "mamba", "family": "mamba", "K": None, "n": 8, "chosen": "3e-4", "problems": [],
             "lrs": [{"lr": "3e-4", "valid_exact_match_mean": 0.5, "runs": [{"seed": 143, "valid_exact_match": 0.5}]}]}
    rm.write_lr_choice([mamba], tmp_path / "work" / "results_b", ["1"], ["2", "3"])
    out = run_sitting(tmp_path, A_ONLY="", B_ONLY="mamba")
    with tarfile.open(out / "lr_choice.tgz") as tar:
        assert sorted(tar.getnames()) == ["lr_choice.json", "lr_choice.md"]
        choice = json.loads(tar.extractfile("lr_choice.json").read())
    assert [r for r in choice["sweeps"] if r["sweep"] != "mamba"] == committed["sweeps"]
    assert [r["chosen"] for r in choice["sweeps"] if r["sweep"] == "mamba"] == ["3e-4"]
