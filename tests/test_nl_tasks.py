"""Natural-language tasks end to end on CPU: a tiny GPT-2 with a BPE tokenizer trained here (nothing downloaded)."""
import json
from pathlib import Path

import pytest
import torch

import answer_tasks
import babi_utils
import phonebook_utils
import squad_utils
from grad_memgpt import GradMemGPT, GradMemGPTConfig
from make_local_gpt2 import EOS, save_local_gpt2
from training_args import BackboneArgs
from training_backbone import load_tokenizer
from training_collators import IGNORE_INDEX, MemoryModelCollator

DATA = Path(__file__).parent / "data"
BABI_DIR, SQUAD_DIR = str(DATA / "babi"), str(DATA / "squad")


def corpus() -> list:
    texts = []
    for split in ("train", "valid", "test"):
        for row in babi_utils.read_babi_file(str(DATA / "babi" / f"qa1_{split}.txt")):
            texts += [row["context"], row["query"] + row["target"]]
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        rows = squad_utils.read_squad_v1_json(str(DATA / "squad" / name))
        texts += list(rows["context"]) + list(rows["question"]) + ["Answer: " + a for x in rows["answers"] for a in x["text"]]
    texts += list(phonebook_utils.build_phonebook_dataset(4, 20, 2, seed=0)["train"]["context"])
    return texts


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> str:
    """A local 'pretrained' folder: byte-level BPE tokenizer (GPT-2 style, offsets not trimmed) + tiny GPT-2."""
    path = str(tmp_path_factory.mktemp("tiny_gpt2"))
    return save_local_gpt2(path, corpus(), vocab_size=600, n_positions=192, dropout=0.1)


@pytest.fixture(scope="module")
def tokenizer(pretrained_dir):
    return load_tokenizer(BackboneArgs(pretrained_model=pretrained_dir))


def tiny_gradmem(pretrained_dir, **kw) -> GradMemGPT:
    torch.manual_seed(0)
    options = dict(n_mem_tokens=4, K=2, lr=0.1, grad_mode="second", use_write_head=True)
    options.update(kw)
    return GradMemGPT(GradMemGPTConfig(pretrained_model=pretrained_dir, **options))


# ---------------------------------------------------------------------------------------------- label masks

def labelled_text(tokenizer, batch, i) -> str:
    labels = batch["labels"][i]
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def test_pad_falls_back_to_eos(tokenizer):
    assert tokenizer.pad_token == EOS and tokenizer.padding_side == "right"


def test_label_masks_when_the_target_starts_mid_token(tokenizer):
    collate = MemoryModelCollator(tokenizer)
    examples = [
        # the space belongs to the query but BPE merges it into the first answer token ' bathroom'
        {"context": "Mary moved to the bathroom. ", "query": "Where is Mary? ", "target": "bathroom" + EOS},
        # the target starts inside a word: the merged token 'bathroom' straddles query and target
        {"context": "c", "query": "Where is Mary? bath", "target": "room"},
        # cq_a layout: 'Answer: ' + answer
        {"context": "c", "query": "Answer: ", "target": "late September" + EOS},
    ]
    batch = collate(examples)
    assert labelled_text(tokenizer, batch, 0) == " bathroom" + EOS
    assert labelled_text(tokenizer, batch, 1) == " bathroom"
    assert labelled_text(tokenizer, batch, 2) == " late September" + EOS
    # the straddling token really is one token, and nothing before it is labelled
    ids = batch["query_input_ids"][1]
    first = int((batch["labels"][1] != IGNORE_INDEX).nonzero()[0])
    assert tokenizer.decode([int(ids[first])]) == " bathroom"
    assert tokenizer.decode(ids[:first].tolist()) == "Where is Mary?"


# ---------------------------------------------------------------------------------------------- generation

def manual_greedy(model, tokenizer, context: str, prompt: str, n: int) -> list:
    context_ids = tokenizer([context], return_tensors="pt").input_ids
    with torch.no_grad():
        memory, _ = model.write(context_ids)
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        out = []
        for _ in range(n):
            logits = model.read(memory, torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1))  # [1, L+1, V]
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_generate_answers_is_greedy_decoding_from_memory_and_prompt(pretrained_dir, tokenizer):
    model = tiny_gradmem(pretrained_dir).eval()
    contexts = ["Mary moved to the bathroom. John went to the hallway. ", "Daniel went to the garden. ",
                "The orchard grows apples and pears."]
    queries = ["Where is Mary? ", "Where is Daniel? ", "Answer: "]  # prompts of different token lengths
    answers = answer_tasks.memory_model_answers(model, tokenizer, contexts, queries, max_new_tokens=5, batch_size=2)
    for context, query, answer in zip(contexts, queries, answers):
        expected = manual_greedy(model, tokenizer, context, query.rstrip(), 5)
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert answer == tokenizer.decode(expected).strip()
    # batch composition does not change an answer
    alone = answer_tasks.memory_model_answers(model, tokenizer, contexts[1:2], queries[1:2], max_new_tokens=5, batch_size=1)
    assert alone == answers[1:2]
    with pytest.raises(ValueError, match="empty"):
        answer_tasks.read_prompt("   ")


def test_context_longer_than_positions_minus_memory(tokenizer):
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"context": ["Mary moved to the bathroom. " * 40], "query": ["Where is Mary? "],
                              "target": ["bathroom"]})
    splits = DatasetDict({"train": rows})
    n_context = len(tokenizer(rows[0]["context"]).input_ids)
    with pytest.raises(ValueError, match="--max_context_length"):
        answer_tasks.check_sequences_fit(tokenizer, splits, n_positions=n_context + 3, n_prefix=4)
    answer_tasks.check_sequences_fit(tokenizer, splits, n_positions=n_context + 4, n_prefix=4)
    answer_tasks.check_sequences_fit(tokenizer, splits, n_positions=64, n_prefix=4, max_context_length=60)
    with pytest.raises(ValueError, match="exceeds"):
        answer_tasks.check_sequences_fit(tokenizer, splits, n_positions=64, n_prefix=4, max_context_length=61)
    with pytest.raises(ValueError, match="READ sequence"):
        answer_tasks.check_sequences_fit(tokenizer, splits, n_positions=64, n_prefix=4, max_context_length=60,
                                        n_generated=58)


# ---------------------------------------------------------------------------------------------- end to end

def common_args(pretrained_dir, exp_path) -> list:
    return ["--pretrained_model", pretrained_dir, "--exp_path", str(exp_path), "--use_cpu", "--report_to", "none",
            "--per_device_batch_size", "2", "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
            "--warmup_steps", "0", "--learning_rate", "1e-3", "--n_mem_tokens", "4", "--inner_lr", "0.1",
            "--dataloader_num_workers", "0", "--generation_max_new_tokens", "4", "--stop_metric_value", "2.0"]


def results(exp_path) -> dict:
    return json.loads((Path(exp_path) / "all_results.json").read_text())


def test_squad_end_to_end(pretrained_dir, tmp_path):
    import run_gradmemgpt_on_squad

    metrics = run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "run") + [
        "--squad_json", SQUAD_DIR, "--layout", "qc_a"])
    saved = results(tmp_path / "run")
    for key in ("eval_token_accuracy", "eval_exact_match", "eval_squad_exact_match", "eval_squad_f1"):
        assert key in saved and 0.0 <= saved[key] <= 1.0
    assert metrics["global_step"] == 2
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert sum("eval_squad_f1" in record for record in history) >= 2  # at the start and at step 2


def test_phonebook_end_to_end(pretrained_dir, tmp_path):
    import run_gradmemgpt_on_squad

    data = tmp_path / "phonebook_N4"
    phonebook_utils.build_phonebook_dataset(4, n_train=16, n_valid=4, seed=1).save_to_disk(str(data))
    run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "run") + ["--dataset_name", str(data)])
    saved = results(tmp_path / "run")
    assert "eval_squad_exact_match" in saved and "eval_token_accuracy" in saved


def test_bad_task_arguments(pretrained_dir, tmp_path):
    import run_gradmemgpt_on_squad

    with pytest.raises(ValueError, match="unknown --layout"):
        run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "r") + ["--layout", "q_c"])
    with pytest.raises(ValueError, match="unknown --dataset_name"):
        run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "r") + ["--dataset_name", "trivia"])
    with pytest.raises(ValueError, match="needs --eos_after_target"):
        run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "r") + ["--eos_after_target", "false"])
    with pytest.raises(ValueError, match="--max_context_length"):  # tiny backbone: 192 positions
        run_gradmemgpt_on_squad.main(common_args(pretrained_dir, tmp_path / "r") + [
            "--squad_json", SQUAD_DIR, "--n_mem_tokens", "185"])


def test_babi_end_to_end_reports_test(pretrained_dir, tmp_path):
    import run_gradmemgpt_on_babi

    run_gradmemgpt_on_babi.main(common_args(pretrained_dir, tmp_path / "run") + [
        "--babi_dir", BABI_DIR, "--babi_task", "qa1"])
    saved = results(tmp_path / "run")
    for key in ("eval_exact_match", "test_exact_match", "test_token_accuracy", "test_squad_exact_match"):
        assert key in saved
    with pytest.raises(ValueError, match="exactly one of --data_path"):
        run_gradmemgpt_on_babi.main(common_args(pretrained_dir, tmp_path / "r2"))
    with pytest.raises(ValueError, match="unknown bAbI task"):
        run_gradmemgpt_on_babi.main(common_args(pretrained_dir, tmp_path / "r2") + [
            "--babi_dir", BABI_DIR, "--babi_task", "qa0"])


def test_generation_callback_limits_samples_only_during_training():
    from types import SimpleNamespace

    from datasets import Dataset

    seen = []

    def fake_decode(model, contexts, queries):
        seen.append(len(contexts))
        return ["apples" for _ in contexts]

    rows = Dataset.from_dict({"context": ["c"] * 5, "query": ["q "] * 5,
                              "answers": [["apples"], ["the apples."], ["pears"], ["apples"], ["x", "apples"]]})
    callback = answer_tasks.GenerationEvalCallback(fake_decode, max_samples=2)
    state = SimpleNamespace(log_history=[{"eval_loss": 1.0, "step": 0}], is_world_process_zero=False, global_step=0)
    metrics = {"eval_loss": 1.0}
    callback.on_evaluate(None, state, None, metrics=metrics, model=None, eval_dataloader=SimpleNamespace(dataset=rows))
    assert seen == [2] and metrics["eval_squad_exact_match"] == 1.0 and state.log_history[-1]["eval_squad_f1"] == 1.0
    callback.on_train_end(None, state, None)
    metrics = {"test_loss": 1.0}
    callback.on_evaluate(None, state, None, metrics=metrics, model=None, eval_dataloader=SimpleNamespace(dataset=rows))
    assert seen == [2, 5] and metrics["test_squad_exact_match"] == pytest.approx(0.8)
