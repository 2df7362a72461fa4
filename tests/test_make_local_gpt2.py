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


def test_tokenizer_only_with_pad_and_split_digits_serves_a_from_scratch_backbone(tmp_path):
    from phonebook_utils import preprocess_dataset
    from training_args import BackboneArgs
    from training_backbone import load_tokenizer
    from training_collators import IGNORE_INDEX, MemoryModelCollator

    data = tmp_path / "pb"
    build_phonebook_dataset(4, 50, 4, seed=0).save_to_disk(str(data))
    out = str(tmp_path / "tok")
    make_local_gpt2.main(["--texts", str(data), "--out", out, "--tokenizer_only", "--pad_token", "--split_digits",
                          "--vocab_size", "600"])
    assert not list((tmp_path / "tok").glob("*.safetensors")) and not (tmp_path / "tok" / "config.json").exists()
    tokenizer = load_tokenizer(BackboneArgs(base_model="llama", tokenizer_path=out))
    assert tokenizer.pad_token == make_local_gpt2.PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "Alice Moreno: 415-202-7731"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    assert tokens[-12:] == ["Ġ4", "1", "5", "-", "2", "0", "2", "-", "7", "7", "3", "1"]  # a digit a token
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    # the space between the query's ':' and the number is part of the first answer token, so it is labelled and
    # decoding from the query without its trailing space (answer_tasks.read_prompt) starts where training did
    row = preprocess_dataset(build_phonebook_dataset(4, 1, 1, seed=3))["train"][0]
    batch = MemoryModelCollator(tokenizer)([{**row, "target": row["target"] + tokenizer.eos_token}])
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == " " + row["target"] + tokenizer.eos_token
