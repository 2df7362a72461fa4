import pytest
from datasets import Dataset, DatasetDict

from phonebook_utils import build_phonebook_dataset, load_phonebook, preprocess_dataset, preprocess_example


def test_preprocess_as_reference():
    assert preprocess_example(" A: 1\nB: 2 ", " B: ", " 2 ") == {"context": "A: 1\nB: 2", "query": "\nB: ",
                                                                 "target": "2"}


def test_generator_shape_and_determinism():
    data = build_phonebook_dataset(n_entries=8, n_train=20, n_valid=5, seed=3)
    assert {split: len(rows) for split, rows in data.items()} == {"train": 20, "valid": 5}
    for row in data["train"]:
        lines = row["context"].split("\n")
        assert len(lines) == 8
        book = dict(line.split(": ") for line in lines)
        assert len(book) == 8 and len(set(book.values())) == 8   # distinct names, distinct numbers
        name = row["query"].removesuffix(":")
        assert book[name] == row["target"]
    again = build_phonebook_dataset(n_entries=8, n_train=20, n_valid=5, seed=3)
    other = build_phonebook_dataset(n_entries=8, n_train=20, n_valid=5, seed=4)
    assert again["train"].to_list() == data["train"].to_list()
    assert other["train"].to_list() != data["train"].to_list()
    assert data["valid"].to_list() != data["train"].to_list()[:5]
    with pytest.raises(ValueError, match="n_entries"):
        build_phonebook_dataset(n_entries=0, n_train=1, n_valid=1, seed=0)


def test_load_local_and_test_split_becomes_valid(tmp_path):
    path = str(tmp_path / "phonebook_N4")
    build_phonebook_dataset(n_entries=4, n_train=6, n_valid=2, seed=0).save_to_disk(path)
    data = load_phonebook(path)
    assert list(data) == ["train", "valid"] and len(data["valid"]) == 2
    row = data["train"][0]
    assert row["query"].startswith("\n") and row["query"].endswith(": ")
    assert row["target"] in row["context"]

    rows = Dataset.from_dict({"context": ["A: 1"], "query": ["A:"], "target": ["1"]})
    assert list(preprocess_dataset(DatasetDict({"train": rows, "test": rows}))) == ["train", "valid"]
    with pytest.raises(ValueError, match="a valid and/or test split"):
        preprocess_dataset(DatasetDict({"train": rows}))
    with pytest.raises(ValueError, match="missing columns"):
        preprocess_dataset(DatasetDict({"train": rows.remove_columns("query"), "valid": rows}))


def test_preparing_is_idempotent():
    raw = build_phonebook_dataset(n_entries=3, n_train=4, n_valid=2, seed=5)
    once = preprocess_dataset(raw)
    assert preprocess_dataset(once)["train"].to_list() == once["train"].to_list()


def test_a_test_split_is_kept_beside_valid(tmp_path):
    with_test = build_phonebook_dataset(n_entries=4, n_train=6, n_valid=2, seed=0, n_test=3)
    without = build_phonebook_dataset(n_entries=4, n_train=6, n_valid=2, seed=0)
    assert {split: len(rows) for split, rows in with_test.items()} == {"train": 6, "valid": 2, "test": 3}
    assert with_test["train"].to_list() == without["train"].to_list()  # its own stream: train, valid unchanged
    assert with_test["valid"].to_list() == without["valid"].to_list()
    assert with_test["test"].to_list() != with_test["valid"].to_list()[:3]
    path = str(tmp_path / "phonebook_N4")
    with_test.save_to_disk(path)
    data = load_phonebook(path)
    assert list(data) == ["train", "valid", "test"] and len(data["test"]) == 3
    assert data["test"][0]["query"].startswith("\n")
