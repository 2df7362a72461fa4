"""End-to-end tests of run_gradmemgpt_on_kv_retrieval.py with a tiny GradMem on CPU (data generated on the spot)."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from grad_memgpt import PRESETS, GradMemArgs, GradMemGPT
import run_gradmemgpt_on_kv_retrieval as run_kv
from training_args import BackboneArgs, TrainArgs, parse_cli
from training_runs import gradmem_run_name

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_mem_tokens", "2", "--per_device_batch_size", "4",
        "--warmup_steps", "0", "--learning_rate", "1e-3", "--eval_steps", "2", "--logging_steps", "1",
        "--max_eval_samples", "8", "--dataloader_num_workers", "0", "--report_to", "none", "--use_cpu"]


def test_default_run_name_is_the_reference_scheme(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t, b, g = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, args=["--preset", "paper_kv"], presets=PRESETS)
    assert gradmem_run_name(t, b, g, world_size=1) == \
        "gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_64_lr_1e-04"
    t, b, g = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, presets=PRESETS, args=[
        "--preset", "paper_kv", "--K", "3", "--last_K_second_order", "1", "--mem_proj_mode", "proj", "--use_mem_proj",
        "--add_inner_loss_to_outer", "false", "--inner_loss_weight", "None", "--per_device_batch_size", "16",
        "--gradient_accumulation_steps", "2"])
    assert gradmem_run_name(t, b, g, world_size=2) == \
        "gradmem_llama_L4H4D128_mem8_K3_ilr0.04_last_K1_mem_proj_whead_grad_second_bs_64_lr_1e-04"
    t, b, g = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, args=[], presets=PRESETS)  # the model's defaults
    assert gradmem_run_name(t, b, g, world_size=1) == "gradmem_llama_L4H4D128_mem8_K2_ilr0.01_grad_second_bs_64_lr_1e-04"


def test_train_generated_kv_data_then_warm_start(tmp_path):
    data = tmp_path / "data" / "N2-K1V1-V62_64"  # does not exist: generated from its name
    metrics = run_kv.main(["--data_path", str(data), "--runs_dir", str(tmp_path / "runs"), "--max_steps", "2",
                           "--preset", "paper_kv", *TINY])
    assert (data / "train").is_dir() and (data / "kv_task.json").is_file()
    run_dir = tmp_path / "runs" / "N2-K1V1-V62_64" / \
        "gradmem_llama_L2H2D32_mem2_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_4_lr_1e-03" / "run_142"
    results = json.loads((run_dir / "all_results.json").read_text())
    for key in ("eval_exact_match", "eval_token_accuracy", "eval_inner_loss", "eval_inner_grad_norm_max",
                "eval_target_loss"):
        assert key in results and key in metrics, key
    config = json.loads((run_dir / "run_config.json").read_text())["cli_args"]
    assert config["inner_lr"] == 0.04 and config["grad_mode"] == "second" and config["n_embd"] == 32
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert any("inner_grad_norm_mean" in r and "loss" in r for r in history)  # inner stats logged while training
    model = GradMemGPT.from_pretrained(run_dir)  # the selected model at the run root, with its tokenizer
    assert model.config.base_config["hidden_size"] == 32 and AutoTokenizer.from_pretrained(run_dir).pad_token

    # warm start another run from the checkpoint folder
    other = run_kv.main(["--data_path", str(data), "--exp_path", str(tmp_path / "warm"), "--max_steps", "1",
                         "--init_checkpoint", str(run_dir / "checkpoint-2"), "--preset", "paper_kv", *TINY])
    assert other["global_step"] == 1


def test_bad_input_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="kv_dataset_utils.py"):
        run_kv.main(["--data_path", str(tmp_path / "my_dataset"), *TINY])
    with pytest.raises(ValueError, match="mutually exclusive"):
        run_kv.main(["--base_model", "llama", "--pretrained_model", "gpt2", *TINY])
    # data over the 512-symbol alphabet with the default 62-symbol tokenizer
    with pytest.raises(ValueError, match="kv_alphabet_512"):
        run_kv.main(["--data_path", str(tmp_path / "N2-K1V1-V512_32"), "--exp_path", str(tmp_path / "r"), *TINY])
    assert not (tmp_path / "r").exists()
    # a checkpoint of a model with another vocabulary
    big = run_kv.main(["--data_path", str(tmp_path / "N2-K1V1-V512_32"), "--exp_path", str(tmp_path / "v512"),
                       "--tokenizer_path", "./tokenizers/kv_alphabet_512/", "--max_steps", "1", *TINY])
    assert big["global_step"] == 1
    with pytest.raises(ValueError, match="another tokenizer/vocabulary"):
        run_kv.main(["--data_path", str(tmp_path / "N2-K1V1-V62_32"), "--exp_path", str(tmp_path / "v62"),
                     "--init_checkpoint", str(tmp_path / "v512" / "checkpoint-1"), "--max_steps", "1", *TINY])


def test_preset_script_arguments_parse(tmp_path, monkeypatch):
    """scripts/run_gradmemgpt_on_kv_retrieval.sh with a stand-in `accelerate` that records its arguments."""
    import os
    import subprocess
    from pathlib import Path

    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path}/calls.txt\necho END >> {tmp_path}/calls.txt\n')
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_gradmemgpt_on_kv_retrieval.sh"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "NP": "2", "SEEDS": "1 3"}
    subprocess.run(["bash", str(script), "--max_steps", "300"], check=True, env=env, stdout=subprocess.DEVNULL)
    calls = (tmp_path / "calls.txt").read_text().split("END\n")[:-1]
    assert len(calls) == 2
    for call, seed in zip(calls, ("143", "145")):
        argv = call.splitlines()
        assert argv[:2] == ["launch", "--config_file"]
        assert argv[argv.index("--num_processes") + 1] == "2"
        script_args = argv[argv.index("run_gradmemgpt_on_kv_retrieval.py") + 1:]
        monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it
        t, b, g, d = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, run_kv.DataArgs, args=script_args,
                               presets=PRESETS)
        assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.total_batch_size) == (32, 1, 64)
        assert (t.seed, t.max_steps, t.learning_rate, t.warmup_steps) == (int(seed), 300, 1e-4, 10000)
        assert (g.K, g.inner_lr, g.grad_mode, g.use_write_head, g.inner_loss_weight) == (2, 0.04, "second", True, 0.5)
        assert d.data_path == "./data/N8-K2V2-V62_1M" and b.n_embd == 128


def test_overwrite_refuses_a_data_folder_and_warm_starts_must_fit(tmp_path):
    data = tmp_path / "N2-K1V1-V62_32"
    base = ["--data_path", str(data), "--max_steps", "1", "--eval_steps", "1", *TINY]
    run_kv.main([*base, "--exp_path", str(tmp_path / "l1"), "--n_layer", "1"])
    listing = sorted(p.name for p in data.rglob("*"))
    with pytest.raises(ValueError, match="--overwrite refused: .* is not a run folder"):
        run_kv.main([*base, "--exp_path", str(data), "--overwrite"])
    assert sorted(p.name for p in data.rglob("*")) == listing
    # a 1-layer checkpoint into a 2-layer model, a GPT-2 run into a Llama model: errors unless meant
    with pytest.raises(ValueError, match="unloaded .*--init_checkpoint_partial"):
        run_kv.main([*base, "--exp_path", str(tmp_path / "l2"), "--init_checkpoint", str(tmp_path / "l1" / "checkpoint-1")])
    assert not (tmp_path / "l2").exists()
    run_kv.main([*base, "--exp_path", str(tmp_path / "gpt2"), "--base_model", "gpt2", "--n_layer", "1"])
    with pytest.raises(ValueError, match="unloaded"):
        run_kv.main([*base, "--exp_path", str(tmp_path / "llama"), "--n_layer", "1",
                     "--init_checkpoint", str(tmp_path / "gpt2" / "checkpoint-1")])


def test_contexts_must_fit_the_positions(tmp_path):
    data = ["--data_path", str(tmp_path / "N2-K1V1-V62_32"), "--exp_path", str(tmp_path / "r"), "--max_steps", "1", *TINY]
    with pytest.raises(ValueError, match="exceed the backbone's 8 positions; set --max_context_length 6"):
        run_kv.main([*data, "--max_position_embeddings", "8"])
    assert not (tmp_path / "r").exists()


def test_user_errors_exit_2_with_one_line():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "run_gradmemgpt_on_kv_retrieval.py"
    done = subprocess.run([sys.executable, str(script), "--max_context_length", "0", "--data_path", "no_such_data"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: --max_context_length must be >= 1 (or None: whole contexts), got 0"


def test_preset_dry_run_prints_and_runs_nothing(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(f"#!/usr/bin/env bash\necho called > {tmp_path}/called.txt\n")
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_gradmemgpt_on_kv_retrieval.sh"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "DRY_RUN": "1", "SEEDS": "1 2"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    assert not (tmp_path / "called.txt").exists()
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("accelerate launch") and "--seed 14" in line for line in lines)


def dry_run(preset: str, **env) -> list:
    """The run-script argument lists that `DRY_RUN=1 bash scripts/<preset>` prints, each with the launch's
    --mixed_precision (None without one). The curriculum's list is what it passes to every stage."""
    done = subprocess.run(["bash", str(REPO / "scripts" / preset)], capture_output=True, text=True, check=True,
                          env={**os.environ, "DRY_RUN": "1", **env})
    commands = []
    for line in done.stdout.splitlines():
        words = shlex.split(line.split(": ", 1)[-1]) if ".py" in line else []
        scripts = [i for i, word in enumerate(words) if word.startswith("run_") and word.endswith(".py")]
        if scripts:
            launch, args = words[: scripts[0]], words[scripts[0] + 1:]
            args = args[args.index("--") + 1:] if "--" in args else args
            commands.append((launch[launch.index("--mixed_precision") + 1] if "--mixed_precision" in launch else None,
                             args))
    return commands


def kv_cli_args(args: list) -> tuple:
    """(TrainArgs, the run record's cli_args) of a run_gradmemgpt_on_kv_retrieval.py command, as run_experiment
    records them."""
    from evaluation import SampleLogArgs
    from training_runs import flat_args

    parsed = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, run_kv.DataArgs, SampleLogArgs, args=args, presets=PRESETS)
    return parsed[0], {**flat_args(parsed), "mixed_precision": parsed[0].mixed_precision()}


# The model flags of the KV presets before `--preset paper_kv` replaced them: scripts/run_kv_capacity.sh's (the same in
# scripts/run_paper_claims.sh) and, now, their command; scripts/run_gradmemgpt_on_kv_retrieval.sh's old command is in
# the run record tests/data/paper_kv_run_record_before_presets.json.
EXPLICIT_PAPER_KV = ("--base_model llama --n_layer 4 --n_head 4 --n_embd 128 --tokenizer_path ./tokenizers/kv_alphabet_62/ "
                     "--n_mem_tokens 8 --K 2 --inner_lr 0.04 --grad_mode second --use_write_head "
                     "--add_inner_loss_to_outer --inner_loss_weight 0.5 --attn_implementation auto")
PRESET_PAPER_KV = "--preset paper_kv --base_model llama --tokenizer_path ./tokenizers/kv_alphabet_62/ --attn_implementation auto"


def test_runs_of_the_explicit_paper_flags_resume_under_the_preset(tmp_path, monkeypatch):
    """A run folder whose record was written before --preset existed (tests/data/paper_kv_run_record_before_presets.json:
    written by commit 676ea0e for scripts/run_gradmemgpt_on_kv_retrieval.sh, seed 143, one process, fp32) belongs to
    today's command of that preset: the record holds resolved values, they compare equal, and re-running resumes it.
    A changed model option is still refused."""
    from training_run_folder import plan_run_folder
    from training_runs import setting

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what the preset launches with PRECISION=fp32
    record = json.loads((REPO / "tests" / "data" / "paper_kv_run_record_before_presets.json").read_text())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps(record))
    [(launch_precision, args)] = dry_run("run_gradmemgpt_on_kv_retrieval.sh", SEEDS="1", PRECISION="fp32")
    assert launch_precision == "no" and "--preset" in args and "--inner_lr" not in args
    train_args, cli_args = kv_cli_args(args)
    assert setting(cli_args) == setting(record["cli_args"])
    assert plan_run_folder(run_dir, train_args, cli_args, 1).finished is None  # compared, resumable
    train_args, changed = kv_cli_args(args + ["--inner_lr", "0.05"])
    with pytest.raises(ValueError, match="other arguments .inner_lr: 0.04 -> 0.05"):
        plan_run_folder(run_dir, train_args, changed, 1)
    # the curriculum's and the paper-claims' runs: the old explicit flags and the preset record the same setting
    assert setting(kv_cli_args(shlex.split(EXPLICIT_PAPER_KV))[1]) == setting(kv_cli_args(shlex.split(PRESET_PAPER_KV))[1])
    [(_, stage_args)] = dry_run("run_kv_capacity.sh")
    assert " ".join(stage_args).startswith(PRESET_PAPER_KV)
    # a run started without --train_final_inner_loss false (a statistic only), --lean_ops true (the same functions,
    # less memory) or --recompute_write true (the same gradients, less memory) resumes with them, and the other way round
    preset = shlex.split(PRESET_PAPER_KV)
    for flags in (["--train_final_inner_loss", "false"], ["--lean_ops", "true"], ["--recompute_write", "true"]):
        assert setting(kv_cli_args(preset + flags)[1]) == setting(kv_cli_args(preset)[1])


@pytest.mark.parametrize("preset, env", [
    ("run_gradmemgpt_on_kv_retrieval.sh", {"SEEDS": "1"}),
    ("run_gpt_on_kv_retrieval.sh", {"SEEDS": "1"}),
    ("run_kv_capacity.sh", {}),
    ("run_paper_claims.sh", {"ONLY": "gradmem", "NS": "4", "SEEDS": "1", "GPUS": "0"}),
])
def test_precision_takes_the_same_values_with_the_same_meaning_in_every_preset(preset, env, monkeypatch):
    """PRECISION=fp32 | tf32 | bf16 in every preset that has it: strict fp32, fp32 with TF32 matmuls, bf16 autocast
    (as the run scripts' TrainArgs see it, whether it comes through accelerate launch or their own flags)."""
    from transformers import HfArgumentParser

    from training_args import _take_none_values

    for precision, meaning in (("fp32", ("no", False)), ("tf32", ("no", True)), ("bf16", ("bf16", False))):
        for launch_precision, args in dry_run(preset, PRECISION=precision, **env):
            args = _take_none_values([TrainArgs], args)[0]  # `--stop_metric_value None`, as parse_cli takes it
            train_args, _ = HfArgumentParser(TrainArgs).parse_args_into_dataclasses(args=args,
                                                                                    return_remaining_strings=True)
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch_precision or "no")
            assert (train_args.mixed_precision(), train_args.tf32) == meaning, (precision, args)
    refused = subprocess.run(["bash", str(REPO / "scripts" / preset)], capture_output=True, text=True,
                             env={**os.environ, "DRY_RUN": "1", "PRECISION": "no", **env})
    assert refused.returncode == 2 and "PRECISION must be fp32, tf32 or bf16, got no" in refused.stderr


def test_same_seed_same_first_20_losses(tmp_path):
    """Seeding happens before the model is built and the data order follows the seed: two runs with --seed 7 log
    the same first 20 training losses; --seed 8 does not."""
    data = tmp_path / "N2-K1V1-V62_256"

    def losses(exp, seed):
        run_kv.main(["--data_path", str(data), "--exp_path", str(tmp_path / exp), "--seed", str(seed),
                     "--max_steps", "20", *TINY, "--eval_steps", "20"])
        history = json.loads((tmp_path / exp / "trainer_state.json").read_text())["log_history"]
        return [r["loss"] for r in history if "loss" in r]

    first = losses("a", 7)
    assert len(first) == 20
    assert losses("b", 7) == first
    assert losses("c", 8) != first


def test_answer_samples_at_every_evaluation(tmp_path, caplog):
    data = tmp_path / "N2-K1V1-V62_32"
    base = ["--data_path", str(data), "--max_steps", "2", *TINY]  # evaluations at steps 0 and 2, then valid and test
    with caplog.at_level("INFO", logger="gradmem"):
        run_kv.main([*base, "--exp_path", str(tmp_path / "on"), "--log_samples", "2"])
    records = [json.loads(line) for line in (tmp_path / "on" / "samples.jsonl").read_text().splitlines()]
    assert all(set(r) == {"step", "split", "query", "target", "answer", "correct"} for r in records)
    evaluations = [(r["step"], r["split"]) for r in records[::2]]
    assert evaluations == [(0, "eval"), (2, "eval"), (2, "eval"), (2, "test")]
    assert [(r["step"], r["split"]) for r in records[1::2]] == evaluations  # two samples per evaluation
    valid = load_from_disk(str(data))["valid"]
    assert [(r["query"], r["target"]) for r in records[:2]] == [(valid[i]["query"], valid[i]["target"]) for i in (0, 1)]
    assert all(isinstance(r["answer"], str) and isinstance(r["correct"], bool) for r in records)
    assert "step 2 eval samples (query | target | generated answer)" in caplog.text
    assert repr(records[0]["query"]) in caplog.text

    run_kv.main([*base, "--exp_path", str(tmp_path / "off"), "--log_samples", "0"])
    assert (tmp_path / "off" / "all_results.json").is_file() and not (tmp_path / "off" / "samples.jsonl").exists()
    with pytest.raises(ValueError, match="--log_samples must be >= 0"):
        run_kv.main([*base, "--exp_path", str(tmp_path / "bad"), "--log_samples", "-1"])


def test_eval_K_writes_more_steps_when_evaluating_only(tmp_path):
    data = tmp_path / "N2-K1V1-V62_32"
    metrics = run_kv.main(["--data_path", str(data), "--exp_path", str(tmp_path / "r"), "--max_steps", "2", *TINY,
                           "--K", "1", "--eval_K", "3", "--eval_inner_lr", "0.02"])
    assert "eval_inner_loss_step_3" in metrics and "test_inner_loss_step_3" in metrics
    history = json.loads((tmp_path / "r" / "trainer_state.json").read_text())["log_history"]
    train_logs = [r for r in history if "loss" in r and "eval_loss" not in r]
    assert train_logs and all("inner_loss_step_1" in r and "inner_loss_step_2" not in r for r in train_logs)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["K"], config["eval_K"], config["eval_lr"]) == (1, 3, 0.02)
    with pytest.raises(ValueError, match=r"--eval_K \(inner steps outside training\) must be an integer >= 0"):
        run_kv.main(["--data_path", str(data), "--exp_path", str(tmp_path / "bad"), *TINY, "--eval_K", "-1"])
