"""scripts/run_paper_claims.sh, the comparison matrix: the DRY_RUN plan (cells, seeds, equal steps per N for every
family but the full-context upper bound, warm-start chains, lr sweeps, GPU balance), its commands read by the run
scripts' own parsers (the recipe of each family, the cell in the saved arguments), the selection of one cell, bad
settings rejected before any work with the variable and the fix named, the two phases of SWEEP_SEEDS (the sweep on its
seeds, the lr chosen on valid, never on test, and the other seeds' plan, the lr-choice file; phase-1 results faked on
disk, runs stood in for), one tiny cell per family trained in this process from the plan's command, and one tiny real
execution of the script (warm start, a failed run and its skipped dependant, results, a skip on re-run, a warm start
whose checkpoint is not on the machine)."""
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import collect_results as cr
import kv_dataset_utils
import results_matrix as rm
import run_gpt2_on_kv_retrieval
import run_gradmemgpt_on_kv_retrieval
import run_metrics
import run_rmt_on_kv_retrieval
from full_context_lm import FullContextArgs
from grad_memgpt import PRESETS, GradMemArgs
from rmt import RMTArgs
from training_args import BackboneArgs, DataArgs, TrainArgs, parse_cli
from training_run_folder import resolve_run_dir
from training_runs import family_of_arguments, flat_args, full_context_run_name, gradmem_run_name, rmt_run_name

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_paper_claims.sh"
SCRIPT_SETTINGS = (
    "GPUS", "ONLY", "K", "LRS", "NS", "SEEDS", "STEPS_N4", "STEPS_N8", "STEPS_N16", "STEPS_N32", "INIT_WARMUP",
    "GRADMEM_LR_K1", "GRADMEM_LR_K2", "GRADMEM_LR_K5", "GRADMEM_LR_K3", "GRADMEM_WARMUP", "GRADMEM_BETA2",
    "GRADMEM_ILRS_K1", "GRADMEM_ILRS_K2", "GRADMEM_ILRS_K5", "GRADMEM_ILRS_K3", "RMT_LRS", "RMT_WARMUP", "RMT_BETA2",
    "RMT_REC_WEIGHT", "LLAMA_LRS", "LLAMA_WARMUP", "LLAMA_BETA2", "LLAMA_STEPS_FACTOR", "LLAMA_PATIENCE", "MAMBA_LRS",
    "MAMBA_WARMUP", "MAMBA_BETA2", "EVAL_STEPS", "MAX_EVAL_SAMPLES", "PRECISION", "DATA_DIR", "DATA_SIZE", "N_VALID",
    "N_TEST", "RUNS_DIR", "RESULTS_DIR", "PYTHON", "DRY_RUN", "SWEEP_SEEDS", "WORKERS_PER_GPU",
    "BUDGET_N4", "BUDGET_N8", "BUDGET_N16", "BUDGET_N32", "SEEDS_ABLATION", "MAX_STEPS",
    "GRADMEM_LR")  # the last line: refused
PLAN_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(.+)$")
PARSING = {"run_gradmemgpt_on_kv_retrieval.py": (GradMemArgs, gradmem_run_name, PRESETS),
           "run_rmt_on_kv_retrieval.py": (RMTArgs, rmt_run_name, None),
           "run_gpt2_on_kv_retrieval.py": (FullContextArgs, full_context_run_name, None)}
STEPS = {4: 5000, 8: 10000, 16: 20000, 32: 40000}
LLAMA_STEPS_FACTOR, LLAMA_PATIENCE = 3, 5  # the full-context upper bound: trained until valid stops improving
SWEEPS = {("gradmem", 1): "0.04 0.08 0.16 0.32 0.8", ("gradmem", 2): "0.02 0.04 0.08",
          ("gradmem", 5): "0.04 0.08 0.3 2.0", **{("rmt", k): "1e-4 3e-4 1e-3" for k in (1, 2, 5)},
          ("llama", None): "5e-5 3e-4 1e-3", ("mamba", None): "1e-4 3e-4 1e-3"}
GRADMEM_OUTER_LR = {1: 1e-3, 2: 1e-3, 5: 1e-4}  # K=5: at 1e-3 every inner lr diverged
# the default cells as the plan names them: family[_K<k>]_{ilr,lr}<lr as written>
CELLS = {f"{family}{'' if k is None else f'_K{k}'}_{'ilr' if family == 'gradmem' else 'lr'}{lr}"
         for (family, k), lrs in SWEEPS.items() for lr in lrs.split()}


def planned_steps(cell: str, n: int) -> int:
    """--max_steps of a run of this cell at N: the step budget, LLAMA_STEPS_FACTOR times it for the upper bound."""
    return STEPS[n] * (LLAMA_STEPS_FACTOR if cell.startswith("llama") else 1)


def run_script(*args, check=True, **env):
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    done = subprocess.run(["bash", str(SCRIPT), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def parse_plan(stdout):
    """rows: dicts (gpu, order, n, cell, seed, steps, init); loads: {gpu: cost}; commands: {run id: argv}."""
    rows, loads, commands = [], {}, {}
    lines = stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("gpu   order")))
    for line in lines[start + 1:]:
        m = PLAN_ROW.match(line)
        if m and not line.startswith("gpu "):
            gpu, order, n, cell, seed, steps, init = m.groups()
            rows.append(dict(gpu=gpu, order=int(order), n=int(n), cell=cell, seed=int(seed), steps=int(steps),
                             init=None if init == "-" else init.removeprefix("best checkpoint of ")))
        elif m := re.match(r"^gpu (\S+): cost (\d+) ", line):
            loads[m[1]] = int(m[2])
        elif m := re.match(r"^(N\d+_\S+_s\d+): \S+ (.*)$", line):
            commands[m[1]] = shlex.split(m[2])
    return rows, loads, commands


def run_id(row):
    return f"N{row['n']}_{row['cell']}_s{row['seed']}"


def parse_command(argv):
    """The command read by its run script's own parser: (TrainArgs, BackboneArgs, model args, DataArgs), the run
    folder it names and the arguments it saves."""
    model_type, name, presets = PARSING[argv[0]]
    train, backbone, model, data = parse_cli(TrainArgs, BackboneArgs, model_type, DataArgs, args=argv[1:],
                                             presets=presets)
    train.run_name = name(train, backbone, model, 1)
    folder = resolve_run_dir(train, Path(data.data_path).name)
    return (train, backbone, model, data), folder, flat_args([train, backbone, model, data])


def cell_of_saved_arguments(saved, task):
    """(family, K, swept lr) as collect_results reads it from a run's saved arguments."""
    run = run_metrics.Run(task=task, run_name="any", seed=saved["seed"], path=Path("."), metrics={}, log_history=[],
                 args=saved)
    m = rm.matrix_run(run)
    return m.family, m.K, m.lr


# -------------------------------------------------------------------------------------------------------- the plan

def test_dry_run_plan_cells_seeds_equal_steps_and_chains(tmp_path):
    out = run_script(DRY_RUN="1", GPUS="1 2 3", DATA_DIR=str(tmp_path / "data")).stdout
    rows, loads, commands = parse_plan(out)
    assert len(CELLS) == 27
    assert sorted((r["cell"], r["n"], r["seed"]) for r in rows) == sorted(
        (c, n, s) for c in CELLS for n in (4, 8, 16, 32) for s in (1, 2, 3))
    assert set(commands) == {run_id(r) for r in rows} and len(rows) == 324
    for n in (4, 8, 16, 32):  # missing datasets are announced, nothing is built
        assert f"would build {tmp_path}/data/N{n}-K2V2-V62_1M" in out
    assert not (tmp_path / "data").exists()

    by_id = {run_id(r): r for r in rows}
    for r in rows:
        assert r["steps"] == planned_steps(r["cell"], r["n"])  # one budget per N; the upper bound's is larger
        if r["n"] in (16, 32):  # warm start from the same cell and seed at the N before, just before it on its GPU
            parent = by_id[r["init"]]
            assert (parent["n"], parent["cell"], parent["seed"]) == (r["n"] // 2, r["cell"], r["seed"])
            assert parent["gpu"] == r["gpu"] and parent["order"] == r["order"] - 1
        else:
            assert r["init"] is None
    for gpu in ("1", "2", "3"):  # each GPU's runs are numbered 1, 2, ... in order
        orders = sorted(r["order"] for r in rows if r["gpu"] == gpu)
        assert orders == list(range(1, len(orders) + 1))
    # balanced by cost = steps x (2K+1) gradmem, x (K+1) rmt, x 1 full context: no GPU more than one chain above another
    assert max(loads.values()) - min(loads.values()) <= 70000 * 11
    assert f"total cost: {sum(loads.values())} " in out


def test_several_workers_per_gpu_share_the_jobs_and_keep_chains_together(tmp_path):
    out = run_script(DRY_RUN="1", GPUS="1 2", WORKERS_PER_GPU="2", NS="8 16", SEEDS="1",
                     DATA_DIR=str(tmp_path / "data")).stdout
    rows, loads, _ = parse_plan(out)
    assert "on 2 GPU(s) x 2 worker(s)" in out
    assert set(loads) == {"1/1", "1/2", "2/1", "2/2"} and {r["gpu"] for r in rows} == set(loads)
    by_id = {run_id(r): r for r in rows}
    for r in rows:
        if r["n"] == 16:  # the warm start ran just before, on the same worker
            assert by_id[r["init"]]["gpu"] == r["gpu"] and by_id[r["init"]]["order"] == r["order"] - 1
    assert max(loads.values()) - min(loads.values()) <= 30000 * 11


def test_dry_run_commands_recipes_and_saved_cells():
    out = run_script(DRY_RUN="1", PRECISION="tf32", RUNS_DIR="runs/x", SEEDS="1 2").stdout
    rows, _, commands = parse_plan(out)
    assert len(rows) == len(CELLS) * 4 * 2  # every cell at every N on both seeds
    folders, sweeps = {}, {}
    for r in rows:
        argv = commands[run_id(r)]
        (train, backbone, model, data), folder, saved = parse_command(argv)
        family = r["cell"].split("_")[0]
        # shared by every family
        assert (train.per_device_batch_size, train.max_grad_norm, train.max_steps) == (
            64, 1.0, planned_steps(r["cell"], r["n"]))
        assert (train.eval_steps, train.logging_steps, train.max_eval_samples) == (500, 500, 1000)
        assert (train.metric_for_best_model, train.early_stopping_patience) == (
            "exact_match", LLAMA_PATIENCE if family == "llama" else 0)  # the upper bound stops when valid does not rise
        assert train.stop_metric_value is None and train.max_train_minutes is None  # steps only, no wall clock
        assert train.lr_scheduler_type == "constant_with_warmup" and train.seed == 142 + r["seed"]
        assert train.fp32 and train.tf32 and train.collapse_ratio == 0.5 and train.spike_factor == 10.0
        assert (backbone.n_layer, backbone.n_embd, backbone.base_model) == (
            4, 128, "mamba" if family == "mamba" else "llama")
        assert data.data_path == f"./data/N{r['n']}-K2V2-V62_1M"
        assert (train.init_checkpoint is not None) == (r["n"] >= 16)
        warmups = {"gradmem": 300, "rmt": 2000, "llama": 2000, "mamba": 2000}
        assert train.warmup_steps == (100 if r["n"] >= 16 else warmups[family])  # INIT_WARMUP for every family
        # each family's recipe
        if family == "gradmem":
            assert (train.learning_rate, train.adam_beta2) == (GRADMEM_OUTER_LR[model.K], 0.999)
            assert (model.n_mem_tokens, model.grad_mode, model.use_write_head, model.inner_loss_weight) == (
                8, "second", True, 0.5)
            assert backbone.n_head == 4 and model.attn_implementation == "auto"
        elif family == "rmt":
            assert (model.n_mem_tokens, model.mem_proj_mode, model.use_mem_proj, model.n_ctrl_tokens) == (
                8, "proj", True, 0)
            assert model.use_reconstruction_loss and model.reconstruction_loss_weight == 0.5 and model.use_write_head
            assert train.adam_beta2 == 0.999 and model.attn_implementation == "sdpa"
        elif family == "llama":
            assert (train.adam_beta2, backbone.max_position_embeddings, backbone.n_head) == (0.98, 1024, 4)
        else:
            assert train.adam_beta2 == 0.999 and backbone.max_position_embeddings is None
        # the saved arguments identify the cell, as collect_results reads them
        family_saved, k, lr = cell_of_saved_arguments(saved, folder.parent.parent.name)
        assert family_of_arguments(saved) == family_saved == family
        assert f"_K{k}_" in f"{r['cell']}_" if k is not None else "_K" not in r["cell"]
        sweeps.setdefault((family, k), set()).add(lr)
        assert str(folder).startswith(f"runs/x/N{r['n']}-K2V2-V62_1M/") and folder.name == f"run_{142 + r['seed']}"
        assert folder not in folders, f"{run_id(r)} and {folders.get(folder)} share {folder}"
        folders[folder] = run_id(r)
    assert sweeps == {key: {float(lr) for lr in lrs.split()} for key, lrs in SWEEPS.items()}


def test_the_upper_bounds_budget_is_set_apart_from_the_others():
    out = run_script(DRY_RUN="1", ONLY="llama rmt", K="1", LRS="1e-4", NS="8", SEEDS="1", LLAMA_STEPS_FACTOR="1",
                     LLAMA_PATIENCE="0").stdout
    rows, _, commands = parse_plan(out)
    for r in rows:  # LLAMA_STEPS_FACTOR=1 LLAMA_PATIENCE=0: the same budget as every family
        (train, _, _, _), _, _ = parse_command(commands[run_id(r)])
        assert (r["steps"], train.max_steps, train.early_stopping_patience) == (10000, 10000, 0)
    out = run_script(DRY_RUN="1", ONLY="llama", LRS="5e-5", NS="8", SEEDS="1", LLAMA_STEPS_FACTOR="2",
                     LLAMA_PATIENCE="7").stdout
    (row,), _, commands = parse_plan(out)
    (train, _, _, _), _, _ = parse_command(commands[run_id(row)])
    assert (row["steps"], train.max_steps, train.early_stopping_patience) == (20000, 20000, 7)
    assert "llama: up to x2, early stop after 7 evaluations without a better valid exact match" in out


def test_selection_of_cells():
    rows, _, commands = parse_plan(run_script(DRY_RUN="1", ONLY="rmt", K="2", LRS="3e-4", NS="8", SEEDS="1").stdout)
    assert [run_id(r) for r in rows] == ["N8_rmt_K2_lr3e-4_s1"]
    (train, _, model, _), _, _ = parse_command(commands["N8_rmt_K2_lr3e-4_s1"])
    assert (model.K, train.learning_rate, train.max_steps) == (2, 3e-4, 10000)

    rows, _, _ = parse_plan(run_script(DRY_RUN="1", ONLY="mamba llama", NS="8 16", SEEDS="2", STEPS_N8="7",
                                       LLAMA_LRS="1e-4 5e-5", MAMBA_LRS="3e-4").stdout)
    assert sorted(run_id(r) for r in rows) == sorted(f"N{n}_{c}_s2" for n in (8, 16) for c in (
        "llama_lr1e-4", "llama_lr5e-5", "mamba_lr3e-4"))
    assert {(r["cell"][:5], r["steps"]) for r in rows if r["n"] == 8} == {
        ("mamba", 7), ("llama", 7 * LLAMA_STEPS_FACTOR)}

    rows, _, commands = parse_plan(run_script(DRY_RUN="1", ONLY="gradmem", K="3", GRADMEM_ILRS_K3="0.05", NS="4",
                                              SEEDS="1", GRADMEM_LR_K3="5e-4").stdout)
    assert [run_id(r) for r in rows] == ["N4_gradmem_K3_ilr0.05_s1"]
    (train, _, model, _), _, _ = parse_command(commands["N4_gradmem_K3_ilr0.05_s1"])
    assert (model.K, model.inner_lr, train.learning_rate) == (3, 0.05, 5e-4)


@pytest.mark.parametrize("env, message", [
    (dict(NS="4 16"), "N16 runs warm-start from the N8 runs of their cell; add 8"),
    (dict(NS="8 32"), "N32 runs warm-start from the N16 runs of their cell; add 16"),
    (dict(NS="4 12"), "N=12 is not one of 4 8 16 32"),
    (dict(NS="8 8"), 'NS="8 8" names 8 twice'),
    (dict(ONLY="gradmem transformer"), "'transformer' is not one of gradmem rmt llama mamba"),
    (dict(ONLY=" "), "ONLY is empty"),
    (dict(K="0"), "'0' is not a positive integer"),
    (dict(K="2 2"), 'K="2 2" names 2 twice'),
    (dict(ONLY="gradmem", K="3"), 'GRADMEM_ILRS_K3 is not set: GradMem K=3 needs its inner-lr sweep, e.g. '
                                  'GRADMEM_ILRS_K3="0.02 0.04 0.08"'),
    (dict(ONLY="gradmem", K="3", GRADMEM_ILRS_K3="0.05"), "GRADMEM_LR_K3= must be a positive number: GradMem K=3 needs "
                                                          "its outer (AdamW) lr, e.g. GRADMEM_LR_K3=1e-3"),
    (dict(GRADMEM_LR_K5="fast"), "GRADMEM_LR_K5=fast must be a positive number"),
    (dict(LRS="fast"), "LRS=\"fast\": 'fast' is not a positive number"),
    (dict(ONLY="rmt", RMT_LRS=" "), 'RMT_LRS is empty; list the learning rates of rmt to sweep'),
    (dict(GRADMEM_ILRS_K2="0.04 -1"), "'-1' is not a positive number"),
    (dict(STEPS_N8="0"), "STEPS_N8=0 must be a positive integer"),
    (dict(STEPS_N16="2e4"), "STEPS_N16=2e4 must be a positive integer"),
    (dict(INIT_WARMUP="-1"), "INIT_WARMUP=-1 must be a number of steps"),
    (dict(LLAMA_STEPS_FACTOR="1.5"), "LLAMA_STEPS_FACTOR=1.5 must be a positive integer"),
    (dict(LLAMA_PATIENCE="-1"), "LLAMA_PATIENCE=-1 must be a number of evaluations (an integer >= 0; 0: no early "
                                "stop)"),
    (dict(LLAMA_BETA2="1"), "LLAMA_BETA2=1 must be an AdamW beta2 in [0, 1)"),
    (dict(RMT_REC_WEIGHT="0"), "RMT_REC_WEIGHT=0 must be a positive number"),
    (dict(SEEDS="1 x"), "'x' is not a number"),
    (dict(GPUS="0,1"), "is not a GPU index"),
    (dict(GPUS="1 1"), "names a GPU twice"),
    (dict(WORKERS_PER_GPU="0"), "WORKERS_PER_GPU=0 must be a positive integer"),
    (dict(PRECISION="fp16"), "PRECISION must be fp32, tf32 or bf16"),
    (dict(DATA_SIZE="1G"), "DATA_SIZE=1G"),
    (dict(BUDGET_N8="2"), "BUDGET_N8 is no longer read: every run has a step budget, the same for every family; set "
                          "STEPS_N8 (optimizer steps) and unset BUDGET_N8"),
    (dict(SEEDS_ABLATION="1"), "SEEDS_ABLATION is no longer read"),
    (dict(MAX_STEPS="100"), "MAX_STEPS is no longer read: set STEPS_N4 ... STEPS_N32"),
    (dict(GRADMEM_LR="1e-4"), "GRADMEM_LR is no longer read: each K has its own outer lr, GRADMEM_LR_K<k>"),
    (dict(SWEEP_SEEDS="4"), 'SWEEP_SEEDS="4": seed 4 is not in SEEDS="1 2 3"; name seeds of SEEDS (the sweep runs on '
                            'them, the chosen lr on the others), e.g. SWEEP_SEEDS=1'),
    (dict(SEEDS="2 3", SWEEP_SEEDS="1"), 'seed 1 is not in SEEDS="2 3"'),
    (dict(SWEEP_SEEDS=" "), "SWEEP_SEEDS is empty; name the seeds of SEEDS that run every lr of a sweep, e.g. "
                            "SWEEP_SEEDS=1 (or unset SWEEP_SEEDS: every lr on every seed)"),
    (dict(SWEEP_SEEDS=""), "SWEEP_SEEDS is empty"),
    (dict(SWEEP_SEEDS="1,2"), "SWEEP_SEEDS=\"1,2\": '1,2' is not a number; name seeds of SEEDS=\"1 2 3\""),
    (dict(SWEEP_SEEDS="one"), "'one' is not a number"),
    (dict(SWEEP_SEEDS="1 1"), 'SWEEP_SEEDS="1 1" names 1 twice'),
])
def test_bad_settings_fail_before_any_work(env, message, tmp_path):
    done = run_script(check=False, DRY_RUN="1", RUNS_DIR=str(tmp_path / "runs"), **env)
    assert done.returncode == 2 and message in done.stderr, (env, done.stderr)
    assert "plan:" not in done.stdout and not (tmp_path / "runs").exists()


# -------------------------------------------------------------------------------------- two phases (SWEEP_SEEDS)

def split_phases(stdout):
    """(phase-1 output, phase-2 output): the text before and from the concrete phase-2 plan ("" without one)."""
    head, sep, rest = stdout.partition("plan, phase 2 of 2 (the chosen lrs)")
    return head, sep + rest


def test_bad_sweep_seeds_refused_before_anything_is_written(tmp_path):
    """Without DRY_RUN too: no data, run or results folder is made."""
    done = run_script(check=False, SWEEP_SEEDS="4", SEEDS="1 2", NS="8", RUNS_DIR=str(tmp_path / "runs"),
                      RESULTS_DIR=str(tmp_path / "results"), DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 2 and 'seed 4 is not in SEEDS="1 2"' in done.stderr, done.stderr
    assert "plan" not in done.stdout and list(tmp_path.iterdir()) == []


def test_two_phase_dry_run_phase1_runs_only_the_sweep_seeds(tmp_path):
    """Phase 1: every lr of a sweep on SWEEP_SEEDS only (its chains as without SWEEP_SEEDS), single-lr cells on every
    seed; phase 2 is described (seeds, rule, run counts), not planned, while no phase-1 result is on disk."""
    out = run_script(DRY_RUN="1", SWEEP_SEEDS="1", NS="8 16", GPUS="0 1", RUNS_DIR=str(tmp_path / "runs"),
                     LLAMA_LRS="5e-5").stdout  # llama: a single lr
    phase1, phase2 = split_phases(out)
    assert phase2 == ""
    rows, _, commands = parse_plan(phase1)
    swept = {c for c in CELLS if not c.startswith("llama")}
    assert sorted((r["cell"], r["n"], r["seed"]) for r in rows) == sorted(
        [(c, n, 1) for c in swept for n in (8, 16)] + [("llama_lr5e-5", n, s) for n in (8, 16) for s in (1, 2, 3)])
    assert len(rows) == 54 and set(commands) == {run_id(r) for r in rows}
    by_id = {run_id(r): r for r in rows}
    for r in rows:
        if r["n"] == 16:
            parent = by_id[r["init"]]
            assert (parent["n"], parent["cell"], parent["seed"]) == (8, r["cell"], r["seed"])
    assert out.startswith("plan, phase 1 of 2 (the lr sweeps): 54 runs (every lr of the 7 sweeps with more than one "
                          "lr on the sweep seeds {1}, the cells of a single lr on seeds {1 2 3}; N in {8 16})")
    assert ("the lr with the best valid exact match in phase 1 (the selected checkpoint's eval_exact_match in "
            "all_results.json, the mean over the sweep seeds; ties: the smaller lr; no test metric is read) runs on "
            "seeds {2 3}") in out
    assert "28 runs (cost 1860000) where a sweep chooses the same lr at every N, up to 42 where each N" in out
    assert "lr choice" not in out and not (tmp_path / "runs").exists()

    out = run_script(DRY_RUN="1", SWEEP_SEEDS="1", NS="8").stdout  # the README's counts at N8: 27 + 16 runs
    assert out.startswith("plan, phase 1 of 2 (the lr sweeps): 27 runs") and "16 runs (cost 680000) where" in out
    out = run_script(DRY_RUN="1", SWEEP_SEEDS="3 1", ONLY="rmt", K="1", NS="4").stdout
    assert sorted((r["cell"], r["seed"]) for r in parse_plan(out)[0]) == sorted(
        (f"rmt_K1_lr{lr}", s) for lr in ("1e-4", "3e-4", "1e-3") for s in (1, 3))
    assert "runs on seeds {2}" in out and "1 runs (cost 10000) where" in out
    out = run_script(DRY_RUN="1", SWEEP_SEEDS="1", ONLY="llama mamba", NS="8", LLAMA_LRS="5e-5",
                     MAMBA_LRS="3e-4").stdout  # no sweep: every seed at once
    assert len(parse_plan(out)[0]) == 6 and "plan, phase 2 of 2: no runs (no sweep has more than one lr)" in out


# (sweep, N) -> {lr: (valid, test)} of the phase-1 runs (seed 1) of ONLY="gradmem rmt llama" K=2 NS="8 16"; the best
# test value is always another lr's than the best valid one, so choosing on test would change the plan
PHASE1 = {("gradmem_K2", 8): {"0.02": (0.50, 0.99), "0.04": (0.70, 0.10), "0.08": (0.60, 0.20)},
          ("gradmem_K2", 16): {"0.02": (0.30, 0.95), "0.04": (0.40, 0.90), "0.08": (0.60, 0.10)},
          ("rmt_K2", 8): {"1e-4": (0.50, 0.10), "3e-4": (0.50, 0.90), "1e-3": (0.40, 0.95)},  # a tie: the smaller
          ("rmt_K2", 16): {"1e-4": None, "3e-4": (0.20, 0.30), "1e-3": (0.10, 0.40)}}  # 1e-4: no results
TWO_PHASE = dict(SWEEP_SEEDS="1", ONLY="gradmem rmt llama", K="2", NS="8 16", GPUS="0 1", LLAMA_LRS="5e-5")  # one lr


def fake_phase1_results(tmp_path):
    """The run folders of the phase-1 plan (named by the run scripts' parsers) with a run record and, as PHASE1 says,
    an all_results.json and the checkpoint it selected; llama's (one lr, seeds 1-3) too. Returns the script's
    settings."""
    env = dict(TWO_PHASE, RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path / "results"),
               DATA_DIR=str(tmp_path / "data"))
    rows, _, commands = parse_plan(run_script(DRY_RUN="1", **env).stdout)
    assert len(rows) == 18
    for r in rows:
        _, folder, saved = parse_command(commands[run_id(r)])
        sweep, _, lr = r["cell"].rpartition("_lr" if r["cell"].startswith(("rmt", "llama")) else "_ilr")
        result = PHASE1.get((sweep, r["n"]), {}).get(lr, (0.3, 0.3))
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(json.dumps({"cli_args": saved}))
        if result is not None:  # a finished run, with its selected checkpoint (an empty folder) on the machine
            (folder / "checkpoint-1").mkdir()
            (folder / "all_results.json").write_text(json.dumps(
                {"eval_exact_match": result[0], "test_generated_exact_match": result[1], "global_step": r["steps"],
                 "best_model_checkpoint": str(folder / "checkpoint-1")}))
    return env


def test_two_phase_dry_run_with_phase1_results_plans_the_best_valid_lr(tmp_path):
    """With phase-1 results on disk the concrete phase-2 plan: at each N the best-valid lr (never the best-test one;
    a tie goes to the smaller lr) on the other seeds, an N16 choice with its N8 warm start of the same lr; a sweep
    whose phase-1 run has no results waits; nothing is written."""
    env = fake_phase1_results(tmp_path)
    out = run_script(DRY_RUN="1", **env).stdout
    phase1, phase2 = split_phases(out)
    assert len(parse_plan(phase1)[0]) == 18
    assert "lr choice, N8 gradmem_K2: valid EM 0.02: 0.5000, 0.04: 0.7000, 0.08: 0.6000 -> 0.04" in out
    assert "lr choice, N16 gradmem_K2: valid EM 0.02: 0.3000, 0.04: 0.4000, 0.08: 0.6000 -> 0.08" in out
    assert "lr choice, N8 rmt_K2: valid EM 1e-4: 0.5000, 3e-4: 0.5000, 1e-3: 0.4000 -> 1e-4" in out
    assert ("lr choice, N16 rmt_K2: no choice: N16_rmt_K2_lr1e-4_s1 has no all_results.json "
            f"({tmp_path}/runs/N16-K2V2-V62_1M/") in out and "; its phase 2 waits for these results" in out
    rows, _, commands = parse_plan(phase2)
    assert sorted(run_id(r) for r in rows) == sorted(
        f"{run}_s{s}" for s in (2, 3) for run in ("N8_gradmem_K2_ilr0.04", "N8_gradmem_K2_ilr0.08",
                                                  "N16_gradmem_K2_ilr0.08", "N8_rmt_K2_lr1e-4"))
    assert set(commands) == {run_id(r) for r in rows}
    for r in rows:
        assert r["init"] == (f"N8_gradmem_K2_ilr0.08_s{r['seed']}" if r["n"] == 16 else None)
        (train, _, model, _), _, _ = parse_command(commands[run_id(r)])
        assert train.seed == 142 + r["seed"] and train.max_steps == STEPS[r["n"]]
    assert "warm start only: N8_gradmem_K2_ilr0.08_s2, for the same lr chosen at a larger N (N8 chose 0.04)" in phase2
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_two_phase_execution_writes_the_lr_choice_and_runs_phase2(tmp_path):
    """The script for real, the run scripts stood in for by a python that records and fails them: phase 1 runs only
    its run without results (it fails: that sweep chooses nothing and its phase 2 is skipped), the choice is written
    (lr_choice.md, lr_choice.json), phase 2 starts exactly the planned runs, its failures are reported, a failed
    warm start skips its N16 run, the results are collected and the script exits 1."""
    env = fake_phase1_results(tmp_path)
    for n in (8, 16):  # the datasets are not read by the stand-in
        (tmp_path / "data" / f"N{n}-K2V2-V62_1M").mkdir(parents=True)
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/usr/bin/env bash\ncase "$1" in run_*_kv_retrieval.py) echo "$@" >> "$0.calls"; '
                        'echo "stand-in failure" >&2; exit 3 ;; esac\nexec python3 "$@"\n')
    stand_in.chmod(0o755)
    done = run_script(check=False, PYTHON=str(stand_in), **env)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    started = [(argv[0], argv[argv.index("--seed") + 1], argv[argv.index("--data_path") + 1].split("/")[-1][:3],
                argv[argv.index("--inner_lr" if "gradmem" in argv[0] else "--learning_rate") + 1])
               for argv in map(str.split, (tmp_path / "python.calls").read_text().splitlines())]
    rmt, gradmem = "run_rmt_on_kv_retrieval.py", "run_gradmemgpt_on_kv_retrieval.py"
    assert started[0] == (rmt, "143", "N16", "1e-4")  # phase 1: the run without results, then phase 2
    rebalanced = out[out.index("the same plan, balanced on the runs left to do (17 done): 18 runs"):]
    assert "total cost: 60000 " in rebalanced.splitlines()[2 + 18 + 2]  # N16 RMT K=2 alone: 20000 steps x (K+1)
    assert sorted(started[1:]) == sorted((script, str(142 + s), n, lr) for s in (2, 3) for script, n, lr in (
        (gradmem, "N8-", "0.04"), (gradmem, "N8-", "0.08"), (rmt, "N8-", "1e-4")))
    assert "N16_rmt_K2_lr1e-4_s1: FAILED" in out
    assert ("lr choice, N16 rmt_K2: no choice: N16_rmt_K2_lr1e-4_s1 failed or was skipped; its phase 2 is SKIPPED"
            in out)
    assert "N16_gradmem_K2_ilr0.08_s3: SKIPPED, its warm start N8_gradmem_K2_ilr0.08_s3 failed" in out
    assert "N8_gradmem_K2_ilr0.04_s2: FAILED" in out and "some runs failed or were skipped" in out
    assert (tmp_path / "results" / "matrix.md").exists()

    choice = json.loads((tmp_path / "results" / "lr_choice.json").read_text())
    assert (choice["sweep_seeds"], choice["other_seeds"]) == ([1], [2, 3])
    assert {(r["sweep"], r["n"]): r["chosen"] for r in choice["sweeps"]} == {
        ("gradmem_K2", 8): "0.04", ("gradmem_K2", 16): "0.08", ("rmt_K2", 8): "1e-4", ("rmt_K2", 16): None}
    gradmem_n8 = next(r for r in choice["sweeps"] if (r["sweep"], r["n"]) == ("gradmem_K2", 8))
    assert [(e["lr"], e["valid_exact_match_mean"], [x["seed"] for x in e["runs"]]) for e in gradmem_n8["lrs"]] == [
        ("0.02", 0.5, [143]), ("0.04", 0.7, [143]), ("0.08", 0.6, [143])]
    def keys(x):
        return ({k for k in x} | set().union(*map(keys, x.values())) if isinstance(x, dict)
                else set().union(*map(keys, x)) if isinstance(x, list) else set())
    assert not [k for k in keys(choice) if "test" in k]  # no test number is recorded
    md = (tmp_path / "results" / "lr_choice.md").read_text()
    assert "| 8 | gradmem | 2 | inner 0.04 | 0.7000 [143: 0.7000] | **chosen** |" in md
    assert "| 8 | rmt | 2 | 1e-4 | 0.5000 [143: 0.5000] | **chosen** |" in md
    assert "| 8 | rmt | 2 | 3e-4 | 0.5000 [143: 0.5000] | - |" in md
    assert "| 16 | rmt | 2 | 1e-4 | - [143: -] | none: phase 2 skipped |" in md
    assert "- N16 rmt_K2: N16_rmt_K2_lr1e-4_s1 failed or was skipped" in md
    assert "on the sweep seeds 1" in md and "on the other seeds: 2 3" in md and "No test metric was read" in md


# ------------------------------------------------------------------------------------------- one cell per family

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--per_device_batch_size", "8", "--max_steps", "2",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def n8_data(tmp_path_factory):
    """A 64/16/8-sample N8-K2V2-V62 dataset with its test split, named as the preset names it (DATA_SIZE=64)."""
    spec = kv_dataset_utils.parse_dataset_name("N8-K2V2-V62")
    path = tmp_path_factory.mktemp("data") / "N8-K2V2-V62_64"
    kv_dataset_utils.save_kv_dataset(kv_dataset_utils.build_kv_dataset_dict(spec, 64, 16, seed=0, n_test=8), path,
                                     spec, 0)
    return path


@pytest.fixture(autouse=True)
def restore_precision_env(monkeypatch):
    """run_experiment writes ACCELERATE_MIXED_PRECISION into os.environ; undo it after each test."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))


def test_one_tiny_cell_per_family_trains_from_the_plans_command(tmp_path, n8_data):
    """The plan's N8 command of each family (its recipe, shrunk by extra arguments to a tiny model and 2 steps) runs
    in this process: every family's all_results.json has the test split's generated exact match, and the saved
    arguments put each run in its cell."""
    modules = {"run_gradmemgpt_on_kv_retrieval.py": run_gradmemgpt_on_kv_retrieval,
               "run_rmt_on_kv_retrieval.py": run_rmt_on_kv_retrieval,
               "run_gpt2_on_kv_retrieval.py": run_gpt2_on_kv_retrieval}
    out = run_script(*TINY, DRY_RUN="1", K="1", LRS="1e-3", NS="8", SEEDS="1", EVAL_STEPS="2", MAX_EVAL_SAMPLES="8",
                     DATA_DIR=str(n8_data.parent), DATA_SIZE="64", RUNS_DIR=str(tmp_path / "runs")).stdout
    rows, _, commands = parse_plan(out)
    assert sorted(commands) == ["N8_gradmem_K1_ilr1e-3_s1", "N8_llama_lr1e-3_s1", "N8_mamba_lr1e-3_s1",
                                "N8_rmt_K1_lr1e-3_s1"]
    for run, argv in commands.items():
        modules[argv[0]].main(argv[1:])
        _, folder, _ = parse_command(argv)
        results = json.loads((folder / "all_results.json").read_text())
        assert results["global_step"] == 2, run
        assert 0 <= results["test_generated_exact_match"] <= 1 and results["test_generated_samples"] == 8, run
        assert 0 <= results["eval_generated_exact_match"] <= 1, run
        if "final_checkpoint" in results:  # the final checkpoint is evaluated where it is not the selected one
            assert 0 <= results["final_test_generated_exact_match"] <= 1, run
    cells = rm.matrix_cells(cr.find_runs(tmp_path / "runs"))
    assert [(c.family, c.K, c.lr, [r.seed for r in c.runs]) for c in cells] == [
        ("gradmem", 1, 1e-3, [143]), ("rmt", 1, 1e-3, [143]), ("llama", None, 1e-3, [143]),
        ("mamba", None, 1e-3, [143])]


# ------------------------------------------------------------------------------------------------- real execution

@pytest.mark.slow
def test_tiny_real_execution_warm_start_failure_results_and_skip(tmp_path):
    """GradMem N8 -> N16 for real (tiny model, 4 steps, CPU) on one worker of "GPU" 0; RMT goes through a stand-in
    python that fails it on the other worker of the same GPU: its N16 run is skipped, the results are still collected
    (matrix.md) and the script exits 1.
    Run again, the finished runs are skipped."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/usr/bin/env bash\nif [ "$1" = run_rmt_on_kv_retrieval.py ]; then echo "stand-in failure" '
                        '>&2; exit 3; fi\nexec python3 "$@"\n')
    stand_in.chmod(0o755)
    runs, results, data = tmp_path / "runs", tmp_path / "results", tmp_path / "data"
    tiny = TINY[:TINY.index("--max_steps")] + ["--max_steps", "4"] + TINY[TINY.index("--max_steps") + 2:]
    env = dict(GPUS="0", WORKERS_PER_GPU="2", ONLY="gradmem rmt", K="1", LRS="0.04", NS="8 16", SEEDS="1",
               DATA_SIZE="64", N_VALID="16", N_TEST="8", MAX_EVAL_SAMPLES="8", EVAL_STEPS="2", PYTHON=str(stand_in),
               RUNS_DIR=str(runs), RESULTS_DIR=str(results), DATA_DIR=str(data), OMP_NUM_THREADS="1")
    done = run_script(*tiny, check=False, **env)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert (data / "N8-K2V2-V62_64").is_dir() and (data / "N16-K2V2-V62_64").is_dir()
    assert "N8_rmt_K1_lr0.04_s1: FAILED" in out and "N16_rmt_K1_lr0.04_s1: SKIPPED" in out
    assert "stand-in failure" in (runs / "logs" / "N8_rmt_K1_lr0.04_s1.log").read_text()
    assert "N16_gradmem_K1_ilr0.04_s1: finished" in out

    (n8,) = runs.glob("N8-K2V2-V62_64/gradmem_*/run_143")
    (n16,) = runs.glob("N16-K2V2-V62_64/gradmem_*/run_143")
    n8_results = json.loads((n8 / "all_results.json").read_text())
    n16_args = json.loads((n16 / "run_config.json").read_text())["cli_args"]
    assert n16_args["init_checkpoint"] == n8_results["best_model_checkpoint"]
    assert (n16_args["warmup_steps"], n16_args["max_steps"], n16_args["inner_lr"], n16_args["K"]) == (100, 4, 0.04, 1)
    assert "test_generated_exact_match" in json.loads((n16 / "all_results.json").read_text())
    matrix = (results / "matrix.md").read_text()
    assert "| 8 | gradmem | 1 | inner 0.04 **best** | 143 (1) |" in matrix
    assert "| 16 | gradmem | 1 | inner 0.04 **best** | 143 (1) |" in matrix
    assert (results / "k_scaling.png").exists()
    assert (results / "runs" / n8.relative_to(runs) / "all_results.json").exists()  # the metrics kept for git

    again = run_script(*tiny, check=False, **env)
    assert again.returncode == 1
    for run in ("N8_gradmem_K1_ilr0.04_s1", "N16_gradmem_K1_ilr0.04_s1"):
        assert f"{run}: done before" in again.stdout

    # Another machine: RUNS_DIR holds only the metrics kept for git; the N16 run is to be made again, but the
    # checkpoint of its warm start is not there: skipped, naming the fix, instead of a run failing on a missing folder
    shutil.rmtree(runs)
    shutil.copytree(results / "runs", runs)
    (runs / n16.relative_to(runs) / "all_results.json").unlink()
    elsewhere = run_script(*tiny, check=False, **{**env, "ONLY": "gradmem"})
    assert elsewhere.returncode == 1
    assert "N8_gradmem_K1_ilr0.04_s1: done before" in elsewhere.stdout
    assert (f"N16_gradmem_K1_ilr0.04_s1: SKIPPED, its warm start {n8_results['best_model_checkpoint']} is not on this "
            "machine") in elsewhere.stdout
    assert f"delete {n8}/all_results.json" in elsewhere.stdout
