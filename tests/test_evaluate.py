"""evaluate_model.py and predict.py on tiny saved memory models (untrained: the plumbing is tested, not the accuracy)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate_model as evaluate
import kv_dataset_utils
import predict
from rmt import RMT2Segm, RMT2SegmConfig
from grad_memgpt import GradMemArgs, build_grad_memgpt
from training_args import BackboneArgs
from training_backbone import build_backbone_config, load_tokenizer


@pytest.fixture(scope="module")
def kv_data(tmp_path_factory):
    spec = kv_dataset_utils.parse_dataset_name("N2-K2V2-V62")
    path = tmp_path_factory.mktemp("data") / "N2-K2V2-V62_8"
    kv_dataset_utils.save_kv_dataset(kv_dataset_utils.build_kv_dataset_dict(spec, 8, 4, seed=0, n_test=6), path,
                                     spec, 0)
    return str(path)


def tiny_tokenizer():
    backbone = BackboneArgs(n_layer=2, n_head=2, n_embd=32)
    backbone.validate()
    return backbone, load_tokenizer(backbone)


@pytest.fixture(scope="module")
def gradmem_dir(tmp_path_factory):
    backbone, tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_grad_memgpt(backbone, GradMemArgs(n_mem_tokens=2), tokenizer)
    folder = tmp_path_factory.mktemp("gradmem")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_writes_metrics_and_answers(tmp_path, kv_data, gradmem_dir):
    metrics = evaluate.main(["--model", str(gradmem_dir), "--data_path", kv_data, "--split", "test",
                             "--out", str(tmp_path / "eval"), "--batch_size", "4"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("test_loss", "test_exact_match", "test_token_accuracy", "test_inner_loss",
                "test_generated_exact_match", "test_generated_token_accuracy"):
        assert key in saved and key in metrics, key
    assert saved["test_generated_samples"] == saved["samples"] == 6
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and set(answers[0]) == {"query", "target", "answer", "correct"}
    assert len(answers[0]["answer"]) == len(answers[0]["target"])  # one character token per target character
    right = [a["target"][:-2] == a["answer"][:-2] for a in answers]  # the structural "!|" is not scored
    assert [a["correct"] for a in answers] == right
    assert saved["test_generated_exact_match"] == pytest.approx(sum(right) / 6)


def test_evaluate_finds_the_model_of_a_run_folder(tmp_path, gradmem_dir):
    older_run = tmp_path / "run"  # written by older code: no model at the root, the record is config.json
    older_run.mkdir()
    (older_run / "config.json").write_text(json.dumps({"cli_args": {}}))
    (older_run / "all_results.json").write_text(json.dumps({"best_model_checkpoint": str(gradmem_dir)}))
    assert evaluate.model_folder(str(older_run)) == gradmem_dir
    assert evaluate.model_folder(str(gradmem_dir)) == gradmem_dir
    with pytest.raises(FileNotFoundError, match="holds no model"):
        evaluate.model_folder(str(tmp_path))


def test_evaluate_plain_causal_lm_teacher_forced_only(tmp_path, kv_data):
    _, tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(build_backbone_config("llama", 2, 2, 32, tokenizer, 64))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    metrics = evaluate.main(["--model", str(tmp_path / "lm"), "--data_path", kv_data, "--split", "valid",
                             "--out", str(tmp_path / "eval")])
    assert "valid_exact_match" in metrics and "valid_generated_exact_match" not in metrics


def test_predict_answers_and_memory_round_trip(tmp_path, gradmem_dir, capsys):
    context, queries = "!ab:12!!cd:34!|", ["?!ab:", "?!cd:"]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"query": q}) + "\n" for q in queries[1:]))
    written = predict.main(["--model", str(gradmem_dir), "--context", context, "--query", queries[0],
                            "--queries", str(tmp_path / "queries.jsonl"), "--stop", "|", "--max_new_tokens", "4",
                            "--save_memory", str(tmp_path / "memory.pt")])
    assert [r["query"] for r in written] == queries and all(0 < len(r["answer"]) <= 4 for r in written)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == written
    memory = torch.load(tmp_path / "memory.pt", weights_only=True)
    assert memory.shape == (1, 2, 32)
    read_back = predict.main(["--model", str(gradmem_dir), "--memory", str(tmp_path / "memory.pt"),
                              "--query", queries[0], "--query", queries[1], "--stop", "|", "--max_new_tokens", "4"])
    assert read_back == written
    torch.save(torch.zeros(1, 3, 32), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds \(1, 3, 32\), not a memory of this model \(1, 2, 32\)"):
        predict.main(["--model", str(gradmem_dir), "--memory", str(tmp_path / "other.pt"), "--query", queries[0]])


def test_predict_answer_matches_evaluation_decoding(gradmem_dir):
    """predict's one-query decoding gives the tokens evaluation.generate_answer_tokens gives for the same target."""
    from evaluation import generate_answer_tokens
    from training_collators import MemoryModelCollator

    model, tokenizer = evaluate.load_trained_model(str(gradmem_dir), device="cpu")
    row = {"context": "!ab:12!!cd:34!|", "query": "?!ab:", "target": "12!|"}
    batch = MemoryModelCollator(tokenizer)([row])
    with torch.no_grad():
        memory = model.write(batch["context_input_ids"])[0]
    expected = generate_answer_tokens(model, memory, batch["query_input_ids"], batch["labels"])[0]
    expected = expected[batch["labels"][0] != -100].tolist()
    ids = predict.answer(model, memory, predict.encode(tokenizer, row["query"]), 4, stop_ids=set())
    assert ids == expected


def test_predict_rmt_and_bad_input(tmp_path, capsys):
    backbone, tokenizer = tiny_tokenizer()
    config = build_backbone_config("llama", 2, 2, 32, tokenizer, 64)
    RMT2Segm(RMT2SegmConfig(base_config=config, n_mem_tokens=2)).save_pretrained(tmp_path / "rmt")
    tokenizer.save_pretrained(tmp_path / "rmt")
    (result,) = predict.main(["--model", str(tmp_path / "rmt"), "--context", "!ab:12!|", "--query", "?!ab:",
                              "--max_new_tokens", "2"])
    assert len(result["answer"]) == 2
    with pytest.raises(ValueError, match="--stop 'xyz' is not a single token"):
        predict.main(["--model", str(tmp_path / "rmt"), "--context", "!ab:12!|", "--query", "?!ab:", "--stop", "xyz"])
    with pytest.raises(ValueError, match="at least one --query"):
        predict.main(["--model", str(tmp_path / "rmt"), "--context", "!ab:12!|"])
