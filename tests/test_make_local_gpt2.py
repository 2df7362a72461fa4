import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import make_local_gpt2
from phonebook_utils import build_phonebook_dataset


def test_saves_a_loadable_gpt2_folder_from_a_saved_dataset(tmp_path):
    data = tmp_path / "pb"
    build_phonebook_dataset(4, 20, 4, seed=0).save_to_disk(str(data))
    out = make_local_gpt2.main(["--texts", str(data), "--out", str(tmp_path / "gpt2"), "--vocab_size", "300",
                                "--n_layer", "1", "--n_embd", "16", "--n_head", "2"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.pad_token is None and tokenizer.eos_token == make_local_gpt2.EOS
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size == len(tokenizer)
    text = "Alice: 415-202-7731"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text)  # BPE merged something, round trip exact


def test_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_local_gpt2.read_texts([str(tmp_path / "missing")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("Some text here.")
    with pytest.raises(SystemExit):
        make_local_gpt2.main(["--texts", str(tmp_path / "books"), "--out", str(tmp_path / "out")])
