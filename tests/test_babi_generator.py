"""babi_generator.py: bAbI task 1 stories in the original text format, read by babi_utils as they are."""
import re

import pytest

import babi_generator
from babi_utils import find_task_files, load_babi_text, read_babi_file

SENTENCE = re.compile(r"^(\w+) (?:moved|went|went back|travelled|journeyed) to the (\w+)\.$")


@pytest.fixture(scope="module")
def babi_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("babi_local")
    babi_generator.main(["--out", str(out), "--n_train", "203", "--n_valid", "30", "--n_test", "40", "--seed", "7"])
    return out


def test_files_have_the_original_names_and_parse_with_babi_utils(babi_dir):
    paths = find_task_files(str(babi_dir), "qa1")
    assert {split: p.split("/")[-1] for split, p in paths.items()} == {
        split: f"qa1_single-supporting-fact_{split}.txt" for split in ("train", "valid", "test")}
    data = load_babi_text(str(babi_dir), "qa1")
    assert {split: len(rows) for split, rows in data.items()} == {"train": 203, "valid": 30, "test": 40}
    assert len(read_babi_file(paths["test"])) == 40
    row = data["train"][0]
    assert row["context"].endswith(". ") and re.fullmatch(r"Where is \w+\? ", row["query"])


def test_text_format_numbering_and_supporting_facts(babi_dir):
    lines = (babi_dir / "qa1_single-supporting-fact_train.txt").read_text().splitlines()
    facts, previous, stories, n_questions = {}, 0, 0, 0
    for line in lines:
        number, text = line.split(" ", 1)
        number = int(number)
        if number == 1:
            facts, stories = {}, stories + 1
        else:
            assert number == previous + 1
        previous = number
        if "\t" not in text:
            facts[number] = SENTENCE.fullmatch(text).groups()
            continue
        question, answer, support = text.split("\t")
        n_questions += 1
        asked = re.fullmatch(r"Where is (\w+)\? ", question)[1]
        # the answer is the room of the last statement about the person asked, and that statement is the support
        last = max(n for n, (person, _) in facts.items() if person == asked)
        assert (int(support), answer) == (last, facts[last][1])
        assert answer in babi_generator.ROOMS and asked in babi_generator.PEOPLE
    assert previous <= 15 and n_questions == 203 and stories == 41  # 5 questions a story, the last one 3


def test_every_answer_is_the_last_room_of_the_person_asked(babi_dir):
    for split, rows in load_babi_text(str(babi_dir), "qa1").items():
        for row in rows:
            asked = row["query"].split()[2].rstrip("?")
            rooms = [SENTENCE.fullmatch(s.strip() + ".").groups() for s in row["context"].split(".") if s.strip()]
            assert [room for person, room in rooms if person == asked][-1] == row["target"], (split, row)


def test_splits_are_disjoint_and_generation_is_deterministic(babi_dir, tmp_path):
    data = load_babi_text(str(babi_dir), "qa1")
    samples = {split: {(r["context"], r["query"]) for r in rows} for split, rows in data.items()}
    assert not samples["train"] & samples["valid"] and not samples["train"] & samples["test"]
    assert not samples["valid"] & samples["test"]
    again = babi_generator.write_babi_qa1(str(tmp_path / "again"), 203, 30, 40, seed=7)
    other = babi_generator.write_babi_qa1(str(tmp_path / "other"), 203, 30, 40, seed=8)
    for split in ("train", "valid", "test"):
        original = (babi_dir / f"qa1_single-supporting-fact_{split}.txt").read_text()
        assert open(again[split]).read() == original
        assert open(other[split]).read() != original


def test_short_stories_and_an_exhausted_sample_space(tmp_path, capsys, monkeypatch):
    paths = babi_generator.main(["--out", str(tmp_path / "short"), "--n_train", "50", "--n_valid", "10",
                                 "--n_test", "10", "--questions_per_story", "1"])
    lines = open(paths["train"]).read().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["1", "2", "3"] * 50  # two statements, then the question
    assert len(load_babi_text(str(tmp_path / "short"), "qa1")["train"]) == 50
    # 4 people x 5 verbs x 6 rooms: far fewer than 10**6 distinct two-statement samples; refused, not a hang
    monkeypatch.setattr(babi_generator, "MAX_REDRAWS", 50)
    with pytest.raises(SystemExit):
        babi_generator.main(["--out", str(tmp_path / "too_many"), "--n_train", "1000000", "--questions_per_story", "1"])
    assert "too few distinct samples" in capsys.readouterr().err
    assert not (tmp_path / "too_many").exists()


def test_refuses_existing_files_and_bad_sizes(babi_dir, capsys):
    with pytest.raises(SystemExit):
        babi_generator.main(["--out", str(babi_dir)])
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_test must be >= 1"):
        babi_generator.generate_babi_qa1(10, 10, 0, seed=0)
    with pytest.raises(ValueError, match="questions_per_story must be >= 1"):
        babi_generator.generate_babi_qa1(10, 10, 10, seed=0, per_story=0)
