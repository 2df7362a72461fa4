"""The KV curriculum: stage format, stage states read from run folders, and the driver's chaining, resuming and
stopping (with a stand-in for the training of a stage), then one real tiny stage."""
import json

import pytest

import curriculum
import run_gradmemgpt_kv_curriculum as driver


def test_stage_format():
    assert curriculum.parse_stage("8") == curriculum.Stage(8, 0.95, {})
    assert curriculum.parse_stage("16:0.9") == curriculum.Stage(16, 0.9, {})
    stage = curriculum.parse_stage("64:0.95:K=5,inner_lr=0.08,--max_steps=1000")
    assert stage.options == {"K": "5", "inner_lr": "0.08", "max_steps": "1000"} and stage.name == "N64"
    for bad in ("x", "8:high", "0:0.9", "8:1.5", "8:0.9:K5", "8:0.9:=3"):
        with pytest.raises(ValueError, match="stage"):
            curriculum.parse_stage(bad)
    with pytest.raises(ValueError, match="once"):
        curriculum.parse_stages(["8", "8:0.9"])


def write_results(folder, exact_match, step, best="checkpoint-1"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "all_results.json").write_text(json.dumps(
        {"eval_exact_match": exact_match, "global_step": step, "best_model_checkpoint": str(folder / best)}))


def test_stage_status(tmp_path):
    stage = curriculum.Stage(8, 0.95)
    assert curriculum.stage_status(tmp_path / "N8", stage, 100).state == "new"
    (tmp_path / "N8" / "checkpoint-10").mkdir(parents=True)
    assert curriculum.stage_status(tmp_path / "N8", stage, 100).state == "resume"  # interrupted
    write_results(tmp_path / "N8", 0.5, 40)
    assert curriculum.stage_status(tmp_path / "N8", stage, 100).state == "resume"  # stopped by a time budget
    assert curriculum.stage_status(tmp_path / "N8", stage, 40).state == "stuck"  # no steps left
    write_results(tmp_path / "N8", 0.96, 60)
    status = curriculum.stage_status(tmp_path / "N8", stage, 100)
    assert status.state == "done" and status.best_checkpoint.endswith("checkpoint-1")
    (tmp_path / "N8" / "all_results.json").write_text("{")
    with pytest.raises(ValueError, match="unreadable"):
        curriculum.stage_status(tmp_path / "N8", stage, 100)


def test_driver_chains_stages_resumes_and_stops(tmp_path, monkeypatch):
    """Stage k+1 starts from stage k's best checkpoint with the later-stage schedule and its own options; a stage
    stopped below its threshold with steps left is resumed by the next invocation; done stages are skipped."""
    calls, outcomes = [], {"N2": [0.97], "N4": [0.5, 0.96]}

    def fake_main(argv):
        options = dict(zip(argv[::2], argv[1::2]))
        calls.append(options)
        name = options["--exp_path"].split("/")[-1]
        exact_match = outcomes[name].pop(0)
        write_results(tmp_path / "out" / name, exact_match, 50)
        return {"eval_exact_match": exact_match, "global_step": 50, "test_generated_exact_match": exact_match}

    monkeypatch.setattr(driver.run_kv, "main", fake_main)
    monkeypatch.setattr(driver, "prepare_data", lambda args, stage: 0.0)
    argv = ["--stages", "2:0.95", "4:0.95:K=3", "--out_dir", str(tmp_path / "out"), "--seed", "5", "--stage_steps",
            "200", "--", "--n_layer", "1"]
    assert driver.main(argv) == 3  # N4 ended below its threshold with steps left: re-run to go on
    first, second = calls
    assert first["--learning_rate"] == "0.001" and first["--lr_scheduler_type"] == "constant_with_warmup"
    assert "--init_checkpoint" not in first and first["--n_layer"] == "1" and first["--seed"] == "5"
    assert first["--stop_metric_value"] == "0.95" and first["--data_path"].endswith("N2-K2V2-V62_1M")
    assert second["--learning_rate"] == "0.0005" and second["--lr_scheduler_type"] == "linear"
    assert second["--max_steps"] == "200" and second["--K"] == "3"
    assert second["--init_checkpoint"] == str(tmp_path / "out" / "N2" / "checkpoint-1")
    assert driver.main(argv) == 0 and len(calls) == 3  # N2 done (skipped), N4 resumed and done
    record = json.loads((tmp_path / "out" / "curriculum.json").read_text())
    assert [[s["stage"] for s in i["stages"]] for i in record["invocations"]] == [["N2", "N4"], ["N4"]]
    assert driver.main(argv) == 0 and len(calls) == 3  # everything done: nothing trains


def test_driver_runs_a_real_tiny_stage(tmp_path, monkeypatch):
    """One tiny stage through the KV run script: the record holds the test split's generated exact match and the
    guards' counters; a stage with no steps left below its threshold stops the curriculum (exit 1)."""
    argv = ["--stages", "2:0.99", "4:0.99", "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data"),
            "--data_size", "32", "--max_steps", "2", "--warmup_steps", "0", "--",
            "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_mem_tokens", "2", "--per_device_batch_size",
            "4", "--max_eval_samples", "8", "--eval_steps", "2", "--logging_steps", "1", "--report_to", "none"]
    monkeypatch.setattr(driver.kv_dataset_utils, "DEFAULT_N_TEST", 8)  # a tiny test split keeps the test short
    assert driver.main(argv) == 1
    stage = json.loads((tmp_path / "out" / "curriculum.json").read_text())["invocations"][0]["stages"][0]
    assert stage["stage"] == "N2" and stage["global_step"] == 2
    for key in ("test_generated_exact_match", "eval_generated_exact_match", "spike_skipped_steps", "rollbacks"):
        assert key in stage, key
    assert not (tmp_path / "out" / "N4").exists()


def test_warm_up_stage_without_its_final_evaluation(tmp_path, monkeypatch):
    """final_evaluation=false (a warm-up stage): no test numbers; the stage's valid metrics are those its selected
    checkpoint had when it was evaluated during training, so its threshold still decides whether it is done. A stage
    option wins over the shared one of the same name (the preset's N2 evaluates fewer valid samples)."""
    import training_experiment

    argv = ["--stages", "2:0.99:final_evaluation=false,max_eval_samples=4", "--out_dir", str(tmp_path / "out"),
            "--data_dir", str(tmp_path / "data"), "--data_size", "32", "--max_steps", "4", "--warmup_steps", "0", "--",
            "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_mem_tokens", "2", "--per_device_batch_size",
            "4", "--max_eval_samples", "8", "--eval_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--metric_for_best_model", "eval_loss"]
    monkeypatch.setattr(driver.kv_dataset_utils, "DEFAULT_N_TEST", 8)
    monkeypatch.setattr(training_experiment, "evaluate_splits", lambda *a, **k: pytest.fail("evaluated after training"))
    assert driver.main(argv) == 1  # below its threshold with no steps left
    stage = json.loads((tmp_path / "out" / "curriculum.json").read_text())["invocations"][0]["stages"][0]
    state = json.loads((tmp_path / "out" / "N2" / "trainer_state.json").read_text())
    step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    [logged] = [e for e in state["log_history"] if e["step"] == step and "eval_exact_match" in e]
    assert stage["eval_exact_match"] == logged["eval_exact_match"]
    assert not [key for key in stage if key.startswith(("test_", "final_eval_", "final_test_"))]
    assert state["best_model_checkpoint"] == str(tmp_path / "out" / "N2" / f"checkpoint-{step}")
    assert json.loads((tmp_path / "out" / "N2" / "run_config.json").read_text())["cli_args"]["max_eval_samples"] == 4


def test_selected_evaluation_of_a_run_never_evaluated_is_empty():
    from types import SimpleNamespace

    from training_experiment import selected_evaluation

    assert selected_evaluation(SimpleNamespace(best_model_checkpoint=None, log_history=[{"loss": 1.0, "step": 1}])) == {}
    state = SimpleNamespace(best_model_checkpoint="run/checkpoint-2", log_history=[
        {"eval_loss": 2.0, "step": 2}, {"loss": 1.0, "step": 2}, {"eval_loss": 1.0, "step": 4}])
    assert selected_evaluation(state) == {"eval_loss": 2.0}


def test_capacity_preset_dry_run():
    """scripts/run_kv_capacity.sh: the paper model, the stage list, the precision flags; a bad PRECISION is refused."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "run_kv_capacity.sh"
    env = {**os.environ, "DRY_RUN": "1", "SEED": "4", "STAGES": "2:0.9 8:0.95:K=3", "BUDGET_MINUTES": "5"}
    out = subprocess.run(["bash", str(script), "--eval_steps", "50"], env=env, capture_output=True, text=True,
                         check=True).stdout
    for part in ("run_gradmemgpt_kv_curriculum.py --stages 2:0.9 8:0.95:K=3", "--out_dir runs/kv_capacity/seed_4",
                 "--seed 4", "--time_budget_minutes 5", "-- --preset paper_kv", "--fp32 --tf32",
                 "--per_device_eval_batch_size 500", "--train_final_inner_loss false", "--eval_steps 50"):
        assert part in out, part
    bad = subprocess.run(["bash", str(script)], env={**env, "PRECISION": "fp16"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "PRECISION" in bad.stderr
