"""evaluate_kv_checkpoints.py: a saved KV checkpoint re-evaluated on fresh samples, with its own or other WRITE
settings (--K / --inner_lr), one row per combination."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

import evaluate_kv_checkpoints
from grad_memgpt import GradMemGPT, GradMemGPTConfig


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained("tokenizers/kv_alphabet_62")
    backbone = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "N2"  # the folder name says how many pairs
    GradMemGPT(GradMemGPTConfig(base_config=backbone, n_mem_tokens=2, K=2, lr=0.04)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_write_settings_are_replaced_per_row(checkpoint, monkeypatch, capsys):
    seen = []

    def fake_exact_match(model, batches, stop_ids):
        seen.append((*model.write_steps(), sum(len(next(iter(b.values()))) for b in batches)))
        return {"generated_exact_match": 0.5, "generated_samples": 6}

    monkeypatch.setattr(evaluate_kv_checkpoints, "generated_exact_match", fake_exact_match)
    rows = evaluate_kv_checkpoints.main([str(checkpoint), "--samples", "6", "--K", "1", "3", "--inner_lr", "0.1"])
    assert seen == [(1, 0.1, 6), (3, 0.1, 6)]
    assert [(r["trained_K"], r["trained_inner_lr"], r["K"], r["inner_lr"]) for r in rows] == [(2, 0.04, 1, 0.1),
                                                                                            (2, 0.04, 3, 0.1)]
    assert "| 2 / 0.04 | 3 / 0.1 | 0.5000 ± 0.2041 | 6 |" in capsys.readouterr().out


def test_own_settings_by_default_and_a_real_evaluation(checkpoint):
    (row,) = evaluate_kv_checkpoints.main([str(checkpoint), "--samples", "4"])
    assert (row["K"], row["inner_lr"], row["samples"]) == (2, 0.04, 4) and 0.0 <= row["exact_match"] <= 1.0


def test_bad_write_settings_are_refused(checkpoint):
    for bad in (["--K", "0"], ["--inner_lr", "-1"]):
        with pytest.raises(SystemExit):
            evaluate_kv_checkpoints.main([str(checkpoint), *bad])
