"""scripts/run_paper_claims.sh: the DRY_RUN plan (every run, chains on one GPU in order, budgets balanced over the
GPUs, N16 warm-started from N8), run names that collect_results groups into the K and grad_mode ablations, bad
settings rejected before any work, and one tiny real execution (N8 -> N16 warm start, a failed chain, results/)."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import collect_results as cr
from full_context_lm import FullContextArgs
from grad_memgpt import PRESETS, GradMemArgs
from rmt import RMTArgs
from training_args import BackboneArgs, DataArgs, TrainArgs, parse_cli
from training_run_folder import resolve_run_dir
from training_runs import flat_args, full_context_run_name, gradmem_run_name, rmt_run_name

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_paper_claims.sh"
SCRIPT_SETTINGS = ("GPUS", "SEEDS", "SEEDS_ABLATION", "NS", "ONLY", "BUDGET_N4", "BUDGET_N8", "BUDGET_N16", "BUDGET_N32",
                   "EVAL_STEPS", "MAX_EVAL_SAMPLES", "MAX_STEPS", "PRECISION", "DATA_DIR", "DATA_SIZE", "N_VALID", "N_TEST",
                   "RUNS_DIR", "RESULTS_DIR", "PYTHON", "DRY_RUN")
PLAN_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(.+)$")
NAMING = {"run_gradmemgpt_on_kv_retrieval.py": (GradMemArgs, gradmem_run_name, PRESETS),
          "run_rmt_on_kv_retrieval.py": (RMTArgs, rmt_run_name, None),
          "run_gpt2_on_kv_retrieval.py": (FullContextArgs, full_context_run_name, None)}


def run_script(*args, check=True, **env):
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    done = subprocess.run(["bash", str(SCRIPT), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def parse_plan(stdout):
    """rows: dicts (gpu, order, n, model, seed, budget, init); totals: {gpu: minutes}; commands: {run id: argv}."""
    rows, totals, commands = [], {}, {}
    lines = stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("gpu   order")))
    for line in lines[start + 1:]:
        m = PLAN_ROW.match(line)
        if m and not line.startswith("gpu "):
            gpu, order, n, model, seed, budget, init = m.groups()
            rows.append(dict(gpu=gpu, order=int(order), n=int(n), model=model, seed=int(seed), budget=float(budget),
                             init=None if init == "-" else init.removeprefix("best checkpoint of ")))
        elif m := re.match(r"^gpu (\S+): ([0-9.]+) min of training budget$", line):
            totals[m[1]] = float(m[2])
        elif m := re.match(r"^(N\d+_\S+_s\d+): \S+ (.*)$", line):
            commands[m[1]] = shlex.split(m[2])
    return rows, totals, commands


def run_id(row):
    return f"N{row['n']}_{row['model']}_s{row['seed']}"


def run_folder(argv):
    """The run folder the run script would use for this command (its own naming), its TrainArgs and its saved
    arguments."""
    model_args, name, presets = NAMING[argv[0]]
    train, backbone, model, data = parse_cli(TrainArgs, BackboneArgs, model_args, DataArgs, args=argv[1:],
                                             presets=presets)
    train.run_name = name(train, backbone, model, 1)
    return resolve_run_dir(train, Path(data.data_path).name), train, flat_args([train, backbone, model, data])


# -------------------------------------------------------------------------------------------------------- the plan

def test_dry_run_plan_all_runs_chains_and_balance(tmp_path):
    out = run_script("--max_steps", "20", DRY_RUN="1", GPUS="1 2 3", DATA_DIR=str(tmp_path / "data")).stdout
    rows, totals, commands = parse_plan(out)
    expected = ({(n, m, s) for m in ("gradmem", "rmt", "llama") for s in (1, 2) for n in (4, 8, 16)}
                | {(n, f"gradmem_K{k}", 1) for k in (1, 5) for n in (8, 16)}
                | {(8, f"gradmem_grad_{g}", 1) for g in ("none", "first")})
    assert sorted((r["n"], r["model"], r["seed"]) for r in rows) == sorted(expected)
    assert set(commands) == {run_id(r) for r in rows}
    for n in (4, 8, 16):  # missing datasets are announced, nothing is built
        assert f"would build {tmp_path}/data/N{n}-K2V2-V62_1M" in out
    assert not (tmp_path / "data").exists()

    budgets = {4: 1, 8: 2, 16: 3}
    by_id = {run_id(r): r for r in rows}
    for r in rows:
        assert r["budget"] == budgets[r["n"]]
        if r["n"] == 16:  # warm start from the same model and seed at N8, just before it on the same GPU
            parent = by_id[r["init"]]
            assert (parent["n"], parent["model"], parent["seed"]) == (8, r["model"], r["seed"])
            assert parent["gpu"] == r["gpu"] and parent["order"] == r["order"] - 1
        else:
            assert r["init"] is None
    for gpu in ("1", "2", "3"):  # each GPU's runs are numbered 1, 2, ... in order
        assert sorted(r["order"] for r in rows if r["gpu"] == gpu) == list(range(1, 1 + sum(r["gpu"] == gpu for r in rows)))
        assert totals[gpu] == sum(r["budget"] for r in rows if r["gpu"] == gpu)
    # 8 chains of 5 min, 2 N8 ablation runs of 2 min, 6 N4 runs of 1 min = 50 min: longest first gives 17 / 17 / 16
    assert sorted(totals.values()) == [16, 17, 17]
    assert "total: 50 min" in out


def test_dry_run_commands_recipe_and_run_names():
    out = run_script("--max_steps", "20", DRY_RUN="1", GPUS="0", PRECISION="tf32", RUNS_DIR="runs/x").stdout
    rows, totals, commands = parse_plan(out)
    assert set(totals) == {"0"} and totals["0"] == 50
    folders, groups = {}, []
    for r in rows:
        argv = commands[run_id(r)]
        folder, train, saved = run_folder(argv)
        assert (train.learning_rate, train.per_device_batch_size, train.max_grad_norm) == (1e-3, 64, 1.0)
        assert (train.lr_scheduler_type, train.eval_steps, train.max_eval_samples) == ("constant_with_warmup", 200, 500)
        assert (train.early_stopping_patience, train.stop_metric, train.stop_metric_value) == (0, "exact_match", 0.99)
        assert train.max_train_minutes == r["budget"] and train.seed == 142 + r["seed"]
        assert train.max_steps == 20 and train.fp32 and train.tf32  # extra arguments win; PRECISION=tf32
        assert train.warmup_steps == (100 if r["n"] == 16 else 300)
        assert (train.init_checkpoint is not None) == (r["n"] == 16)
        assert str(folder).startswith(f"runs/x/N{r['n']}-K2V2-V62_1M/") and folder.name == f"run_{142 + r['seed']}"
        assert folder not in folders, f"{run_id(r)} and {folders.get(folder)} share {folder}"
        folders[folder] = run_id(r)
        if r["seed"] == 1:
            groups.append(cr.Group(task=folder.parent.parent.name, run_name=folder.parent.name, seeds=[143],
                                   args=saved))
        if r["model"].startswith("gradmem"):
            _, _, g, _ = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs, args=argv[1:], presets=PRESETS)
            k = int(r["model"][len("gradmem_K"):]) if r["model"].startswith("gradmem_K") else 2
            mode = r["model"][len("gradmem_grad_"):] if "grad_" in r["model"] else "second"
            assert (g.n_mem_tokens, g.K, g.grad_mode, g.inner_lr, g.inner_loss_weight) == (8, k, mode, 0.04, 0.5)
            assert g.use_write_head and g.attn_implementation == "auto"
            assert f"_K{k}_" in folder.parent.name and f"_grad_{mode}_" in folder.parent.name
        assert cr.model_family(folder.parent.name) == {"rmt": "rmt2segm", "llama": "llama"}.get(r["model"], "gradmem")

    # collect_results puts the main K=2 second-order run into both ablations
    k_ablation = cr.ablation_groups(groups, "K")
    assert sorted((task, sorted(vals)) for (task, _), vals in k_ablation.items()) == [
        ("N16-K2V2-V62_1M", ["1", "2", "5"]), ("N8-K2V2-V62_1M", ["1", "2", "5"])]
    grad_ablation = cr.ablation_groups(groups, "grad_mode")
    assert [(task, list(vals)) for (task, _), vals in grad_ablation.items()] == [
        ("N8-K2V2-V62_1M", ["none", "first", "second"])]


def test_subsets_and_bad_settings_fail_before_any_work():
    rows, _, _ = parse_plan(run_script(DRY_RUN="1", ONLY="rmt k_ablation", NS="4 8", SEEDS="3").stdout)
    assert sorted(run_id(r) for r in rows) == ["N4_rmt_s3", "N8_gradmem_K1_s1", "N8_gradmem_K5_s1", "N8_rmt_s3"]
    for env, message in ((dict(NS="4 16"), "N16 runs warm-start from the N8 runs"),
                         (dict(NS="8 32"), "N32 runs warm-start from the N16 runs"),
                         (dict(NS="4 12"), "N=12 is not one of"),
                         (dict(ONLY="gradmem mamba"), "'mamba' is not one of"),
                         (dict(ONLY="grad_mode", NS="4"), "leaves no run"),
                         (dict(BUDGET_N8="0"), "BUDGET_N8=0 must be a positive number"),
                         (dict(GPUS="0,1"), "is not a GPU index"),
                         (dict(GPUS="1 1"), "names a GPU twice"),
                         (dict(PRECISION="fp16"), "PRECISION must be fp32, tf32 or bf16"),
                         (dict(DATA_SIZE="1G"), "DATA_SIZE=1G")):
        done = run_script(check=False, DRY_RUN="1", **env)
        assert done.returncode == 2 and message in done.stderr, (env, done.stderr)
        assert "plan:" not in done.stdout


# ------------------------------------------------------------------------------------------------- real execution

@pytest.mark.slow
def test_tiny_real_execution_warm_start_failure_and_results(tmp_path):
    """GradMem N8 -> N16 for real (tiny model, 4 steps, CPU) with two "GPUs"; the K=1 / K=5 runs go through a
    stand-in python that fails them: their N16 runs are skipped, the script still collects the results and exits 1."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/usr/bin/env bash\nprev=""\nfor a in "$@"; do\n'
                        '    if [ "$prev" = --K ] && [ "$a" != 2 ]; then echo "stand-in failure" >&2; exit 3; fi\n'
                        '    prev=$a\ndone\nexec python3 "$@"\n')
    stand_in.chmod(0o755)
    runs, results, data = tmp_path / "runs", tmp_path / "results", tmp_path / "data"
    tiny = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--per_device_batch_size", "8", "--max_steps", "4",
            "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"]
    done = run_script(*tiny, check=False, GPUS="0 1", NS="8 16", ONLY="gradmem k_ablation", SEEDS="1",
                      DATA_SIZE="64", N_VALID="16", N_TEST="8", MAX_EVAL_SAMPLES="8", EVAL_STEPS="2", PYTHON=str(stand_in),
                      RUNS_DIR=str(runs), RESULTS_DIR=str(results), DATA_DIR=str(data), OMP_NUM_THREADS="1")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert (data / "N8-K2V2-V62_64").is_dir() and (data / "N16-K2V2-V62_64").is_dir()
    for k in (1, 5):
        assert f"N8_gradmem_K{k}_s1: FAILED" in out and f"N16_gradmem_K{k}_s1: SKIPPED" in out
        assert "stand-in failure" in (runs / "logs" / f"N8_gradmem_K{k}_s1.log").read_text()
    assert "[gpu 0]" in out and "N16_gradmem_s1: finished" in out

    (n8,) = runs.glob("N8-K2V2-V62_64/gradmem_*_K2_*/run_143")
    (n16,) = runs.glob("N16-K2V2-V62_64/gradmem_*_K2_*/run_143")
    assert n8.parent.name == n16.parent.name  # one run name over N: one line in em_vs_n
    n8_results = json.loads((n8 / "all_results.json").read_text())
    n16_config = json.loads((n16 / "run_config.json").read_text())["cli_args"]
    assert n16_config["init_checkpoint"] == n8_results["best_model_checkpoint"] and Path(
        n8_results["best_model_checkpoint"]).is_dir()
    assert n16_config["warmup_steps"] == 100 and n16_config["max_train_minutes"] == 3
    assert json.loads((n16 / "all_results.json").read_text())["global_step"] == 4

    summary = (results / "summary.md").read_text()
    assert "N8-K2V2-V62_64" in summary and "N16-K2V2-V62_64" in summary and (results / "em_vs_n.png").exists()
    for run in (n8, n16):
        copy = results / "runs" / run.relative_to(runs)
        assert sorted(p.name for p in copy.iterdir()) == ["all_results.json", "run_config.json", "trainer_state.json"]
