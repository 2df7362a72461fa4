"""The baseline run scripts: RMT (run_rmt_on_kv_retrieval.py) and the full-context LM (run_gpt2_on_kv_retrieval.py)
train tiny models a few steps on CPU on a locally generated KV dataset; bad options fail before any work."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

from full_context_lm import FullContextArgs
import kv_dataset_utils
from rmt import RMT2Segm, RMTArgs
import run_gpt2_on_kv_retrieval
import run_rmt_on_kv_retrieval
from training_args import BackboneArgs
from training_backbone import load_tokenizer
from training_collators import CausalLMCollator
from training_runs import full_context_run_name, rmt_run_name

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32"]


@pytest.fixture(autouse=True)
def restore_precision_env(monkeypatch):
    """run_experiment writes ACCELERATE_MIXED_PRECISION into os.environ; undo it after each test."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))


@pytest.fixture(scope="module")
def kv_data(tmp_path_factory):
    """A 64/16-sample N2-K2V2-V62 dataset (contexts of 15 characters)."""
    spec = kv_dataset_utils.parse_dataset_name("N2-K2V2-V62")
    path = tmp_path_factory.mktemp("data") / "N2-K2V2-V62_64"
    kv_dataset_utils.save_kv_dataset(kv_dataset_utils.build_kv_dataset_dict(spec, 64, 16, seed=0), path, spec, 0)
    return str(path)


def cpu_args(run_dir, data_path, *extra):
    return ["--exp_path", str(run_dir), "--data_path", data_path, "--per_device_batch_size", "8", "--max_steps", "3",
            "--eval_steps", "3", "--logging_steps", "1", "--warmup_steps", "0", "--learning_rate", "3e-3",
            "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", *extra]


def check_run_folder(run_dir, steps=3, logging_steps=1):
    results = json.loads((run_dir / "all_results.json").read_text())
    assert results["global_step"] == steps and results["skipped_steps"] == 0
    for key in ("eval_loss", "eval_token_accuracy", "eval_exact_match"):
        assert key in results and results[key] == results[key], key  # present and not NaN
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == steps // logging_steps and all(torch.isfinite(torch.tensor(losses)))
    return results, history


# ------------------------------------------------------------------------------------------------------------ RMT

def test_rmt_trains_from_scratch_and_checkpoints_reload(tmp_path, kv_data):
    run_dir = tmp_path / "rmt"
    run_rmt_on_kv_retrieval.main(cpu_args(run_dir, kv_data, *TINY, "--n_mem_tokens", "4",
                                          "--use_mem_proj", "--mem_proj_mode", "proj"))
    results, history = check_run_folder(run_dir)
    assert "eval_mem_norm_mean" in results and "eval_target_loss" in results
    assert all("mem_norm_mean" in r for r in history if "loss" in r)  # model stats in the training logs
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples[:6]] == [0, 0, 0, 3, 3, 3] and "answer" in samples[0]  # 3 per evaluation
    config = json.loads((run_dir / "run_config.json").read_text())["cli_args"]
    assert config["mem_proj_mode"] == "proj" and config["K"] == 1
    model = AutoModel.from_pretrained(run_dir / "checkpoint-3")
    assert isinstance(model, RMT2Segm) and model.config.mem_proj_mode == "proj"
    assert isinstance(RMT2Segm.from_pretrained(run_dir), RMT2Segm)  # the selected model at the run root


def test_rmt_all_options_gpt2_backbone(tmp_path, kv_data):
    run_dir = tmp_path / "rmt_opts"
    run_rmt_on_kv_retrieval.main(cpu_args(
        run_dir, kv_data, *TINY, "--base_model", "gpt2", "--n_mem_tokens", "2", "--K", "2", "--n_ctrl_tokens", "1",
        "--use_mem_proj", "--mem_proj_mode", "proj_rw", "--use_reconstruction_loss", "--reconstruction_loss_weight",
        "0.5", "--use_write_head", "--use_mem_residual", "--use_gradient_checkpointing", "--max_context_length", "8",
        "--attn_implementation", "sdpa"))
    results, _ = check_run_folder(run_dir)
    assert "eval_rec_loss" in results and "eval_step_delta_mem_norm_mean" in results


def test_rmt_accepts_a_pretrained_model(tmp_path, kv_data):
    """The reference rejected --pretrained_model (its --base_model defaulted to gpt2); a local folder works here."""
    tokenizer = load_tokenizer(BackboneArgs(tokenizer_path="./tokenizers/kv_alphabet_62/"))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    run_dir = tmp_path / "rmt_pretrained"
    run_rmt_on_kv_retrieval.main(cpu_args(run_dir, kv_data, "--pretrained_model", str(tmp_path / "lm"),
                                          "--n_mem_tokens", "2", "--max_steps", "2", "--eval_steps", "2"))
    check_run_folder(run_dir, steps=2)


@pytest.mark.parametrize("extra, message", [
    (["--K", "0"], "K=0"),
    (["--mem_proj_mode", "proj", "--use_mem_proj", "false"], "contradicts"),
    (["--use_mem_residual"], "use_mem_residual needs K >= 2"),
    (["--reconstruction_loss_weight", "0.5"], "no effect"),
    (["--base_model", "mamba"], "transformer backbone"),
    (["--base_model", "llama", "--pretrained_model", "gpt2"], "mutually exclusive"),
])
def test_rmt_bad_options_fail_before_any_work(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_rmt_on_kv_retrieval.main(cpu_args(tmp_path / "run", str(tmp_path / "no_such_data"), *extra))
    assert not (tmp_path / "run").exists()


def test_rmt_write_head_without_reconstruction_loss_is_not_built(caplog):
    """The reference's SQuAD/phonebook presets pass --use_write_head alone (a head nothing used): warned, not built."""
    args = RMTArgs(use_write_head=True)
    with caplog.at_level("WARNING", logger="gradmem"):
        args.validate()
    assert args.use_write_head is False and "none is built" in caplog.text


def test_rmt_run_name():
    from training_args import TrainArgs

    name = rmt_run_name(
        TrainArgs(per_device_batch_size=64), BackboneArgs(base_model="llama"),
        RMTArgs(use_mem_proj=True, mem_proj_mode="proj"), world_size=1)
    assert name == "rmt2segm_llama_L4H4D128_mem8_mem_proj_bs_64_lr_1e-04"


# ------------------------------------------------------------------------------------------------------------ full context

def test_full_context_llama_trains_resumes_and_warm_starts(tmp_path, kv_data):
    run_dir = tmp_path / "llama"
    args = cpu_args(run_dir, kv_data, *TINY, "--base_model", "llama", "--max_position_embeddings", "64")
    run_gpt2_on_kv_retrieval.main(args)
    results, _ = check_run_folder(run_dir)
    assert 0 <= results["eval_generated_exact_match"] <= 1 and results["eval_generated_samples"] == 16  # as RMT's
    assert AutoModelForCausalLM.from_pretrained(run_dir).config.model_type == "llama"  # the selected model at the root
    # re-running with a larger budget resumes from checkpoint-3
    run_gpt2_on_kv_retrieval.main(args[:args.index("--max_steps")] + ["--max_steps", "4"]
                                  + args[args.index("--max_steps") + 2:])
    assert json.loads((run_dir / "run_config.json").read_text())["resumed_from"].endswith("checkpoint-3")
    assert json.loads((run_dir / "all_results.json").read_text())["global_step"] == 4
    # a new run warm-started from that checkpoint starts from its weights: its step-0 eval equals the old step-4 eval
    warm_dir = tmp_path / "warm"
    run_gpt2_on_kv_retrieval.main(cpu_args(warm_dir, kv_data, *TINY, "--base_model", "llama",
                                           "--max_position_embeddings", "64", "--init_checkpoint",
                                           str(run_dir / "checkpoint-4"), "--learning_rate", "1e-12"))
    history = json.loads((warm_dir / "trainer_state.json").read_text())["log_history"]
    first_eval = next(r for r in history if r.get("step") == 0 and "eval_loss" in r)
    old_history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    step4_eval = next(r for r in old_history if r.get("step") == 4 and "eval_loss" in r)
    assert first_eval["eval_loss"] == pytest.approx(step4_eval["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("base_model", ["mamba", "gpt2", "pythia"])
def test_full_context_other_backbones_train(tmp_path, kv_data, base_model):
    run_dir = tmp_path / base_model
    run_gpt2_on_kv_retrieval.main(cpu_args(run_dir, kv_data, *TINY, "--base_model", base_model,
                                           "--max_input_length", "16", "--max_steps", "2", "--eval_steps", "2"))
    results, _ = check_run_folder(run_dir, steps=2)
    assert 0 <= results["eval_generated_exact_match"] <= 1  # generated answers for every backbone, mamba too


def test_max_input_length_drops_the_start_of_the_context(kv_data):
    import datasets

    tokenizer = load_tokenizer(BackboneArgs(tokenizer_path="./tokenizers/kv_alphabet_62/"))
    example = datasets.load_from_disk(kv_data)["valid"][0]
    full = CausalLMCollator(tokenizer, pad_to_multiple_of=None)([example])
    cut = CausalLMCollator(tokenizer, max_input_length=12, pad_to_multiple_of=None)([example])
    assert cut["input_ids"].shape[1] == 12
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, -12:])
    assert torch.equal(cut["labels"][0], full["labels"][0, -12:])  # the target survives whole
    assert (cut["labels"] != -100).sum() == (full["labels"] != -100).sum()


@pytest.mark.parametrize("extra, message", [
    (["--base_model", "mamba", "--attn_implementation", "sdpa"], "mamba has no attention"),
    (["--max_context_length", "8"], "--max_input_length"),
    (["--max_input_length", "0"], "max_input_length must be >= 1"),
    (["--attn_implementation", "flash_typo"], "unknown attn_implementation"),
    (["--base_model", "llama", "--pretrained_model", "gpt2"], "mutually exclusive"),
])
def test_full_context_bad_options_fail_before_any_work(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_gpt2_on_kv_retrieval.main(cpu_args(tmp_path / "run", str(tmp_path / "no_such_data"), *extra))
    assert not (tmp_path / "run").exists()


def test_full_context_sequences_must_fit_the_positions(tmp_path, kv_data):
    with pytest.raises(ValueError, match="do not fit the model's 16 positions"):
        run_gpt2_on_kv_retrieval.main(cpu_args(tmp_path / "run", kv_data, *TINY, "--base_model", "gpt2",
                                               "--max_position_embeddings", "16"))
    assert not (tmp_path / "run").exists()


def test_full_context_run_name():
    from training_args import TrainArgs

    name = full_context_run_name(
        TrainArgs(per_device_batch_size=64, learning_rate=5e-5, adam_beta2=0.98),
        BackboneArgs(base_model="llama", max_position_embeddings=1024), FullContextArgs(), 1)
    assert name == "llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98"
    name = full_context_run_name(
        TrainArgs(per_device_batch_size=64, learning_rate=3e-4), BackboneArgs(base_model="mamba"),
        FullContextArgs(), 1)
    assert name == "mamba_L4D128_bs_64_lr_3e-04"


# ------------------------------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("preset, module", [("run_rmt_on_kv_retrieval.sh", run_rmt_on_kv_retrieval),
                                            ("run_gpt_on_kv_retrieval.sh", run_gpt2_on_kv_retrieval)])
def test_presets_train(tmp_path, kv_data, preset, module):
    """The preset's own model and flags (paper sizes), shrunk to 2 steps of batch 8 on the tiny dataset: its
    command (DRY_RUN=1 prints it) is run in this process (an `accelerate launch` of the same command adds only the
    launcher's start-up)."""
    data = Path(kv_data)
    run_dir = tmp_path / "run"
    env = dict(os.environ, DATA_DIR=str(data.parent), DATA_NAME=data.name, TBS="8", PER_DEVICE="8", MAX_STEPS="2",
               EVAL_STEPS="2", WARMUP="0", SEEDS="1", DRY_RUN="1")
    extra = ["--exp_path", str(run_dir), "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"]
    printed = subprocess.run(["bash", str(REPO / "scripts" / preset), *extra], env=env, capture_output=True,
                             text=True, check=True).stdout
    command = shlex.split(printed)
    script = module.__name__ + ".py"
    assert command[:2] == ["accelerate", "launch"] and command.count(script) == 1
    args = command[command.index(script) + 1 :]
    assert ("--bf16" in args) == (module is run_gpt2_on_kv_retrieval)  # RMT preset: fp32; full context: bf16
    module.main(args)
    check_run_folder(run_dir, steps=2, logging_steps=2)
    cli = json.loads((run_dir / "run_config.json").read_text())["cli_args"]
    assert (cli["n_layer"], cli["n_head"], cli["n_embd"], cli["seed"]) == (4, 4, 128, 143)
