"""answer_tasks.py (task loading, full-context layout, greedy decoding) and the answer-task presets of every model
family: each preset's command (DRY_RUN=1 prints it) trains a tiny local model 2 steps on CPU and writes the EM/F1
of generated answers."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

import answer_tasks
import babi_utils
import phonebook_utils
import squad_utils
from make_local_gpt2 import save_local_gpt2

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def restore_precision_env(monkeypatch):
    """run_experiment writes ACCELERATE_MIXED_PRECISION into os.environ; undo it after each test."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """./data as the presets expect it: phonebook_N4 and babilong_qa1_0k (a few rows each)."""
    path = tmp_path_factory.mktemp("data")
    phonebook_utils.build_phonebook_dataset(4, n_train=8, n_valid=2, seed=1).save_to_disk(str(path / "phonebook_N4"))
    babi = babi_utils.load_babi_text(str(DATA / "babi"), "qa1")
    DatasetDict({name: rows.select(range(min(4, len(rows)))) for name, rows in babi.items()}).save_to_disk(
        str(path / "babilong_qa1_0k"))
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """A local stand-in for the hub's `gpt2`: byte-level BPE trained on the test texts + a 2-layer width-32 GPT-2."""
    texts = []
    for row in babi_utils.read_babi_file(str(DATA / "babi" / "qa1_train.txt")):
        texts += [row["context"], row["query"] + row["target"]]
    rows = squad_utils.read_squad_v1_json(str(DATA / "squad" / "train-v1.1.json"))
    texts += list(rows["context"]) + list(rows["question"])
    texts += list(phonebook_utils.build_phonebook_dataset(4, 20, 2, seed=0)["train"]["context"])
    return save_local_gpt2(str(tmp_path_factory.mktemp("gpt2")), texts, vocab_size=600, n_positions=256)


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


# ------------------------------------------------------------------------------------------------ data

def test_squad_scripts_recognise_a_phonebook_dataset_by_its_columns(data_dir, tmp_path):
    phonebook = str(data_dir / "phonebook_N4")
    splits, name = answer_tasks.SquadDataArgs(dataset_name=phonebook).load()
    assert name == "phonebook_N4" and splits["valid"][0]["query"].startswith("\n")
    assert splits["valid"][0]["answers"] == [splits["valid"][0]["target"]]
    assert answer_tasks.SquadDataArgs(dataset_name="booydar/phonebook_N8").is_phonebook()
    with pytest.raises(ValueError, match="drop one of them"):
        answer_tasks.SquadDataArgs(dataset_name="booydar/phonebook_N8", squad_json="x").validate()
    with pytest.raises(ValueError, match="--layout applies to SQuAD only"):
        answer_tasks.SquadDataArgs(dataset_name=phonebook, layout="cq_a").load()
    with pytest.raises(ValueError, match="unknown --dataset_name 'trivia'"):
        answer_tasks.SquadDataArgs(dataset_name="trivia").load()
    # a local copy of the hub's squad (columns id/context/question/answers) is SQuAD, whatever its folder is called
    raw = DatasetDict({"train": squad_utils.read_squad_v1_json(str(DATA / "squad" / "train-v1.1.json")),
                       "validation": squad_utils.read_squad_v1_json(str(DATA / "squad" / "dev-v1.1.json"))})
    raw.save_to_disk(str(tmp_path / "phonebook_lookalike"))
    splits, name = answer_tasks.SquadDataArgs(dataset_name=str(tmp_path / "phonebook_lookalike")).load()
    assert name == "squad" and "id" in splits["train"].column_names


def test_full_context_rows_join_context_and_query_with_one_space():
    rows = Dataset.from_dict({"context": ["Paris is in France.", "Mary went home. ", "A: 1\nB: 2"],
                              "query": ["Where is Paris? ", "Where is Mary? ", "\nB: "],
                              "target": ["France", "home", "2"]})
    joined = answer_tasks.full_context_rows(DatasetDict({"valid": rows}))["valid"]
    assert list(joined["context"]) == ["Paris is in France. ", "Mary went home. ", "A: 1\nB: 2"]


def manual_greedy(next_logits, prompt: list, n: int, eos_id: int) -> list:
    """Greedy decoding one token at a time from a function of the whole sequence -> next-token logits."""
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(next_logits(torch.tensor([ids])).argmax())
        out.append(token)
        if token == eos_id:
            break
        ids.append(token)
    return out


def expected_answer(tokenizer, ids: list) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids).strip()


@pytest.mark.parametrize("backbone", ["gpt2", "mamba"])
def test_full_context_answers_are_greedy_decoding_of_context_and_prompt(backbone, gpt2_dir, mamba_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gpt2_dir if backbone == "gpt2" else mamba_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    contexts = ["Mary moved to the bathroom. John went to the hallway. ", "Daniel went to the garden. ",
                "The orchard grows apples and pears. "]
    queries = ["Where is Mary? ", "Where is Daniel? ", "Answer: "]
    answers = answer_tasks.full_context_answers(model, tokenizer, contexts, queries, max_new_tokens=4, batch_size=2)
    with torch.no_grad():
        for context, query, answer in zip(contexts, queries, answers):
            prompt = tokenizer(context + query.rstrip()).input_ids
            ids = manual_greedy(lambda x: model(input_ids=x).logits[0, -1], prompt, 4, tokenizer.eos_token_id)
            assert answer == expected_answer(tokenizer, ids)


def test_rmt_answers_are_greedy_decoding_from_memory_and_prompt(gpt2_dir):
    from transformers import AutoTokenizer

    from rmt import RMT2Segm, RMT2SegmConfig

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = RMT2Segm(RMT2SegmConfig(pretrained_model=gpt2_dir, n_mem_tokens=2)).eval()
    contexts, queries = ["Mary moved to the bathroom. ", "Daniel went to the garden. "], ["Where is Mary? ", "Answer: "]
    answers = answer_tasks.memory_model_answers(model, tokenizer, contexts, queries, max_new_tokens=4, batch_size=2)
    with torch.no_grad():
        for context, query, answer in zip(contexts, queries, answers):
            memory = model.write(tokenizer([context], return_tensors="pt").input_ids)[0]
            prompt = tokenizer(query.rstrip()).input_ids
            ids = manual_greedy(lambda x: model.read(memory, torch.cat([x, x[:, -1:]], 1))[0, -1], prompt, 4,
                                tokenizer.eos_token_id)
            assert answer == expected_answer(tokenizer, ids)


# ------------------------------------------------------------------------------------------------ presets

PRESETS = [  # preset, run script, backbone, environment beyond the data and model locations, flags the command has
    ("run_rmt_on_squad.sh", "run_rmt_on_squad.py", "gpt2", {}, ["--n_mem_tokens", "64", "--learning_rate", "3e-4"]),
    ("run_rmt_on_phonebook.sh", "run_rmt_on_phonebook.py", "gpt2", {"SIZES": "4"}, ["--n_mem_tokens", "32"]),
    ("run_rmt_on_babi.sh", "run_rmt_on_babi.py", "gpt2", {"TASKS": "1"}, ["--n_mem_tokens", "8"]),
    ("run_gpt2_on_squad.sh", "run_gpt2_on_squad.py", "gpt2", {}, ["--learning_rate", "1e-4"]),
    ("run_gpt_on_phonebook.sh", "run_gpt2_on_phonebook.py", "gpt2", {"SIZES": "4"}, ["--learning_rate", "3e-4"]),
    ("run_mamba_on_phonebook.sh", "run_gpt2_on_phonebook.py", "mamba", {"SIZES": "4"},
     ["--per_device_batch_size", "128"]),  # 512 / N
    ("run_gpt_on_babi.sh", "run_gpt2_on_babi.py", "mamba", {"TASKS": "1"}, ["--learning_rate", "1e-4"]),
    ("run_gradmemgpt_on_phonebook.sh", "run_gradmemgpt_on_phonebook.py", "gpt2", {"N": "4"}, ["--inner_lr", "0.4"]),
]


def preset_command(preset: str, env: dict) -> list:
    printed = subprocess.run(["bash", str(REPO / "scripts" / preset)], env={**os.environ, "DRY_RUN": "1", **env},
                             capture_output=True, text=True, check=True).stdout
    return shlex.split(printed)


@pytest.mark.parametrize("preset, script, backbone, env, expected", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_trains_and_scores_generated_answers(preset, script, backbone, env, expected, tmp_path, data_dir,
                                                    gpt2_dir, mamba_dir):
    """The preset's own flags, shrunk to 2 steps of batch 2 (and 2 memory vectors) on tiny local data and models."""
    import importlib

    model = mamba_dir if backbone == "mamba" else gpt2_dir
    env = {**env, "MODEL": model, "DATA_DIR": str(data_dir), "DATASET_PREFIX": str(data_dir / "phonebook_N"),
           "DATASET": str(data_dir / "phonebook_N4"), "SQUAD_JSON": str(DATA / "squad")}
    command = preset_command(preset, env)
    assert command[:2] == ["accelerate", "launch"] and command.count(script) == 1
    args = command[command.index(script) + 1:]
    assert "--bf16" in args
    for flag, value in zip(expected[::2], expected[1::2]):
        assert args[args.index(flag) + 1] == value, flag
    assert args[args.index("--pretrained_model") + 1] == model
    run_dir = tmp_path / "run"
    shrink = ["--exp_path", str(run_dir), "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--total_batch_size", "2", "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
              "--warmup_steps", "0", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
              "--generation_max_new_tokens", "4", "--stop_metric_value", "2.0"]
    if not script.startswith("run_gpt2"):
        shrink += ["--n_mem_tokens", "2"]
    importlib.import_module(script.removesuffix(".py")).main(args + shrink)
    results = json.loads((run_dir / "all_results.json").read_text())
    assert results["global_step"] == 2
    for key in ("eval_token_accuracy", "eval_exact_match", "eval_squad_exact_match", "eval_squad_f1"):
        assert 0.0 <= results[key] <= 1.0, key
    if "babi" in preset:
        assert "test_squad_f1" in results
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert records and all(set(r) == {"step", "split", "query", "target", "answer", "correct"} for r in records)
    assert {r["step"] for r in records} == {0, 2} and all(isinstance(r["target"], list) for r in records)
    assert 1 <= len([r for r in records if r["step"] == 0]) <= 3  # at most --log_samples (default 3) each time
    if preset == "run_gradmemgpt_on_phonebook.sh":
        quiet = tmp_path / "quiet"
        shrink[shrink.index("--exp_path") + 1] = str(quiet)
        importlib.import_module(script.removesuffix(".py")).main(args + shrink + ["--log_samples", "0"])
        assert (quiet / "all_results.json").is_file() and not (quiet / "samples.jsonl").exists()
