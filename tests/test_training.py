"""Tests of the shared trainer: collators, metrics, CLI, backbone configs, data checks, run folder and resume.

The model here is a tiny fake memory model (a 2-layer Llama reading [context; query]) with the memory-model
contract, so that these tests do not depend on GradMem itself.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)
from transformers.trainer_utils import EvalPrediction

from grad_memgpt import GradMemArgs
from modeling_utils import MemoryModelOutput
import training_args
from training_args import BackboneArgs, DataArgs, TrainArgs, parse_cli
from training_backbone import build_backbone_config
import training_checkpoints
from training_collators import CausalLMCollator, MemoryModelCollator, make_compute_metrics, reduce_logits_to_predictions
import training_data
from training_data import load_splits
from training_experiment import run_experiment
import training_loop
from training_loop import NonFiniteStepSkippingAdamW
import training_run_folder
import training_runs

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!?:|"


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.BPEDecoder(suffix=" ")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", padding_side="right")


def kv_example(rng, n_pairs=2):
    letters = "abcdefgh"
    keys = rng.choice(list(letters), size=n_pairs, replace=False)
    values = rng.choice(list("0123456789"), size=n_pairs)
    context = "".join(f"!{k}:{v}!" for k, v in zip(keys, values)) + "|"
    i = rng.integers(n_pairs)
    return {"context": context, "query": f"?!{keys[i]}:", "target": f"{values[i]}!|"}


def kv_splits(n_train=64, n_valid=16, seed=0) -> DatasetDict:
    rng = np.random.default_rng(seed)
    make = lambda n: Dataset.from_list([kv_example(rng) for _ in range(n)])  # noqa: E731
    return DatasetDict(train=make(n_train), valid=make(n_valid))


class FakeMemoryConfig(PretrainedConfig):
    model_type = "fake_memory_for_tests"

    def __init__(self, vocab_size=48, width=32, nan_loss=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.width, self.nan_loss = vocab_size, width, nan_loss


class FakeMemoryModel(PreTrainedModel):
    """Memory-model contract without memory: a tiny Llama reads [context; query]; logits[:, j] predicts query j."""

    config_class = FakeMemoryConfig

    def __init__(self, config):
        super().__init__(config)
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.width,
                                               intermediate_size=2 * config.width, num_hidden_layers=2,
                                               num_attention_heads=2, tie_word_embeddings=False))
        self.post_init()

    def forward(self, context_input_ids, query_input_ids, labels=None):
        S, Q = context_input_ids.shape[1], query_input_ids.shape[1]
        logits = self.lm(input_ids=torch.cat([context_input_ids, query_input_ids], 1)).logits[:, S - 1: S - 1 + Q]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            if self.config.nan_loss:
                loss = loss * float("nan")
        stats = {"inner_loss": logits.detach().float().pow(2).mean(), "mem_norm_max": logits.detach().abs().max()}
        return MemoryModelOutput(loss=loss, logits=logits, memory=logits[:, :1].detach(), stats=stats)


# ---------------------------------------------------------------- collators

def test_memory_collator_labels_are_exactly_the_target_chars():
    tok = char_tokenizer()
    examples = [{"context": "!ab:cd!|", "query": "?!ab:", "target": "cd!|"},
                {"context": "!a:1!!bb:22!!c:3!|", "query": "?!bb:", "target": "22!|"},
                {"context": "!x:9!|", "query": "?!x:", "target": "9"}]  # a target that is followed by padding
    batch = MemoryModelCollator(tok)(examples)
    ctx, qry, labels = batch["context_input_ids"], batch["query_input_ids"], batch["labels"]
    assert ctx.shape[1] % 8 == 0 and qry.shape == labels.shape and qry.shape[1] % 8 == 0
    for i, ex in enumerate(examples):
        q_ids = tok(ex["query"] + ex["target"])["input_ids"]
        assert qry[i, : len(q_ids)].tolist() == q_ids and (qry[i, len(q_ids):] == tok.pad_token_id).all()
        assert ctx[i, : len(ex["context"])].tolist() == tok(ex["context"])["input_ids"]
        labelled = labels[i] != -100
        assert tok.decode(labels[i][labelled]).replace(" ", "") == ex["target"]
        # labelled positions are exactly the last len(target) real query tokens
        expected = torch.zeros_like(labelled)
        expected[len(ex["query"]): len(ex["query"]) + len(ex["target"])] = True
        assert torch.equal(labelled, expected)
        assert torch.equal(labels[i][labelled], qry[i][labelled])
    # max_context_length keeps the first tokens of the context
    short = MemoryModelCollator(tok, max_context_length=5)(examples)["context_input_ids"]
    assert short[1, :5].tolist() == tok("!a:1!")["input_ids"] and (short[:, 5:] == 0).all()


def test_causal_lm_collator_labels_and_left_truncation():
    tok = char_tokenizer()
    examples = [{"context": "!ab:cd!|", "query": "?!ab:", "target": "cd!|"},
                {"context": "!x:9!|", "query": "?!x:", "target": "9"}]
    batch = CausalLMCollator(tok)(examples)
    for i, ex in enumerate(examples):
        n = len(ex["context"] + ex["query"] + ex["target"])
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
        labelled = batch["labels"][i] != -100
        assert labelled.nonzero().flatten().tolist() == list(range(n - len(ex["target"]), n))
        assert tok.decode(batch["labels"][i][labelled]).replace(" ", "") == ex["target"]
    cut = CausalLMCollator(tok, max_input_length=10)(examples)
    seq0 = examples[0]["context"] + examples[0]["query"] + examples[0]["target"]
    assert cut["input_ids"][0, :10].tolist() == tok(seq0[-10:])["input_ids"]  # the START was dropped
    assert tok.decode(cut["labels"][0][cut["labels"][0] != -100]).replace(" ", "") == "cd!|"


# ---------------------------------------------------------------- metrics

def test_metrics_on_hand_made_predictions():
    tok = char_tokenizer()
    bang, bar = tok.convert_tokens_to_ids("!"), tok.convert_tokens_to_ids("|")
    a, b, c = tok.convert_tokens_to_ids(["a", "b", "c"])
    labels = np.array([[-100, a, b, bang, bar],     # all right
                       [-100, a, b, bang, bar],     # one value token wrong
                       [-100, -100, c, bang, bar],  # structural token wrong only: still exact
                       [-100, -100, -100, -100, -100]])  # no target: not counted
    preds = np.array([[9, a, b, bang, bar],
                      [9, a, c, bang, bar],
                      [9, 9, c, a, a],
                      [9, 9, 9, 9, 9]])
    stats = {"inner_loss": np.array([1.0, 3.0]), "mem_norm_max": np.array([2.0, 5.0]),
             "mem_norm_min": np.array([0.5, 0.25])}
    m = make_compute_metrics(tok)(EvalPrediction(predictions=(preds, stats), label_ids=labels))
    assert m["token_accuracy"] == pytest.approx(4 / 5)
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["inner_loss"] == 2.0 and m["mem_norm_max"] == 5.0 and m["mem_norm_min"] == 0.25
    m_all = make_compute_metrics(tok, ignore_tokens=())(EvalPrediction(predictions=preds, label_ids=labels))
    assert m_all["token_accuracy"] == pytest.approx(8 / 11) and m_all["exact_match"] == pytest.approx(1 / 3)


def test_logits_reduced_to_aligned_predictions():
    logits = torch.zeros(1, 4, 6)
    logits[0, torch.arange(4), torch.tensor([2, 3, 4, 5])] = 1.0
    stats = {"x": torch.tensor(1.0)}
    ids, kept = reduce_logits_to_predictions((logits, torch.zeros(1, 2, 3), stats), None)
    assert ids.tolist() == [[2, 3, 4, 5]] and kept is stats
    shifted = reduce_logits_to_predictions(logits, None, next_token_logits=True)
    assert shifted.tolist() == [[-100, 2, 3, 4]]  # logits at t predict token t+1


# ---------------------------------------------------------------- CLI

def test_cli_defaults_bools_and_errors(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t, b, g, d = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs, args=[])
    # GradMem: the reference config's defaults (the model's own, see GradMemOptions)
    assert (g.grad_mode, g.K, g.inner_lr, g.use_adam, g.use_write_head) == ("second", 2, 0.01, False, False)
    assert (g.add_inner_loss_to_outer, g.inner_loss_weight, g.attn_implementation) == (False, None, "auto")
    assert (t.learning_rate, t.warmup_steps, t.max_grad_norm, t.report_to) == (1e-4, 10_000, 1.0, "tensorboard")
    assert b.base_model == "llama" and t.mixed_precision() == "no"
    explicit = ["--per_device_batch_size", "64", "--total_batch_size", "64", "--gradient_accumulation_steps", "1",
                "--n_mem_tokens", "8", "--K", "2", "--inner_lr", "0.04", "--grad_mode", "second", "--use_write_head",
                "--add_inner_loss_to_outer", "--inner_loss_weight", "0.5", "--use_adam", "false", "--seed", "143",
                "--data_path", "./data/N8-K2V2-V62_1M", "--bf16", "--last_K_second_order", "2"]
    t, b, g, d = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs, args=explicit)
    assert t.bf16 and t.mixed_precision() == "bf16" and g.last_K_second_order == 2 and t.seed == 143
    (g,) = parse_cli(GradMemArgs, args=["--use_write_head", "--use_adam", "true", "--add_inner_loss_to_outer"])
    assert (g.use_write_head, g.use_adam, g.inner_loss_weight) == (True, True, 1.0)  # the reference's weight
    bad = [(["--base_model", "gpt2", "--pretrained_model", "gpt2"], "mutually exclusive"),
           (["--total_batch_size", "64", "--per_device_batch_size", "16"], "gradient_accumulation_steps 4"),
           (["--bf16", "--fp32"], "mutually exclusive"),
           (["--add_inner_loss_to_outer", "false", "--inner_loss_weight", "0.3"], "only used with")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_cli(TrainArgs, BackboneArgs, GradMemArgs, args=args)
    for option, value in (("--base_model", "bert"), ("--grad_mode", "third"), ("--mem_proj_mode", "proj_rw"),
                          ("--fast_step", "on"), ("--lr_scheduler_type", "cosine_typo")):
        with pytest.raises(SystemExit) as exit_info:  # typed choices: argparse names them and exits 2
            parse_cli(TrainArgs, BackboneArgs, GradMemArgs, args=[option, value])
        assert exit_info.value.code == 2
    assert "invalid choice: 'cosine_typo' (choose from" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    (t,) = parse_cli(TrainArgs, args=["--total_batch_size", "64", "--per_device_batch_size", "16",
                                      "--gradient_accumulation_steps", "2"])


def test_preset_sets_defaults_that_flags_override(monkeypatch, capsys):
    """--preset NAME: the preset's values replace the defaults; flags given as well win (wherever they stand); the
    dataclasses hold the resolved values. An unknown name, or a preset naming an option the script lacks, is refused."""
    from grad_memgpt import PRESETS

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    b, g = parse_cli(BackboneArgs, GradMemArgs, args=["--preset", "paper_kv"], presets=PRESETS)
    assert (b.base_model, b.n_layer, b.n_head, b.n_embd) == ("llama", 4, 4, 128)
    assert (g.n_mem_tokens, g.K, g.inner_lr, g.grad_mode, g.use_write_head, g.add_inner_loss_to_outer,
            g.inner_loss_weight) == (8, 2, 0.04, "second", True, True, 0.5)
    b, g = parse_cli(BackboneArgs, GradMemArgs, presets=PRESETS, args=[
        "--inner_lr", "0.08", "--preset=paper_kv", "--use_write_head", "false", "--n_layer", "2"])
    assert (g.inner_lr, g.use_write_head, g.K, b.n_layer, b.n_embd) == (0.08, False, 2, 2, 128)
    (g,) = parse_cli(GradMemArgs, args=["--inner_lr", "0.08"], presets={"other": {"K": 3}})  # no --preset: defaults
    assert (g.inner_lr, g.K) == (0.08, 2)
    with pytest.raises(ValueError, match="unknown --preset 'paper'; known presets: paper_kv"):
        parse_cli(BackboneArgs, GradMemArgs, args=["--preset", "paper"], presets=PRESETS)
    with pytest.raises(ValueError, match="--preset paper_kv sets n_embd, n_head, n_layer, which this script does not take"):
        parse_cli(GradMemArgs, args=["--preset", "paper_kv"], presets=PRESETS)
    with pytest.raises(ValueError, match="not used"):  # a script without presets has no --preset
        parse_cli(GradMemArgs, args=["--preset", "paper_kv"])
    with pytest.raises(ValueError, match="--inner_lr must be a finite number"):  # preset values are validated too
        parse_cli(GradMemArgs, args=["--preset", "bad"], presets={"bad": {"inner_lr": float("nan")}})


# ---------------------------------------------------------------- backbone configs

def test_backbone_configs_build_models():
    tok = char_tokenizer()
    llama = build_backbone_config("llama", 2, 4, 32, tok)
    assert llama.tie_word_embeddings and llama.num_key_value_heads == 4 and llama.head_dim == 8
    assert llama.intermediate_size == 128 and llama.vocab_size == len(tok) and llama.pad_token_id == 0
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    plain = build_backbone_config("llama", 2, 4, 32, tok, max_position_embeddings=256)
    assert plain.rope_parameters["rope_type"] == "default" and plain.max_position_embeddings == 256
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    for name in ("llama", "gpt2", "pythia", "mamba"):
        config = build_backbone_config(name, 2, 4, 32, tok)
        model = AutoModelForCausalLM.from_config(config)
        assert model.get_input_embeddings().weight.shape == (len(tok), 32), name
        assert model(input_ids=ids).logits.shape == (1, 4, len(tok)), name
    with pytest.raises(ValueError, match="unknown base model"):
        build_backbone_config("bert", 2, 4, 32, tok)


# ---------------------------------------------------------------- data checks

def test_load_splits_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="kv_dataset_utils"):
        load_splits(str(tmp_path / "my_data"))
    good = kv_splits(4, 2)
    good.save_to_disk(str(tmp_path / "good"))
    assert len(load_splits(str(tmp_path / "good"))["valid"]) == 2
    DatasetDict(train=good["train"], valid=good["valid"].select([])).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="'valid' .* is empty"):
        load_splits(str(tmp_path / "empty"))
    DatasetDict(train=good["train"].remove_columns("target"), valid=good["valid"]).save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(ValueError, match=r"lacks columns \['target'\]"):
        load_splits(str(tmp_path / "cols"))
    DatasetDict(train=good["train"]).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(ValueError, match="no 'valid' split"):
        load_splits(str(tmp_path / "nosplit"))


def test_init_checkpoint_vocab_mismatch(tmp_path):
    from safetensors.torch import save_file

    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=48))
    other = FakeMemoryModel(FakeMemoryConfig(vocab_size=60))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="another tokenizer/vocabulary"):
        training_checkpoints.load_init_checkpoint(model, str(tmp_path))
    same = FakeMemoryModel(FakeMemoryConfig(vocab_size=48))
    save_file({k: v.contiguous() for k, v in same.state_dict().items()}, str(tmp_path / "same.safetensors"))
    training_checkpoints.load_init_checkpoint(model, str(tmp_path / "same.safetensors"))
    assert torch.equal(model.lm.lm_head.weight, same.lm.lm_head.weight)


# ---------------------------------------------------------------- non-finite steps

def test_nonfinite_steps_are_skipped_then_stop():
    p = torch.nn.Parameter(torch.ones(3))
    opt = NonFiniteStepSkippingAdamW([p], max_consecutive=3, hint="lower --inner_lr", lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.data, torch.ones(3)) and opt.skipped_steps == 1 and not opt.state
    p.grad = torch.ones(3)
    opt.loss_is_finite = False  # finite gradients but a non-finite loss: skipped too
    opt.step()
    assert torch.equal(p.data, torch.ones(3)) and (opt.skipped_steps, opt.consecutive_skipped) == (2, 2)
    opt.step()  # a good step is applied and resets the run of skips
    assert opt.consecutive_skipped == 0 and opt.skipped_steps == 2 and (p.data < 1).all()
    p.grad = torch.full((3,), float("inf"))
    opt.step()
    opt.step()
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row.*lower --inner_lr"):
        opt.step()


# ---------------------------------------------------------------- end to end

def _train_args(tmp_path, **kw):
    args = dict(exp_path=str(tmp_path / "run"), per_device_batch_size=8, max_steps=4, eval_steps=2, logging_steps=1,
                warmup_steps=0, learning_rate=3e-3, report_to="tensorboard", dataloader_num_workers=0,
                stop_metric_value=None, use_cpu=True)
    args.update(kw)
    return TrainArgs(**args)


def test_end_to_end_run_folder_and_resume(tmp_path):
    tok = char_tokenizer()
    splits = kv_splits()

    def run(max_steps, **kw):
        torch.manual_seed(0)
        model = FakeMemoryModel(FakeMemoryConfig(vocab_size=len(tok)))
        return run_experiment(_train_args(tmp_path, max_steps=max_steps, **kw), model, tok, splits,
                              MemoryModelCollator(tok), make_compute_metrics(tok), data_name="kv_test",
                              all_args=[DataArgs(data_path="kv_test")])

    metrics = run(4)
    run_dir = tmp_path / "run"
    for name in ("run_config.json", "config.json", "model.safetensors", "tokenizer.json", "all_results.json",
                 "trainer_state.json", training_run_folder.CURVE_FILE):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir()) and not (run_dir / "runs").exists()
    assert (run_dir / "checkpoint-4" / "trainer_state.json").is_file()
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["cli_args"]["data_path"] == "kv_test" and "torch" in config["versions"]
    assert config["resumed_from"] is None
    results = json.loads((run_dir / "all_results.json").read_text())
    for key in ("eval_token_accuracy", "eval_exact_match", "eval_inner_loss", "eval_mem_norm_max", "eval_loss"):
        assert key in results and key in metrics, key
    assert results["global_step"] == 4 and results["skipped_steps"] == 0
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in history if "eval_exact_match" in r][:3] == [0, 2, 4]
    train_logs = [r for r in history if "loss" in r]
    assert train_logs and all("inner_loss" in r and "skipped_steps" in r and "patience" in r for r in train_logs)

    # re-running the same command with a larger budget resumes at the saved step (a killed run does the same)
    (run_dir / "checkpoint-99").mkdir()  # a checkpoint interrupted while saving: ignored and removed
    run(8)
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["resumed_from"].endswith("checkpoint-4") and not (run_dir / "checkpoint-99").exists()
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    evals = [r["step"] for r in history if "eval_exact_match" in r]
    assert evals.count(0) == 1 and 8 in evals  # no new evaluation at step 0: training continued from step 4
    assert json.loads((run_dir / "all_results.json").read_text())["global_step"] == 8

    # changing what is trained is refused; --overwrite starts over
    with pytest.raises(ValueError, match="learning_rate"):
        run(8, learning_rate=1e-2)
    run(2, overwrite=True, eval_steps=1)
    assert json.loads((run_dir / "run_config.json").read_text())["resumed_from"] is None
    assert not (run_dir / "checkpoint-4").exists()


def test_end_to_end_nonfinite_loss_stops_with_hint(tmp_path):
    tok = char_tokenizer()
    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=len(tok), nan_loss=True))
    args = _train_args(tmp_path, max_steps=10, eval_steps=100, max_consecutive_skipped_steps=3, report_to="none")
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row.*inner lr"):
        run_experiment(args, model, tok, kv_splits(32, 8), MemoryModelCollator(tok), make_compute_metrics(tok),
                       data_name="kv_test", nonfinite_hint="likely the inner lr is too large")


def test_max_train_minutes_stops_at_the_first_step_after_the_budget_evaluated_and_saved(tmp_path, monkeypatch):
    ticks = iter(range(1000))  # a clock that advances one second at every reading
    monkeypatch.setattr(training_loop.StopAfterWallTime, "clock", staticmethod(lambda: float(next(ticks))))
    tok = char_tokenizer()
    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=len(tok)))
    args = _train_args(tmp_path, max_steps=20, eval_steps=4, report_to="none", max_train_minutes=2.5 / 60)
    metrics = run_experiment(args, model, tok, kv_splits(), MemoryModelCollator(tok), make_compute_metrics(tok),
                             data_name="kv_test")
    # readings: start 0, then one at the end of every step: 1 s, 2 s, 3 s >= 2.5 s at step 3 (not an evaluation step)
    assert metrics["global_step"] == 3
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in history if "eval_exact_match" in r][:2] == [0, 3]
    with pytest.raises(ValueError, match="max_train_minutes must be > 0"):
        _train_args(tmp_path, max_train_minutes=0).validate()


def test_single_process_with_several_gpus_trains_on_one(tmp_path, caplog):
    """HF would wrap the model in nn.DataParallel (batch x GPUs, stats gathered into vectors); we use one GPU."""
    from transformers import TrainingArguments

    from training_experiment import _use_one_gpu_per_process

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args._n_gpu = 2  # what transformers sets for one process that sees two GPUs
    assert args.parallel_mode.value == "not_distributed"
    with caplog.at_level("WARNING", logger="gradmem"):
        _use_one_gpu_per_process(args)
    assert args.n_gpu == 1 and args.parallel_mode.value == "not_parallel"
    assert "NP=2" in caplog.text


def test_parse_cli_seeds_before_the_model_is_built():
    from grad_memgpt import GradMemArgs, build_grad_memgpt
    from training_args import BackboneArgs, TrainArgs, parse_cli
    from training_backbone import load_tokenizer

    def first_weights(seed):
        train_args, backbone_args, gradmem_args = parse_cli(
            TrainArgs, BackboneArgs, GradMemArgs, args=["--seed", str(seed), "--n_layer", "1", "--n_embd", "32",
                                                        "--n_head", "2"])
        model = build_grad_memgpt(backbone_args, gradmem_args, load_tokenizer(backbone_args))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(first_weights(7), first_weights(7))
    assert not torch.equal(first_weights(7), first_weights(8))


# ---------------------------------------------------------------- never lose a run: run folder, resume, checkpoints

def _run(tmp_path, max_steps=6, exp="run", nan_loss=False, **kw):
    """A tiny fake-model run into tmp_path/exp: evaluation and checkpoint every 3 steps."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=len(tok), nan_loss=nan_loss))
    args = _train_args(tmp_path, **{"exp_path": str(tmp_path / exp), "max_steps": max_steps, "eval_steps": 3,
                                    "report_to": "none", **kw})
    return run_experiment(args, model, tok, kv_splits(32, 8), MemoryModelCollator(tok), make_compute_metrics(tok),
                          data_name="kv_test", all_args=[DataArgs(data_path="kv_test")])


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture
def finished_run(tmp_path):
    _run(tmp_path)
    return tmp_path / "run"


def test_overwrite_validates_everything_before_deleting(tmp_path, finished_run):
    before = _listing(finished_run)
    bad = [(dict(init_checkpoint=str(tmp_path / "nonexistent")), FileNotFoundError, "nonexistent"),
           (dict(lr_scheduler_type="cosine_typo"), ValueError, "cosine_typo.*choose one of"),
           (dict(metric_for_best_model="exact_mtch"), ValueError, "exact_mtch.*not a metric")]
    for kw, error, message in bad:
        with pytest.raises(error, match=message):
            _run(tmp_path, overwrite=True, **kw)
        assert _listing(finished_run) == before, kw  # nothing deleted, nothing written
    # a warm start from the run's own checkpoint is loaded before the folder is cleared
    metrics = _run(tmp_path, max_steps=3, overwrite=True, init_checkpoint=str(finished_run / "checkpoint-6"))
    assert metrics["global_step"] == 3 and not (finished_run / "checkpoint-6").exists()


def test_overwrite_clears_only_run_folders(tmp_path):
    data = tmp_path / "data"
    kv_splits(4, 2).save_to_disk(str(data))
    before = _listing(data)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="not a run folder"):
            _run(tmp_path, exp="data", overwrite=overwrite)
        assert _listing(data) == before
    _run(tmp_path, max_steps=3)
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not written by a run: kept
    _run(tmp_path, max_steps=3, overwrite=True, learning_rate=1e-2)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["cli_args"]["learning_rate"] == 1e-2


def test_selected_model_at_run_root_loads_alone(tmp_path, finished_run):
    results = json.loads((finished_run / "all_results.json").read_text())
    model = FakeMemoryModel.from_pretrained(str(finished_run))
    best = FakeMemoryModel.from_pretrained(results["best_model_checkpoint"])
    for (name, a), b in zip(model.state_dict().items(), best.state_dict().values()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(str(finished_run)).get_vocab() == char_tokenizer().get_vocab()


def test_legacy_run_record_config_json_still_resumes_and_overwrites(tmp_path, finished_run):
    """Run folders of older code hold their record as config.json (no model at the root)."""
    for path in finished_run.iterdir():
        if path.is_file() and path.name in ("config.json", "model.safetensors") or path.name.startswith("tokenizer"):
            path.unlink()
    (finished_run / "run_config.json").rename(finished_run / "config.json")
    (finished_run / "notes.txt").write_text("mine")  # foreign: allowed only in a folder with a run record
    legacy = tmp_path / "legacy"
    shutil.copytree(finished_run, legacy)
    with pytest.raises(ValueError, match="learning_rate"):  # the legacy record is compared
        _run(tmp_path, max_steps=9, learning_rate=1e-2)
    assert _run(tmp_path, max_steps=9)["global_step"] == 9
    assert training_runs.find_run_record(finished_run).name == "run_config.json"
    _run(tmp_path, exp="legacy", max_steps=3, overwrite=True)  # --overwrite recognises the legacy run folder
    assert (legacy / "notes.txt").is_file() and not (legacy / "checkpoint-6").exists()


def test_a_model_folder_is_not_a_run_folder(tmp_path):
    """A saved model (config.json, weights, tokenizer) is never cleared by --overwrite."""
    folder = tmp_path / "model"
    FakeMemoryModel(FakeMemoryConfig(vocab_size=len(char_tokenizer()))).save_pretrained(str(folder))
    (folder / "notes.txt").write_text("mine")
    before = _listing(folder)
    with pytest.raises(ValueError, match="not a run folder"):
        _run(tmp_path, exp="model", overwrite=True)
    assert _listing(folder) == before


def test_failed_validation_leaves_no_stub(tmp_path):
    for kw in (dict(init_checkpoint=str(tmp_path / "nonexistent")), dict(metric_for_best_model="acc"),
               dict(lr_scheduler_type="cosine_typo"), dict(report_to="tensorbord")):
        with pytest.raises((ValueError, FileNotFoundError)):
            _run(tmp_path, max_steps=3, **kw)
        assert not (tmp_path / "run").exists(), kw
    # the corrected command is not blocked; a model stat is a metric name too (found by a forward pass)
    assert _run(tmp_path, max_steps=3, metric_for_best_model="inner_loss")["global_step"] == 3


def test_finished_run_is_reported_not_trained_again(tmp_path, finished_run, caplog):
    results = json.loads((finished_run / "all_results.json").read_text())
    before = _listing(finished_run)
    with caplog.at_level("INFO", logger="gradmem"):
        again = _run(tmp_path)
    assert again == results and _listing(finished_run) == before
    assert "finished at step 6" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="gradmem"):
        more = _run(tmp_path, max_steps=9)  # a larger budget continues it, and says so
    assert more["global_step"] == 9 and "continuing to --max_steps 9" in caplog.text
    table = caplog.text[caplog.text.index("results of"):]  # a short final table, not one long JSON line
    for line in ("best checkpoint", "valid exact match", "steps                9", "skipped steps        0",
                 "spike-skipped steps", "rollbacks"):
        assert line in table, line
    assert len(table.splitlines()) <= 8 and "{" not in table


def test_log_level_option_and_tied_weights_are_no_missing_keys(tmp_path):
    import logging

    parse_cli(TrainArgs, args=["--log_level", "warning"])
    assert training_args.logger.level == logging.WARNING
    parse_cli(TrainArgs, args=[])
    assert training_args.logger.level == logging.INFO
    with pytest.raises(SystemExit):
        parse_cli(TrainArgs, args=["--log_level", "loud"])
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    assert training_loop.tied_parameter_names(tied, ["lm_head.weight", "model.norm.weight"]) == {"lm_head.weight"}
    assert training_loop.tied_parameter_names(tied, ["lm_head.weight", "model.embed_tokens.weight"]) == set()


def test_run_stopped_at_metric_stays_stopped_unless_the_rule_changes(tmp_path):
    first = _run(tmp_path, max_steps=9, stop_metric="loss", stop_metric_value=100.0)
    assert first["global_step"] == 3
    assert _run(tmp_path, max_steps=9, stop_metric="loss", stop_metric_value=100.0)["global_step"] == 3
    assert _run(tmp_path, max_steps=9, stop_metric="loss", stop_metric_value=None)["global_step"] == 9


def test_unreadable_checkpoint_with_weights_is_kept(tmp_path, finished_run, caplog):
    (finished_run / "checkpoint-3" / "trainer_state.json").write_text("{")
    best = json.loads((finished_run / "all_results.json").read_text())["best_model_checkpoint"]
    with caplog.at_level("WARNING", logger="gradmem"):
        _run(tmp_path)
    assert (finished_run / "checkpoint-3" / "model.safetensors").is_file()
    assert "checkpoint-3 cannot be resumed from" in caplog.text and "kept" in caplog.text
    assert json.loads((finished_run / "all_results.json").read_text())["best_model_checkpoint"] == best


def test_corrupt_latest_checkpoint_falls_back_or_names_the_file(tmp_path, finished_run, caplog):
    weights = finished_run / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="gradmem"):
        metrics = _run(tmp_path, max_steps=9)
    assert "falling back to the previous complete checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert metrics["global_step"] == 9
    assert json.loads((finished_run / "run_config.json").read_text())["resumed_from"].endswith("checkpoint-3")
    # the only checkpoint broken: a message naming the file, nothing trained
    _run(tmp_path, exp="one", max_steps=3)
    (tmp_path / "one" / "checkpoint-3" / "rng_state.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint-3/rng_state.pth is unreadable or truncated"):
        _run(tmp_path, exp="one", max_steps=6)


def test_checkpoint_folders_oldest_first_as_transformers_names_them(tmp_path):
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    import training_runs

    assert training_runs.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    for name in ("checkpoint-20", "checkpoint-3", "checkpoint-100", "checkpoint-tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-7").write_text("not a folder")
    folders = training_runs.checkpoint_folders(tmp_path)
    assert [f.name for f in folders] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert [training_runs.checkpoint_step(f) for f in folders] == [3, 20, 100]


def test_checkpoint_problems_name_the_file(tmp_path, finished_run):
    ckpt = finished_run / "checkpoint-6"
    assert training_checkpoints.checkpoint_problem(ckpt) is None
    optimizer = ckpt / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    assert "optimizer.pt is unreadable or truncated" in training_checkpoints.checkpoint_problem(ckpt)
    partial = finished_run / "checkpoint-9"  # killed while writing its weights: the only kind ever removed
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x10\x00")
    assert training_checkpoints._interrupted_save(partial) and not training_checkpoints._interrupted_save(ckpt)


def test_full_disk_while_saving_says_so(tmp_path, monkeypatch, capsys):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training_loop.GradMemTrainer, "_save_checkpoint", no_space)
    with pytest.raises(SystemExit) as exit_info:
        training_args.run_cli(lambda: _run(tmp_path, max_steps=3))
    assert exit_info.value.code != 0 and "the disk is full" in str(exit_info.value.code)
    short_write = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")  # what torch.save raises on a full disk
    assert training_args._is_disk_full(short_write) and not training_args._is_disk_full(RuntimeError("shape mismatch"))


def test_skipped_step_counters_survive_resume(tmp_path):
    with pytest.raises(FloatingPointError, match="all 3 optimizer steps .* skipped: nothing was trained"):
        _run(tmp_path, max_steps=3, nan_loss=True, max_consecutive_skipped_steps=5)
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["NonFiniteGuardState"]["attributes"]["consecutive_skipped"] == 3
    with pytest.raises(FloatingPointError, match="5 optimizer steps in a row"):  # 3 before the resume + 2 after
        _run(tmp_path, max_steps=9, nan_loss=True, max_consecutive_skipped_steps=5)


def test_resume_from_a_checkpoint_written_before_the_guard_state_existed(tmp_path, finished_run):
    state_file = finished_run / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["NonFiniteGuardState"]
    state_file.write_text(json.dumps(state))
    metrics = _run(tmp_path, max_steps=9)  # saving checkpoint-9 used to fail with KeyError 'NonFiniteGuardState'
    assert metrics["global_step"] == 9 and (finished_run / "checkpoint-9" / "trainer_state.json").is_file()


def test_run_killed_after_its_last_checkpoint_resumes_without_another_step(tmp_path, finished_run):
    from safetensors.torch import load_file
    before = json.loads((finished_run / "all_results.json").read_text())
    weights = load_file(finished_run / "model.safetensors")
    (finished_run / "all_results.json").unlink()  # killed while writing its results: checkpoint-6 is the end
    metrics = _run(tmp_path)
    assert metrics["global_step"] == 6 and not (finished_run / "checkpoint-7").exists()
    assert metrics["eval_exact_match"] == before["eval_exact_match"]
    again = load_file(finished_run / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_resume_compares_precision_and_needs_the_record(tmp_path, finished_run, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what a preset with PRECISION=bf16 launches
    with pytest.raises(ValueError, match="mixed_precision: 'no' -> 'bf16'"):
        _run(tmp_path, max_steps=9)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    record = finished_run / "run_config.json"
    record.write_text("{")
    with pytest.raises(ValueError, match=f"{record}.*unreadable"):
        _run(tmp_path, max_steps=9)
    record.unlink()
    with pytest.raises(ValueError, match="no run record run_config.json.*--resume_without_record"):
        _run(tmp_path, max_steps=9, learning_rate=1e-2)
    metrics = _run(tmp_path, max_steps=9, learning_rate=1e-2, resume_without_record=True)
    assert metrics["global_step"] == 9 and json.loads(record.read_text())["resumed_without_record"]


# ---------------------------------------------------------------- bad data and options

def test_data_checks_cover_every_row(caplog):
    tok = char_tokenizer()
    rows = kv_splits(400, 4)
    bad = rows["train"].map(lambda row, i: {"context": row["context"] + ("#" if i == 300 else "")}, with_indices=True)
    with pytest.raises(ValueError, match=r"does not know the characters \['#'\]"):
        training_data.check_tokenizer_covers(tok, bad)
    empty = DatasetDict(train=rows["train"].map(lambda row: {"target": ""}), valid=rows["valid"])
    with pytest.raises(ValueError, match="every target of split 'train' is empty"):
        training_data.check_targets(empty)
    some = DatasetDict(train=rows["train"].map(lambda row, i: {"target": "" if i < 3 else row["target"]},
                                               with_indices=True))
    with caplog.at_level("WARNING", logger="gradmem"):
        training_data.check_targets(some)
    assert "3 of 400 rows of split 'train' have an empty target" in caplog.text
    longest = max(len(ids) for ids in tok(list(rows["train"]["context"]))["input_ids"])
    training_data.check_memory_inputs_fit(tok, rows, positions=longest + 4, n_prefix=4)
    with pytest.raises(ValueError, match=f"context of up to {longest} tokens .* --max_context_length"):
        training_data.check_memory_inputs_fit(tok, rows, positions=longest + 3, n_prefix=4)
    training_data.check_memory_inputs_fit(tok, rows, positions=longest + 3, n_prefix=4, max_context_length=8)


def test_option_values_are_checked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bad = [(["--inner_lr", "nan"], "inner_lr must be a finite number"),
           (["--learning_rate", "inf"], "learning_rate must be a finite number"),
           (["--max_eval_samples", "0"], "max_eval_samples must be >= 1"),
           (["--max_context_length", "0"], "max_context_length must be >= 1")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_cli(TrainArgs, GradMemArgs, DataArgs, args=args)
    t, d = parse_cli(TrainArgs, DataArgs, args=["--stop_metric_value", "None", "--max_context_length=none"])
    assert t.stop_metric_value is None and d.max_context_length is None


def test_warm_start_must_load_every_trainable_tensor(tmp_path):
    from safetensors.torch import save_file

    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=48))
    weights = {k: v.contiguous() for k, v in FakeMemoryModel(FakeMemoryConfig(vocab_size=48)).state_dict().items()}
    one_layer = {k: v for k, v in weights.items() if ".layers.1." not in k}  # a 1-layer checkpoint
    save_file(one_layer, str(tmp_path / "one_layer.safetensors"))
    with pytest.raises(ValueError, match="leaves 9 of the model's .* trainable tensors unloaded.*--init_checkpoint_partial"):
        training_checkpoints.load_init_checkpoint(model, str(tmp_path / "one_layer.safetensors"))
    training_checkpoints.load_init_checkpoint(model, str(tmp_path / "one_layer.safetensors"), partial=True)
    assert torch.equal(model.lm.model.layers[0].mlp.up_proj.weight, one_layer["lm.model.layers.0.mlp.up_proj.weight"])
    other_family = {"transformer." + k: v for k, v in weights.items()}  # e.g. a GPT-2 run into a Llama model
    save_file(other_family, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="unloaded"):
        training_checkpoints.load_init_checkpoint(model, str(tmp_path / "other.safetensors"))
    wider = FakeMemoryModel(FakeMemoryConfig(vocab_size=48, width=64))
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="another width: --n_embd 64 in the checkpoint, 32 here"):
        training_checkpoints.load_init_checkpoint(model, str(tmp_path / "wide.safetensors"))


def test_cli_user_errors_are_one_line_bugs_keep_their_traceback(capsys):
    def user_error():
        raise ValueError("--exp_path x is not a run folder")

    with pytest.raises(SystemExit) as exit_info:
        training_args.run_cli(user_error)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --exp_path x is not a run folder\n"

    def bug():
        raise KeyError("oops")

    with pytest.raises(KeyError):
        training_args.run_cli(bug)


def test_metrics_added_by_callbacks_reach_the_loggers(tmp_path):
    """A callback's late metric (declared in metric_names, as the SQuAD generation callback does) is passed to
    on_log, so tensorboard and wandb get it like every other metric."""
    from transformers import TrainerCallback

    class LateMetric(TrainerCallback):
        metric_names = ("late_score",)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            prefix = "test" if any(k.startswith("test_") for k in metrics) else "eval"
            metrics[f"{prefix}_late_score"] = 0.25

    class Recorder(TrainerCallback):
        logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(dict(logs))

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = FakeMemoryModel(FakeMemoryConfig(vocab_size=len(tok)))
    args = _train_args(tmp_path, exp_path=str(tmp_path / "run"), max_steps=3, eval_steps=3, report_to="none")
    run_experiment(args, model, tok, kv_splits(32, 8), MemoryModelCollator(tok), make_compute_metrics(tok),
                   data_name="kv_test", all_args=[DataArgs(data_path="kv_test")],
                   extra_callbacks=[LateMetric(), Recorder()])
    assert any(r.get("eval_late_score") == 0.25 for r in Recorder.logged)


def test_the_scheduler_saves_its_last_lrs_as_floats(tmp_path):
    """fast_step holds each group's lr as a (GPU) tensor and the scheduler keeps those as its last lrs: a scheduler.pt
    holding GPU tensors loads only where a GPU is, so the trainer saves them as floats."""
    from transformers import TrainingArguments

    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], lr_scheduler_type="linear", learning_rate=1e-3)
    trainer = training_loop.GradMemTrainer(model=model, args=args)
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = trainer.create_scheduler(100, trainer.optimizer)
    trainer.optimizer.param_groups[0]["lr"] = torch.tensor(1e-3)  # what fast_step makes of it on a GPU
    scheduler.step()
    live = scheduler.get_last_lr()
    assert isinstance(live[0], torch.Tensor)
    trainer._save_optimizer_and_scheduler(str(tmp_path))
    saved = torch.load(tmp_path / "scheduler.pt", weights_only=True)["_last_lr"]
    assert type(saved[0]) is float and saved[0] == pytest.approx(float(live[0]))
    assert scheduler.get_last_lr() is live  # saving left the live state as it was


def _resume_with_a_forced_collapse(tmp_path, run_dir, recorded_best, monkeypatch):
    """Resume run_dir (saved at steps 3 and 6) to step 12 with `recorded_best` as the best checkpoint its newest
    state names, the first evaluation after resuming (step 9) a collapse: (metrics, the one rollback record)."""
    import guards

    state_file = run_dir / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = str(recorded_best)
    state_file.write_text(json.dumps(state))
    forced = iter(["forced collapse"])
    monkeypatch.setattr(guards.CollapseRollback, "collapsed", lambda self, metrics: next(forced, None))
    metrics = _run(tmp_path, max_steps=12)
    assert json.loads((run_dir / "run_config.json").read_text())["resumed_from"].endswith("checkpoint-6")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    (record,) = [r for r in history if "rollback" in r]
    return metrics, record


def test_a_resumed_run_whose_best_checkpoint_is_gone_rolls_back_to_a_saved_one(tmp_path, finished_run, monkeypatch):
    """Resumed on another machine, the trainer forgets a best checkpoint it cannot find: a collapse then rolls back to
    the checkpoint still saved (here the resumed one), through the real Trainer's arguments and state."""
    shutil.rmtree(finished_run / "checkpoint-3")  # what a record from another machine names
    metrics, record = _resume_with_a_forced_collapse(tmp_path, finished_run, finished_run / "checkpoint-3",
                                                     monkeypatch)
    assert (record["step"], record["from_checkpoint"], record["lr_scale"]) == (9, "checkpoint-6", 0.5)
    assert metrics["rollbacks"] == 1 and metrics["global_step"] == 12


def test_a_resumed_run_rolls_back_to_a_best_checkpoint_of_weights_alone(tmp_path, finished_run, monkeypatch):
    """A best checkpoint put back as its weights alone (a shipped model, no optimizer or trainer state) is kept as the
    best, is not resumed from, and is what a collapse rolls back to."""
    best = finished_run / "checkpoint-3"
    for path in best.iterdir():
        if path.name != "model.safetensors":
            path.unlink()
    metrics, record = _resume_with_a_forced_collapse(tmp_path, finished_run, best, monkeypatch)
    assert (record["step"], record["from_checkpoint"]) == (9, "checkpoint-3")
    assert metrics["global_step"] == 12
