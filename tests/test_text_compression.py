import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, EvalPrediction

import prepare_pg19_chunks
from make_local_gpt2 import save_local_gpt2
import run_gradmemgpt_on_text_compression as tc
from training_args import parse_cli
from training_collators import IGNORE_INDEX

FIXTURE = Path(__file__).parent / "data" / "pg19_fixture"
WRITE_ONLY_MARKERS = ("lora_", "write_head.", "mem_proj.")


def is_write_only(name):
    return name == "mem" or any(marker in name for marker in WRITE_ONLY_MARKERS)


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the fixture and a 2-layer GPT-2 (width 32), saved as one folder."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    texts = [p.read_text() for p in sorted(FIXTURE.glob("*/*.txt"))]
    save_local_gpt2(str(folder), texts, vocab_size=400, n_positions=128)
    return folder


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunks") / "pg19_fixture_w40"
    prepare_pg19_chunks.main(["--input_dir", str(FIXTURE), "--output_path", str(out), "--min_words", "40",
                              "--sample_n_valid_chunks", "6", "--seed", "0"])
    return out


def parse(argv):
    return parse_cli(tc.TextCompressionTrainArgs, tc.TextCompressionBackboneArgs, tc.TextCompressionModelArgs,
                     tc.TextCompressionDataArgs, args=argv)


def tokenizer_of(folder):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Data and collator


def test_load_chunk_splits(chunks):
    _, _, _, data_args = parse(["--dataset_path", str(chunks)])
    splits = tc.load_chunk_splits(data_args)
    assert set(splits) == {"train", "valid", "test"}
    assert len(splits["valid"]) == 6  # the validation split is the default eval split
    assert all(splits["train"]["random_start"]) and not any(splits["valid"]["random_start"])
    assert not any(splits["test"]["random_start"])
    _, _, _, data_args = parse(["--dataset_path", str(chunks), "--eval_split", "test"])
    splits = tc.load_chunk_splits(data_args)
    assert set(splits) == {"train", "valid"} and splits["valid"][0]["split"] == "test"
    for argv, message in [
        (["--train_split", "dev"], "no split 'dev'"),
        (["--eval_split", "dev"], "no split 'dev'"),
    ]:
        _, _, _, data_args = parse(["--dataset_path", str(chunks)] + argv)
        with pytest.raises(ValueError, match=message):
            tc.load_chunk_splits(data_args)
    _, _, _, data_args = parse(["--dataset_path", str(chunks.parent / "missing")])
    with pytest.raises(FileNotFoundError, match="prepare_pg19_chunks"):
        tc.load_chunk_splits(data_args)


@pytest.mark.parametrize("argv, message", [
    (["--max_context_length", "0"], "--max_context_length must be an integer >= 1"),
    (["--eval_split", "train"], "is the training split"),
    (["--base_model", "llama"], "needs --tokenizer_path"),
    (["--pretrained_model", "x", "--tokenizer_path", "y"], "brings its own tokenizer"),
])
def test_cli_validation(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(["--dataset_path", "unused"] + argv)


def test_reference_defaults():
    train_args, backbone_args, model_args, data_args = parse(["--dataset_path", "d"])
    assert backbone_args.pretrained_model == "EleutherAI/pythia-160m"
    assert data_args.max_context_length == 256 and train_args.max_eval_samples == 5000
    assert (model_args.n_mem_tokens, model_args.K, model_args.inner_lr, model_args.use_adam,
            model_args.grad_mode) == (8, 2, 0.08, False, "second")
    assert model_args.use_mem_proj and model_args.mem_proj_mode == "proj"
    assert model_args.use_write_head and model_args.use_write_lora and model_args.freeze_backbone
    assert (model_args.write_lora_r, model_args.write_lora_alpha) == (8, 16)
    assert not model_args.add_inner_loss_to_outer and model_args.inner_loss_weight is None


def test_collator_eval_rows_start_at_chunk(chunks, tiny_pretrained):
    tokenizer = tokenizer_of(tiny_pretrained)
    rows = [dict(r, random_start=False) for r in datasets.load_from_disk(str(chunks))["test"]]
    rows[1] = dict(rows[1], context="Short text.")  # a span shorter than L: padding
    for L in (5, 32):
        batch = tc.TextCompressionCollator(tokenizer, L)(rows)
        ids, labels = batch["context_input_ids"], batch["labels"]
        assert batch["query_input_ids"] is ids
        assert ids.shape[1] % min(8, L) == 0 and ids.shape[1] <= max(L, 8)
        for i, row in enumerate(rows):
            expected = tokenizer(row["context"][: 15 * L])["input_ids"][:L]
            n = len(expected)
            assert ids[i, :n].tolist() == expected and labels[i, :n].tolist() == expected
            assert (ids[i, n:] == tokenizer.pad_token_id).all() and (labels[i, n:] == IGNORE_INDEX).all()
    assert (labels[1] != IGNORE_INDEX).sum() < 32  # the short row was padded (checked at L=32)


def test_collator_random_start_sentences(chunks, tiny_pretrained):
    tokenizer = tokenizer_of(tiny_pretrained)
    row = dict(max(datasets.load_from_disk(str(chunks))["train"], key=lambda r: r["n_sentences"]), random_start=True)
    n, L = row["n_sentences"], 16
    last = n - 1 - int(L / (1.2 * row["word_count"] / n))  # the reference's _sample_chunk range
    assert last >= 2
    collator = tc.TextCompressionCollator(tokenizer, L)
    torch.manual_seed(0)
    starts = [collator.start_sentence(row) for _ in range(300)]
    assert set(starts) == set(range(last + 1))
    # a span starts at a sentence of the chunk
    torch.manual_seed(1)
    text = collator.span_text(row)
    sentence_starts = [row["context"][s:] for s, _ in row["sentence_boundaries"]]
    assert any(s.startswith(text) for s in sentence_starts[: last + 1])
    # a span that cannot fill L tokens always starts at the chunk start
    long_collator = tc.TextCompressionCollator(tokenizer, 10_000)
    assert {long_collator.start_sentence(row) for _ in range(20)} == {0}


def test_metrics_bits_and_compression_ratio(tiny_pretrained):
    tokenizer = tokenizer_of(tiny_pretrained)
    labels = np.array([[5, 6, 7, 8], [9, 10, IGNORE_INDEX, IGNORE_INDEX]])
    predictions = np.array([[5, 6, 7, 8], [9, 11, 3, 3]])
    stats = {"target_loss": np.array([1.0, 3.0]), "inner_loss": np.array([2.0, 2.0])}
    metrics = tc.make_text_compression_metrics(tokenizer, n_mem_tokens=2, n_print=1)(
        EvalPrediction(predictions=(predictions, stats), label_ids=labels))
    assert metrics["token_accuracy"] == pytest.approx(5 / 6)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["span_tokens"] == pytest.approx(3.0)
    assert metrics["compression_ratio"] == pytest.approx(1.5)
    assert metrics["read_bits_per_token"] == pytest.approx(2.0 / math.log(2))


# ---------------------------------------------------------------------------------------------------------------
# Model and training


def test_frozen_backbone_trains_only_write_only_parameters(chunks, tiny_pretrained):
    _, backbone_args, model_args, data_args = parse(
        ["--dataset_path", str(chunks), "--pretrained_model", str(tiny_pretrained), "--max_context_length", "24",
         "--n_mem_tokens", "2", "--write_lora_r", "2"])
    tokenizer = tokenizer_of(tiny_pretrained)
    torch.manual_seed(0)
    model = tc.build_model(backbone_args, model_args, tokenizer, data_args.max_context_length)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_write_only(n) for n in trainable)
    assert "mem" in trainable and any("lora_A" in n for n in trainable) and any("write_head" in n for n in trainable)
    assert any("mem_proj" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    splits = tc.load_chunk_splits(data_args)
    batch = tc.TextCompressionCollator(tokenizer, 24)([splits["train"][i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (changed ^ trainable)
    assert all(math.isfinite(x) for x in losses)


def test_pretrained_backbone_too_short_for_the_span(chunks, tiny_pretrained):
    _, backbone_args, model_args, _ = parse(["--dataset_path", str(chunks), "--pretrained_model", str(tiny_pretrained)])
    with pytest.raises(ValueError, match="exceeds the backbone's 128 positions"):
        tc.build_model(backbone_args, model_args, tokenizer_of(tiny_pretrained), 256)


def test_from_scratch_backbone_must_be_trained(chunks, tiny_pretrained):
    _, backbone_args, model_args, _ = parse(["--dataset_path", str(chunks), "--base_model", "llama",
                                             "--tokenizer_path", str(tiny_pretrained)])
    with pytest.raises(ValueError, match="--freeze_backbone false"):
        tc.build_model(backbone_args, model_args, tokenizer_of(tiny_pretrained), 32)


def test_end_to_end_on_fixture(chunks, tiny_pretrained, tmp_path):
    run_dir = tmp_path / "run"
    metrics = tc.main([
        "--dataset_path", str(chunks), "--pretrained_model", str(tiny_pretrained), "--exp_path", str(run_dir),
        "--max_context_length", "32", "--n_mem_tokens", "4", "--write_lora_r", "2", "--max_eval_samples", "4",
        "--per_device_batch_size", "4", "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
        "--warmup_steps", "0", "--learning_rate", "1e-2", "--report_to", "none", "--dataloader_num_workers", "0",
        "--use_cpu", "--debug_print_samples", "1", "--seed", "3",
    ])
    for key in ("eval_token_accuracy", "eval_exact_match", "eval_read_bits_per_token", "eval_compression_ratio",
                "eval_inner_loss", "test_token_accuracy"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["eval_span_tokens"] == pytest.approx(32.0)  # fixture chunks are longer than 32 tokens
    assert metrics["eval_compression_ratio"] == pytest.approx(8.0)
    assert metrics["eval_read_bits_per_token"] == pytest.approx(metrics["eval_target_loss"] / math.log(2))
    saved = json.loads((run_dir / "all_results.json").read_text())
    assert saved["eval_compression_ratio"] == pytest.approx(8.0)

    # The trained checkpoint: the backbone equals the pretrained one; the write-only parameters were trained.
    checkpoint = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoint.name == "checkpoint-2"
    trained = load_file(str(checkpoint / "model.safetensors"))
    pretrained = load_file(str(tiny_pretrained / "model.safetensors"))
    backbone = {n[len("model."):].replace(".base_layer", ""): t for n, t in trained.items()
                if n.startswith("model.") and not is_write_only(n)}
    tied = {"lm_head.weight": "transformer.wte.weight"}  # GPT-2 ties its LM head to the input embeddings
    assert set(pretrained) <= set(backbone) <= set(pretrained) | set(tied)
    for name, tensor in backbone.items():
        assert torch.equal(tensor, pretrained[tied.get(name, name) if name not in pretrained else name]), name
    assert not torch.equal(trained["write_head.weight"], pretrained["transformer.wte.weight"])
    assert any(not torch.all(t == 0) for n, t in trained.items() if "lora_B" in n)
