"""The reference implementation's preset command lines run here unchanged, through each run script's main(argv).

Each REFERENCE_* string below is the argument list of one reference preset (scripts/*.sh of the reference
implementation, with its shell variables filled in for seed 1): names, values and hub ids as the reference passed
them. A test appends trailing flags that override only the sizes (tiny models, 2 steps), the data and model
locations (tiny local folders instead of hub ids) and the output folder; everything else is parsed and used as the
reference wrote it. README "Reference command lines" maps every reference script and preset to its counterpart.
"""
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict

import babi_utils
import kv_dataset_utils
import phonebook_utils
import run_gpt2_on_babi
import run_gpt2_on_kv_retrieval
import run_gpt2_on_squad
import run_gradmemgpt_on_kv_retrieval
import run_gradmemgpt_on_squad
import run_gradmemgpt_on_squad_cq_a
import run_rmt_on_kv_retrieval
import run_rmt_on_squad
import squad_utils
from grad_memgpt import GradMemGPT, GradMemGPTConfig
from make_local_gpt2 import save_local_gpt2

DATA = Path(__file__).parent / "data"

REFERENCE_GRADMEM_KV = """
    --data_path ./data/N8-K2V2-V62_1M --base_model llama --n_layer 4 --n_head 4 --n_embd 128
    --tokenizer_path ./tokenizers/kv_alphabet_62/ --exp_path ./runs/N8-K2V2-V62_1M/gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_add_inner_w0.5_bs_64_lr_1e-04/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 1 --total_batch_size 64
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 1000000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --n_mem_tokens 8 --n_ctrl_tokens 0 --K 2 --last_K_second_order 2 --inner_lr 0.04 --use_adam false
    --grad_mode second --use_write_head --add_inner_loss_to_outer --inner_loss_weight 0.5
"""
REFERENCE_RMT_KV = """
    --data_path ./data/N16-K2V2-V62_1M --base_model llama --n_layer 4 --n_head 4 --n_embd 128
    --tokenizer_path ./tokenizers/kv_alphabet_62/ --exp_path ./runs/N16-K2V2-V62_1M/rmt2segm_llama_L4H4D128_mem8_proj_bs_64_lr_1e-04/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 1 --total_batch_size 64
    --learning_rate 1e-4 --adam_beta1 0.9 --adam_beta2 0.999 --lr_scheduler_type constant_with_warmup
    --warmup_steps 2000 --max_steps 1000000 --eval_steps 500 --logging_steps 500 --early_stopping_patience 500
    --seed 143 --n_mem_tokens 8 --n_ctrl_tokens 0 --K 1 --use_mem_proj --mem_proj_mode proj
    --reconstruction_loss_weight 1.0 --attn_implementation eager
"""
REFERENCE_GPT_KV = """
    --data_path ./data/N96-K2V2-V62_1M --base_model llama --n_layer 4 --n_head 4 --n_embd 128
    --max_position_embeddings 1024 --tokenizer_path ./tokenizers/kv_alphabet_62/
    --exp_path ./runs/N96-K2V2-V62_1M/llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98_init_N64/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 1 --total_batch_size 64
    --learning_rate 5e-5 --adam_beta2 0.98 --lr_scheduler_type constant_with_warmup --warmup_steps 10000
    --max_steps 200000 --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --init_checkpoint ./runs/N64-K2V2-V62_1M/llama_L4H4D128_L1024_bs_64_lr_5e-05_b2_0.98/run_3/checkpoint-168500/model.safetensors
    --overwrite_output_dir
"""
REFERENCE_GRADMEM_BABI = """
    --data_path ./data/babilong_qa2_0k --pretrained_model gpt2
    --exp_path ./runs/babilong_qa2_0k/gradmem_gpt2_mem8_K2_ilr0.04_proj_whead_grad_second_bs_64_lr_1e-04/run_1
    --per_device_batch_size 16 --gradient_accumulation_steps 4 --total_batch_size 64
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --n_mem_tokens 8 --n_ctrl_tokens 0 --K 2 --inner_lr 0.04 --use_adam false --grad_mode second
    --use_mem_proj --mem_proj_mode proj --use_write_head
"""
REFERENCE_GPT_BABI = """
    --data_path ./data/babilong_qa1_0k --pretrained_model state-spaces/mamba-130m-hf
    --exp_path ./runs/babilong_qa1_0k/mamba-130m-hf_bs_64_lr_1e-04/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 1 --total_batch_size 64
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
"""
REFERENCE_GRADMEM_SQUAD = """
    --data_path ./data/squad --pretrained_model gpt2
    --exp_path ./runs/squad/gradmem_gpt2_mem8_K2_ilr0.25_proj_whead_grad_second_bs_64_lr_1e-04/run_1
    --per_device_batch_size 32 --gradient_accumulation_steps 2 --total_batch_size 64
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --n_mem_tokens 8 --n_ctrl_tokens 0 --K 2 --inner_lr 0.25 --use_adam false --grad_mode second
    --use_mem_proj --mem_proj_mode proj --use_write_head --use_gradient_checkpointing false
"""
REFERENCE_GRADMEM_SQUAD_CQ_A = """
    --data_path ./data/squad --pretrained_model gpt2
    --exp_path ./runs/squad_cq_a/gradmem_gpt2_mem8_K2_ilr0.03_proj_whead_grad_second_bs_64_lr_1e-04/run_1
    --per_device_batch_size 32 --gradient_accumulation_steps 2 --total_batch_size 64
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --n_mem_tokens 8 --n_ctrl_tokens 0 --K 2 --last_K_second_order 2 --inner_lr 0.03 --use_adam false
    --grad_mode second --use_mem_proj --mem_proj_mode proj --use_write_head
"""
REFERENCE_GRADMEM_PHONEBOOK = """
    --dataset_name booydar/phonebook_N8 --pretrained_model gpt2 --attn_implementation eager
    --exp_path /cluster/home/runs/phonebook_N8/gradmem_gpt2_mem32_K5_ilr0.4_whead_grad_second_bs_256_lr_1e-04_init_4p/run_1
    --init_checkpoint /cluster/home/runs/phonebook_N8/gradmem_gpt2_mem32_K2_ilr0.4_whead_grad_second_bs_256_lr_1e-04_init_4p/run_1/checkpoint-110500/model.safetensors
    --per_device_batch_size 64 --gradient_accumulation_steps 4 --total_batch_size 256
    --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
    --n_mem_tokens 32 --n_ctrl_tokens 0 --K 2 --inner_lr 0.4 --use_adam false --grad_mode second --use_write_head
"""
REFERENCE_RMT_SQUAD = """
    --dataset_name squad --pretrained_model gpt2
    --exp_path ./runs/squad/rmt2segm_gpt2_mem64_mem_proj_whead_bs_64_lr_3e-04/run_1
    --per_device_batch_size 16 --gradient_accumulation_steps 4 --total_batch_size 64
    --learning_rate 3e-4 --adam_beta1 0.9 --adam_beta2 0.999 --lr_scheduler_type constant_with_warmup
    --warmup_steps 10000 --max_steps 75000 --eval_steps 500 --logging_steps 500 --early_stopping_patience 500
    --seed 143 --n_mem_tokens 64 --n_ctrl_tokens 0 --K 1 --use_mem_proj --mem_proj_mode proj --use_write_head
    --reconstruction_loss_weight 1.0 --attn_implementation eager
"""
REFERENCE_RMT_PHONEBOOK = """
    --dataset_name booydar/phonebook_N8 --pretrained_model gpt2
    --exp_path /cluster/home/runs/phonebook_N8/rmt2segm_gpt2_mem32_mem_proj_whead_bs_256_lr_1e-03/run_1
    --per_device_batch_size 128 --gradient_accumulation_steps 2 --total_batch_size 256
    --learning_rate 1e-3 --adam_beta1 0.9 --adam_beta2 0.999 --lr_scheduler_type constant_with_warmup
    --warmup_steps 10000 --max_steps 200000 --eval_steps 500 --logging_steps 500 --early_stopping_patience 500
    --seed 143 --n_mem_tokens 32 --n_ctrl_tokens 0 --K 1 --use_mem_proj --mem_proj_mode proj --use_write_head
"""
REFERENCE_GPT2_SQUAD = """
    --dataset_name squad --pretrained_model gpt2 --exp_path ./runs/squad/gpt2_bs_64_lr_1e-04/run_1
    --per_device_batch_size 32 --gradient_accumulation_steps 2 --total_batch_size 64
    --learning_rate 1e-4 --adam_beta1 0.9 --adam_beta2 0.999 --lr_scheduler_type constant_with_warmup
    --warmup_steps 10000 --max_steps 200000 --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
"""
REFERENCE_GPT_PHONEBOOK = """
    --dataset_name booydar/phonebook_N8 --pretrained_model gpt2
    --exp_path /cluster/home/runs/phonebook_N8/gpt2_bs_256_lr_3e-04/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 4 --total_batch_size 256
    --learning_rate 3e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
"""
REFERENCE_MAMBA_PHONEBOOK = """
    --dataset_name booydar/phonebook_N8 --pretrained_model state-spaces/mamba-130m-hf
    --exp_path /cluster/home/runs/phonebook_N8/mamba-130m-hf_bs_256_lr_3e-04/run_1
    --per_device_batch_size 64 --gradient_accumulation_steps 4 --total_batch_size 256
    --learning_rate 3e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10000 --max_steps 200000
    --eval_steps 500 --logging_steps 500 --early_stopping_patience 500 --seed 143
"""


def shrink(run_dir, batch=2, steps=2) -> list:
    """Trailing flags that override only sizes, the output folder and the environment (CPU, no tensorboard)."""
    return ["--exp_path", str(run_dir), "--per_device_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--total_batch_size", str(batch), "--max_steps", str(steps), "--eval_steps", str(steps),
            "--logging_steps", "1", "--warmup_steps", "0", "--use_cpu", "--report_to", "none",
            "--dataloader_num_workers", "0"]


TINY_SCRATCH = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32"]


def reference(command: str, *without: str) -> list:
    """The command's arguments, less the options named in `without` (and their values)."""
    args = shlex.split(command)
    for option in without:
        i = args.index(option)
        del args[i: i + (1 if i + 1 == len(args) or args[i + 1].startswith("--") else 2)]
    return args


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "all_results.json").read_text())


def run_record(run_dir) -> dict:
    return json.loads((Path(run_dir) / "run_config.json").read_text())["cli_args"]


@pytest.fixture(autouse=True)
def restore_precision_env(monkeypatch):
    """run_experiment writes ACCELERATE_MIXED_PRECISION into os.environ; undo it after each test."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))


@pytest.fixture(scope="module")
def kv_data(tmp_path_factory) -> str:
    spec = kv_dataset_utils.parse_dataset_name("N2-K2V2-V62")
    path = tmp_path_factory.mktemp("data") / "N2-K2V2-V62_32"
    kv_dataset_utils.save_kv_dataset(kv_dataset_utils.build_kv_dataset_dict(spec, 32, 8, seed=0), path, spec, 0)
    return str(path)


@pytest.fixture(scope="module")
def babi_data(tmp_path_factory) -> str:
    """bAbI qa1 from the test's text files, saved like the reference's babilong_qa*_0k folders (context/query/target)."""
    path = tmp_path_factory.mktemp("data") / "babilong_qa1_0k"
    splits = babi_utils.load_babi_text(str(DATA / "babi"), "qa1")
    DatasetDict({name: rows.select(range(min(8, len(rows)))) for name, rows in splits.items()}).save_to_disk(path)
    return str(path)


@pytest.fixture(scope="module")
def phonebook_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "phonebook_N4"
    phonebook_utils.build_phonebook_dataset(4, n_train=8, n_valid=4, seed=1).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, phonebook_data) -> str:
    """A local stand-in for the hub's `gpt2`: byte-level BPE trained on the test texts + a 2-layer width-32 GPT-2."""
    texts = []
    for row in babi_utils.read_babi_file(str(DATA / "babi" / "qa1_train.txt")):
        texts += [row["context"], row["query"] + row["target"]]
    rows = squad_utils.read_squad_v1_json(str(DATA / "squad" / "train-v1.1.json"))
    texts += list(rows["context"]) + list(rows["question"])
    texts += list(phonebook_utils.build_phonebook_dataset(4, 20, 2, seed=0)["train"]["context"])
    return save_local_gpt2(str(tmp_path_factory.mktemp("gpt2")), texts, vocab_size=600, n_positions=256)


# ------------------------------------------------------------------------------------------------ KV retrieval

def test_gradmem_kv_preset(tmp_path, kv_data):
    run_dir = tmp_path / "run"
    run_gradmemgpt_on_kv_retrieval.main(reference(REFERENCE_GRADMEM_KV) + shrink(run_dir) + TINY_SCRATCH
                                        + ["--data_path", kv_data])
    assert results(run_dir)["global_step"] == 2
    record = run_record(run_dir)
    assert (record["K"], record["inner_lr"], record["use_adam"], record["inner_loss_weight"]) == (2, 0.04, False, 0.5)


def test_rmt_kv_preset(tmp_path, kv_data):
    run_dir = tmp_path / "run"
    run_rmt_on_kv_retrieval.main(reference(REFERENCE_RMT_KV) + shrink(run_dir) + TINY_SCRATCH
                                 + ["--data_path", kv_data])
    assert results(run_dir)["global_step"] == 2 and run_record(run_dir)["mem_proj_mode"] == "proj"


def test_full_context_kv_preset_warm_start_resume_and_eval_only(tmp_path, kv_data):
    """The reference's N64 -> N96 workflow: a first run, then the preset warm-started from its checkpoint file with
    --overwrite_output_dir (continue the folder); re-running continues it; --do_eval_only re-evaluates its best
    checkpoint without training and gives the numbers of the run's final evaluation."""
    first, run_dir = tmp_path / "n64", tmp_path / "n96"
    tiny = TINY_SCRATCH + ["--max_position_embeddings", "64", "--data_path", kv_data]
    command, no_init = reference(REFERENCE_GPT_KV), reference(REFERENCE_GPT_KV, "--init_checkpoint")
    run_gpt2_on_kv_retrieval.main(no_init + shrink(first) + tiny)
    init = ["--init_checkpoint", str(first / "checkpoint-2" / "model.safetensors")]
    run_gpt2_on_kv_retrieval.main(command + shrink(run_dir) + tiny + init)
    assert results(run_dir)["global_step"] == 2
    assert "overwrite_output_dir" not in run_record(run_dir)  # a run-folder switch, not a training setting
    # the same command with a larger budget continues the folder (the reference's meaning of --overwrite_output_dir)
    run_gpt2_on_kv_retrieval.main(command + shrink(run_dir, steps=3) + tiny + init)
    assert json.loads((run_dir / "run_config.json").read_text())["resumed_from"].endswith("checkpoint-2")
    trained = results(run_dir)
    (run_dir / "run_config.json").unlink()  # eval-only needs nothing but the checkpoints
    metrics = run_gpt2_on_kv_retrieval.main(command + shrink(run_dir, steps=3) + tiny + ["--do_eval_only"])
    saved = json.loads((run_dir / "eval_only_results.json").read_text())
    assert saved == metrics
    assert Path(saved["evaluated_checkpoint"]).name == Path(trained["best_model_checkpoint"]).name
    for key in ("eval_loss", "eval_token_accuracy", "eval_exact_match"):
        assert saved[key] == pytest.approx(trained[key], rel=1e-5), key
    assert results(run_dir) == trained  # nothing else was written
    # --init_checkpoint names the weights to evaluate, into a folder of its own
    other = tmp_path / "eval_first"
    metrics = run_gpt2_on_kv_retrieval.main(no_init + shrink(other) + tiny + init + ["--do_eval_only"])
    assert Path(metrics["evaluated_checkpoint"]) == Path(init[1])
    assert sorted(p.name for p in other.iterdir()) == ["eval_only_results.json"]


def test_full_context_eval_only_and_overwrite_errors(tmp_path, kv_data):
    args = reference(REFERENCE_GPT_KV, "--init_checkpoint", "--overwrite_output_dir") + shrink(tmp_path / "run") + TINY_SCRATCH + [
        "--max_position_embeddings", "64", "--data_path", kv_data]
    with pytest.raises(ValueError, match="holds no usable checkpoint to evaluate"):
        run_gpt2_on_kv_retrieval.main(args + ["--do_eval_only"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="contradicts --do_eval_only"):
        run_gpt2_on_kv_retrieval.main(args + ["--do_eval_only", "--overwrite"])
    with pytest.raises(ValueError, match="contradicts --overwrite_output_dir"):
        run_gpt2_on_kv_retrieval.main(args + ["--overwrite_output_dir", "--overwrite"])


# ------------------------------------------------------------------------------------------------ bAbI

def test_gradmem_babi_preset(tmp_path, babi_data, gpt2_dir):
    run_dir = tmp_path / "run"
    run_gradmemgpt_on_kv_retrieval.main(reference(REFERENCE_GRADMEM_BABI) + shrink(run_dir) + [
        "--pretrained_model", gpt2_dir, "--data_path", babi_data])
    assert results(run_dir)["global_step"] == 2
    assert run_record(run_dir)["mem_proj_mode"] == "proj"


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory, gpt2_dir) -> str:
    """A local stand-in for state-spaces/mamba-130m-hf: a tiny randomly initialised Mamba with the GPT-2 tokenizer."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    path = tmp_path_factory.mktemp("mamba")
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("module", [run_gpt2_on_kv_retrieval, run_gpt2_on_babi])
def test_full_context_babi_preset_with_mamba(tmp_path, babi_data, mamba_dir, module):
    """The reference ran it through its KV script; run_gpt2_on_babi.py adds the test split and generated answers."""
    run_dir = tmp_path / "run"
    module.main(reference(REFERENCE_GPT_BABI) + shrink(run_dir) + [
        "--pretrained_model", mamba_dir, "--data_path", babi_data]
        + (["--generation_max_new_tokens", "4"] if module is run_gpt2_on_babi else []))
    assert results(run_dir)["global_step"] == 2
    if module is run_gpt2_on_babi:
        assert {"test_squad_exact_match", "test_squad_f1"} <= set(results(run_dir))


# ------------------------------------------------------------------------------------------------ SQuAD, phonebook

def test_gradmem_squad_preset_accepts_data_path(tmp_path, gpt2_dir, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="gradmem"):
        run_gradmemgpt_on_squad.main(reference(REFERENCE_GRADMEM_SQUAD) + shrink(run_dir) + [
            "--pretrained_model", gpt2_dir, "--squad_json", str(DATA / "squad"), "--generation_max_new_tokens", "4"])
    assert "--data_path ./data/squad is not read" in caplog.text
    assert results(run_dir)["global_step"] == 2
    record = run_record(run_dir)
    # the reference's SQuAD script had no inner-loss option: off by default here
    assert record["add_inner_loss_to_outer"] is False and record["inner_loss_weight"] is None
    assert (record["inner_lr"], record["mem_proj_mode"], record["use_write_head"]) == (0.25, "proj", True)


def test_gradmem_squad_cq_a_preset_under_its_own_script_name(tmp_path, gpt2_dir):
    run_dir = tmp_path / "run"
    run_gradmemgpt_on_squad_cq_a.main(reference(REFERENCE_GRADMEM_SQUAD_CQ_A) + shrink(run_dir) + [
        "--pretrained_model", gpt2_dir, "--squad_json", str(DATA / "squad"), "--generation_max_new_tokens", "4"])
    record = run_record(run_dir)
    assert (record["layout"], record["last_K_second_order"], record["inner_lr"]) == ("cq_a", 2, 0.03)
    with pytest.raises(ValueError, match="this script's layout is cq_a"):
        run_gradmemgpt_on_squad_cq_a.main(["--layout", "c_q"])


def test_gradmem_phonebook_preset_with_warm_start(tmp_path, gpt2_dir, phonebook_data):
    """The reference's phonebook preset warm-starts from a model.safetensors of an earlier run of the same model."""
    init = tmp_path / "init"
    GradMemGPT(GradMemGPTConfig(pretrained_model=gpt2_dir, n_mem_tokens=32, K=2, lr=0.4,
                                use_write_head=True)).save_pretrained(init)
    run_dir = tmp_path / "run"
    run_gradmemgpt_on_squad.main(reference(REFERENCE_GRADMEM_PHONEBOOK) + shrink(run_dir) + [
        "--pretrained_model", gpt2_dir, "--dataset_name", phonebook_data,
        "--init_checkpoint", str(init / "model.safetensors"), "--generation_max_new_tokens", "4"])
    assert results(run_dir)["global_step"] == 2 and run_record(run_dir)["n_mem_tokens"] == 32


def test_rmt_squad_preset(tmp_path, gpt2_dir, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="gradmem"):
        run_rmt_on_squad.main(reference(REFERENCE_RMT_SQUAD) + shrink(run_dir) + [
            "--pretrained_model", gpt2_dir, "--squad_json", str(DATA / "squad"), "--n_mem_tokens", "4",
            "--generation_max_new_tokens", "4"])
    assert "--use_write_head without --use_reconstruction_loss" in caplog.text
    assert "eval_squad_f1" in results(run_dir)
    record = run_record(run_dir)
    assert (record["learning_rate"], record["mem_proj_mode"], record["use_write_head"]) == (3e-4, "proj", False)


@pytest.mark.parametrize("command, module", [(REFERENCE_RMT_PHONEBOOK, run_rmt_on_squad),
                                             (REFERENCE_GPT_PHONEBOOK, run_gpt2_on_squad),
                                             (REFERENCE_MAMBA_PHONEBOOK, run_gpt2_on_squad)],
                         ids=["rmt", "gpt2", "mamba"])
def test_baseline_phonebook_presets_through_the_squad_scripts(tmp_path, gpt2_dir, mamba_dir, phonebook_data, command,
                                                              module):
    """The reference trained phonebook through its SQuAD scripts: the dataset is recognised by its columns."""
    run_dir = tmp_path / "run"
    model = mamba_dir if "mamba" in command else gpt2_dir
    sizes = ["--n_mem_tokens", "4"] if module is run_rmt_on_squad else []
    module.main(reference(command) + shrink(run_dir) + sizes + [
        "--pretrained_model", model, "--dataset_name", phonebook_data, "--generation_max_new_tokens", "4"])
    saved = results(run_dir)
    assert saved["global_step"] == 2 and "eval_squad_exact_match" in saved
    assert run_record(run_dir)["dataset_name"] == phonebook_data


def test_gpt2_squad_preset(tmp_path, gpt2_dir):
    run_dir = tmp_path / "run"
    run_gpt2_on_squad.main(reference(REFERENCE_GPT2_SQUAD) + shrink(run_dir) + [
        "--pretrained_model", gpt2_dir, "--squad_json", str(DATA / "squad"), "--generation_max_new_tokens", "4"])
    saved = results(run_dir)
    assert 0.0 <= saved["eval_squad_f1"] <= 1.0 and run_record(run_dir)["learning_rate"] == 1e-4


# ------------------------------------------------------------------------------------------------ --dataset_name

def test_dataset_name_local_folder_or_a_clear_error(tmp_path, gpt2_dir, monkeypatch):
    import datasets

    def no_hub(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)  # never download, whatever the machine can reach
    # a local save_to_disk copy of the hub's squad (splits train / validation, hub columns)
    raw = DatasetDict({"train": squad_utils.read_squad_v1_json(str(DATA / "squad" / "train-v1.1.json")),
                       "validation": squad_utils.read_squad_v1_json(str(DATA / "squad" / "dev-v1.1.json"))})
    raw.save_to_disk(str(tmp_path / "squad"))
    local = squad_utils.load_squad("c_q", dataset_name=str(tmp_path / "squad"))
    assert set(local) == {"train", "valid"} and len(local["valid"]) == len(raw["validation"])
    assert local["train"][0] == squad_utils.load_squad("c_q", squad_json=str(DATA / "squad"))["train"][0]
    # hub ids that cannot be loaded: one clear error naming the fixes, before any work
    args = reference(REFERENCE_GRADMEM_SQUAD) + shrink(tmp_path / "run") + ["--pretrained_model", gpt2_dir]
    with pytest.raises(ValueError, match=r"--dataset_name 'squad' is not a local folder .*ConnectionError.*"
                                         r"save_to_disk\('./data/squad'\).*--dataset_name ./data/squad.*--squad_json"):
        run_gradmemgpt_on_squad.main(args)
    with pytest.raises(ValueError, match=r"'booydar/phonebook_N8' is not a local folder .*phonebook_N8"):
        run_gradmemgpt_on_squad.main(args + ["--dataset_name", "booydar/phonebook_N8"])
    assert not (tmp_path / "run").exists()
    run_gradmemgpt_on_squad.main(args + ["--dataset_name", str(tmp_path / "squad"), "--generation_max_new_tokens", "0",
                                         "--max_steps", "1", "--eval_steps", "1", "--max_eval_samples", "2"])
    assert results(tmp_path / "run")["global_step"] == 1
