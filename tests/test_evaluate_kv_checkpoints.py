"""evaluate_kv_checkpoints.py: a saved KV checkpoint re-evaluated on fresh samples, with its own or other WRITE
settings (--K / --inner_lr), one row per combination."""
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

import evaluate_kv_checkpoints
from grad_memgpt import GradMemGPT, GradMemGPTConfig


def tiny_checkpoint(folder, hidden_size=16, **options):
    """A one-layer KV GradMem checkpoint with its tokenizer saved in `folder` (K=2, inner lr 0.04 unless `options`
    say otherwise)."""
    tokenizer = AutoTokenizer.from_pretrained("tokenizers/kv_alphabet_62")
    backbone = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    GradMemGPT(GradMemGPTConfig(base_config=backbone, n_mem_tokens=2, **{"K": 2, "lr": 0.04, **options})
               ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "N2")  # the folder name says how many pairs


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


def test_evaluation_attention_gives_the_trained_attention_s_answers(checkpoint):
    """The evaluation loads sdpa attention; its WRITE and READ give the logits of the checkpoint's own attention."""
    own = GradMemGPT.from_pretrained(str(checkpoint)).eval()
    fast = evaluate_kv_checkpoints.load_for_evaluation(checkpoint)
    assert fast.model.config._attn_implementation == "sdpa" != own.model.config._attn_implementation
    generator = torch.Generator().manual_seed(0)
    batch = {"context_input_ids": torch.randint(3, 60, (3, 12), generator=generator),
             "query_input_ids": torch.randint(3, 60, (3, 6), generator=generator)}
    batch["labels"] = batch["query_input_ids"].clone()
    with torch.no_grad():
        expected, got = own(**batch), fast(**batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)


def test_shipped_checkpoints_load_alone_and_fit_the_size_limit():
    """Every shipped results/kv_checkpoints/N<n> loads from its own folder (config, weights, tokenizer) and says where it
    came from; all of them together stay within 25 MB."""
    folders = evaluate_kv_checkpoints.checkpoint_folders([evaluate_kv_checkpoints.DEFAULT_ROOT])
    assert [f.name for f in folders] == ["N8", "N16", "N32", "N64", "N96"]
    assert sum(p.stat().st_size for f in folders for p in f.iterdir()) <= 25 * 10**6
    for folder in folders:
        model = GradMemGPT.from_pretrained(str(folder))
        assert model.n_mem_tokens == 8 and len(AutoTokenizer.from_pretrained(str(folder))) == model.get_input_embeddings().num_embeddings
        provenance = json.loads((folder / "provenance.json").read_text())
        assert provenance["stage"] == folder.name and provenance["test_samples"] >= 2000


def test_write_diagnostics_split_the_inner_loss_by_role(checkpoint):
    """bench/kv_write_diagnostics.py: the roles follow the generator's `!kk:vv!` pairs and closing `|`; the role losses
    after the WRITE, weighted by their token counts, are the model's own inner loss after the last step."""
    import sys
    from pathlib import Path

    import kv_dataset_utils

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kv_write_diagnostics as diag

    [context] = kv_dataset_utils.generate_kv_samples(kv_dataset_utils.parse_dataset_name("N3-K2V2-V62"), 1, 1,
                                                     kv_dataset_utils.TEST_STREAM)["context"]
    roles = [diag.ROLES[i] for i in diag.context_roles(len(context))]
    assert {c for c, r in zip(context, roles) if r == "separator"} == set("!:|")
    assert all(c.isalnum() for c, r in zip(context, roles) if r != "separator")
    assert "".join(c for c, r in zip(context, roles) if r == "key") == "".join(
        context[7 * i + 1: 7 * i + 3] for i in range(3))

    (row,) = diag.main([str(checkpoint), "--samples", "6", "--batch_size", "4"])
    assert row["K"] == 2 and all(row["before"][r] > 0 for r in diag.ROLES)
    model = evaluate_kv_checkpoints.load_for_evaluation(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    data = kv_dataset_utils.generate_kv_samples(kv_dataset_utils.parse_dataset_name("N2-K2V2-V62"), 6, 1,
                                                kv_dataset_utils.TEST_STREAM)
    ids = torch.tensor([tokenizer(c, add_special_tokens=False)["input_ids"] for c in data["context"]])
    with torch.no_grad():
        _, stats = model.write(ids)
    counts = {r: sum(1 for i in diag.context_roles(ids.shape[1]) if diag.ROLES[i] == r) for r in diag.ROLES}
    total = sum(row["after"][r] * counts[r] for r in diag.ROLES) / sum(counts.values())
    assert abs(total - stats["inner_loss"].item()) < 1e-5
    with pytest.raises(SystemExit):
        diag.main([str(checkpoint), "--K", "0"])


def test_write_diagnostics_exact_match_by_queried_position(checkpoint, monkeypatch):
    """--by_position: each fresh sample's answer is counted once, in the group of the pair its query asks for."""
    import sys
    from pathlib import Path

    import kv_dataset_utils

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kv_write_diagnostics as diag

    data = kv_dataset_utils.generate_kv_samples(kv_dataset_utils.parse_dataset_name("N5-K2V2-V62"), 40, 1,
                                                kv_dataset_utils.TEST_STREAM)
    positions = [diag.queried_position(r) for r in evaluate_kv_checkpoints.fresh_samples(5, 40, 1)]
    for context, query, target, position in zip(data["context"], data["query"], data["target"], positions):
        assert context[7 * position: 7 * position + 7] == query[1:] + target[:2] + "!"
    assert len(set(positions)) == 5  # every position is asked for

    first_pair_asked = [diag.queried_position(r) == 0 for r in evaluate_kv_checkpoints.fresh_samples(2, 12, 1)]

    def answers_right_where_the_first_pair_is_asked(model, batches, ignore_ids, on_batch):
        done = 0
        for batch in batches:  # the fresh samples in their order, 5 per batch
            n = batch["context_input_ids"].shape[0]
            on_batch(batch, None, torch.tensor(first_pair_asked[done: done + n]))
            done += n

    monkeypatch.setattr(diag, "generated_exact_match", answers_right_where_the_first_pair_is_asked)
    (row,) = diag.main([str(checkpoint), "--samples", "12", "--batch_size", "5", "--by_position", "2"])
    asked = sum(first_pair_asked)
    assert 0 < asked < 12 and row["by_position"] == [(1, 1, asked, asked), (2, 2, 0, 12 - asked)]
    # groups that do not divide N: each label names the positions its group counts
    first_pair_asked = [True] * 40
    table = diag.exact_match_by_position(checkpoint, 5, 40, 1, 10, 2)
    assert [(first, last) for first, last, _, _ in table] == [(1, 3), (4, 5)]
    assert [n for *_, n in table] == [sum(1 <= p + 1 <= 3 for p in positions), sum(p + 1 >= 4 for p in positions)]
    with pytest.raises(SystemExit):
        diag.main([str(checkpoint), "--by_position", "3"])  # more groups than the 2 pairs


def test_meta_gradient_norm_against_K_and_inner_lr(checkpoint):
    """bench/kv_meta_grad.py: each row's gradient norm is that of the training loss with that K and inner lr,
    computed here on its own; the checkpoint's settings come back; --init re-initialises from the configuration."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kv_meta_grad

    rows = kv_meta_grad.main([str(checkpoint), "--samples", "4", "--K", "1", "3", "--inner_lr", "0.5"])
    assert [(r["K"], r["inner_lr"]) for r in rows] == [(1, 0.5), (3, 0.5)]
    model = GradMemGPT.from_pretrained(str(checkpoint)).train()
    assert (model.config.K, model.config.lr) == (2, 0.04)
    batch = next(evaluate_kv_checkpoints.fresh_batches(AutoTokenizer.from_pretrained(str(checkpoint)), 2, 4, 1, 4))
    model.config.K, model.config.lr = 3, 0.5
    grads = torch.autograd.grad(model(**batch).loss, [p for p in model.parameters() if p.requires_grad],
                                allow_unused=True)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item()
    assert rows[1]["grad_norm"] == pytest.approx(norm, rel=1e-5) and rows[1]["grad_norm"] != rows[0]["grad_norm"]
    same = kv_meta_grad.main([str(checkpoint), "--init", "--seed", "0", "--samples", "4", "--K", "3", "--inner_lr",
                              "0.5"])  # the fixture's weights came from seed 0
    other = kv_meta_grad.main([str(checkpoint), "--init", "--seed", "1", "--samples", "4", "--K", "3", "--inner_lr",
                               "0.5"])
    assert same[0]["grad_norm"] == pytest.approx(norm, rel=1e-5) and other[0]["grad_norm"] != pytest.approx(norm)
    with pytest.raises(SystemExit):
        kv_meta_grad.main([str(checkpoint), "--K", "0"])


def test_a_folder_whose_name_gives_no_pairs_is_refused_before_loading(tmp_path):
    """The fresh samples' pairs per context come from the folder name (N<pairs>); another name is a clear error."""
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="N<pairs>"):
        evaluate_kv_checkpoints.checkpoint_folders([tmp_path / "best"])
    (tmp_path / "N12").mkdir()
    (tmp_path / "N12" / "config.json").write_text("{}")
    (tmp_path / "Notes").mkdir()
    (tmp_path / "Notes" / "config.json").write_text("{}")
    assert evaluate_kv_checkpoints.checkpoint_folders([tmp_path]) == [tmp_path / "N12"]


def test_a_wrong_folder_among_several_fails_before_the_table_starts(tmp_path, capsys):
    """main resolves every folder first: a misnamed one is an error with no half-written table before it."""
    (tmp_path / "N12").mkdir()
    (tmp_path / "N12" / "config.json").write_text("{}")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="N<pairs>"):
        evaluate_kv_checkpoints.main([str(tmp_path / "N12"), str(tmp_path / "best")])
    assert capsys.readouterr().out == ""
