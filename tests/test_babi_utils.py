import os

import pytest
from datasets import Dataset, DatasetDict

from babi_utils import find_task_files, load_babi_from_disk, load_babi_text, parse_babi_lines

BABI_DIR = os.path.join(os.path.dirname(__file__), "data", "babi")


def test_text_format_one_row_per_question_story_resets():
    data = load_babi_text(BABI_DIR, "qa1")
    assert {split: len(rows) for split, rows in data.items()} == {"train": 3, "valid": 1, "test": 2}
    train = data["train"]
    # question 1: facts before it; reference strings keep one trailing space on context and query
    assert train[0] == {"context": "Mary moved to the bathroom. John went to the hallway. ",
                        "query": "Where is Mary? ", "target": "bathroom"}
    # question 2: all statements of the story so far, earlier questions excluded
    assert train[1]["context"] == ("Mary moved to the bathroom. John went to the hallway. "
                                   "Daniel went back to the hallway. Sandra moved to the garden. ")
    assert train[1]["target"] == "hallway"
    # numbering restarts at 1: a new story, the old facts are gone
    assert train[2]["context"] == "Sandra travelled to the office. Sandra went to the bathroom. "
    assert data["test"][1]["context"] == "Daniel went to the garden. Mary went to the kitchen. "


@pytest.mark.parametrize("lines, message", [
    (["1 Mary went home.", "Where is Mary?\thome\t1"], "cannot parse"),
    (["1 Mary went home.", "3 Where is Mary?\thome\t1"], "follows 1"),
    (["1 Mary went home.", "2 Where is Mary?\t\t1"], "needs a question and an answer"),
    (["1 Mary went home.", "2 Where is Mary?\thome\t7"], "supporting facts"),
    (["1 Where is Mary?\thome"], "no story statements"),
    (["1 Mary went home."], "no question lines"),
])
def test_bad_lines_are_rejected(lines, message):
    with pytest.raises(ValueError, match=message):
        parse_babi_lines(lines, source="fixture")


def test_unknown_task_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown bAbI task 'qa21'"):
        find_task_files(BABI_DIR, "qa21")
    with pytest.raises(ValueError, match="no qa2 train file"):
        find_task_files(BABI_DIR, "qa2")
    # a long-named file (en-10k style) is found too; qa1 never matches qa10
    (tmp_path / "qa10_indefinite-knowledge_train.txt").write_text("1 a b.\n2 c?\td\t1\n")
    (tmp_path / "qa10_indefinite-knowledge_valid.txt").write_text("1 a b.\n2 c?\td\t1\n")
    (tmp_path / "qa10_indefinite-knowledge_test.txt").write_text("1 a b.\n2 c?\td\t1\n")
    assert set(find_task_files(str(tmp_path), "qa10")) == {"train", "valid", "test"}
    with pytest.raises(ValueError, match="no qa1 train file"):
        find_task_files(str(tmp_path), "qa1")


def test_save_to_disk_forms(tmp_path):
    raw = Dataset.from_dict({"input": [" Mary went home. "], "question": ["Where is Mary?"], "target": [" home "]})
    DatasetDict({"train": raw, "valid": raw, "test": raw}).save_to_disk(str(tmp_path / "raw"))
    data = load_babi_from_disk(str(tmp_path / "raw"))
    assert list(data) == ["train", "valid", "test"]
    assert data["test"][0] == {"context": "Mary went home. ", "query": "Where is Mary? ", "target": "home"}

    prepared = Dataset.from_dict({"context": ["c "], "query": ["q "], "target": ["t"]})
    DatasetDict({"train": prepared, "valid": prepared}).save_to_disk(str(tmp_path / "prepared"))
    assert load_babi_from_disk(str(tmp_path / "prepared"))["valid"][0] == {"context": "c ", "query": "q ",
                                                                           "target": "t"}
    other = Dataset.from_dict({"text": ["x"]})
    DatasetDict({"train": other, "valid": other}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="expected input/question/target"):
        load_babi_from_disk(str(tmp_path / "other"))
    DatasetDict({"train": prepared}).save_to_disk(str(tmp_path / "no_valid"))
    with pytest.raises(ValueError, match="train and valid"):
        load_babi_from_disk(str(tmp_path / "no_valid"))


def test_question_line_with_spaces_instead_of_tabs_is_an_error():
    lines = ["1 Mary moved to the bathroom.", "2 Where is Mary?  bathroom  1"]
    with pytest.raises(ValueError, match="line 2: .* looks like a question line without tabs"):
        parse_babi_lines(lines)
