import json
import os

import pytest

from squad_utils import (LAYOUTS, exact_match_score, f1_score, load_squad, make_example, normalize_answer,
                         read_squad_v1_json, squad_v1_scores)

SQUAD_DIR = os.path.join(os.path.dirname(__file__), "data", "squad")


# ---------------------------------------------------------------------------------------------- official metric

def test_normalize_answer_lower_punctuation_articles_whitespace():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("  theatre  ") == "theatre"  # 'the' only as a whole word
    assert normalize_answer("A") == ""


def test_exact_match_ignores_articles_and_punctuation():
    assert exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_is_token_overlap():
    # prediction 'late september harvest' vs gold 'late september': p = 2/3, r = 1 -> f1 = 0.8
    assert f1_score("late September harvest", "late September") == pytest.approx(0.8)
    assert f1_score("nothing shared", "late September") == 0.0
    # repeated tokens count with multiplicity (Counter intersection): p = 1/2, r = 1
    assert f1_score("pears pears", "pears") == pytest.approx(2 / 3)
    # an answer made only of articles normalises to nothing: v1.1 scores it 0
    assert f1_score("the", "the") == 0.0 and exact_match_score("the", "the") == 1.0


def test_scores_take_max_over_gold_answers_and_mean_over_questions():
    golds = [["late September", "in late September", "September"], ["apples and pears"]]
    scores = squad_v1_scores(["September", "apples"], golds)
    assert scores["squad_exact_match"] == pytest.approx(0.5)           # EM 1 (3rd gold), EM 0
    assert scores["squad_f1"] == pytest.approx((1.0 + 0.5) / 2)        # 'apples' vs 'apples and pears': 2*1*1/3/(1+1/3)
    with pytest.raises(ValueError, match="gold answers"):
        squad_v1_scores(["x"], ["not a list"])
    with pytest.raises(ValueError, match="predictions"):
        squad_v1_scores(["x", "y"], [["x"]])


# ---------------------------------------------------------------------------------------------- layouts

def test_layouts_as_strings():
    c, q, answers = " Paris is big. ", " Where? ", [" Paris ", "the city"]
    assert make_example(c, q, answers, "c_q") == {
        "context": "Paris is big.", "query": "Where? ", "target": "Paris", "answers": ["Paris", "the city"]}
    assert make_example(c, q, answers, "cq_a")["context"] == "Paris is big. Where?"
    assert make_example(c, q, answers, "cq_a")["query"] == "Answer: "
    assert make_example(c, q, answers, "qc_a")["context"] == "Where? Paris is big."
    with pytest.raises(ValueError, match="unknown SQuAD layout 'ca_q'"):
        make_example(c, q, answers, "ca_q")


# ---------------------------------------------------------------------------------------------- loading

def test_read_official_json_keeps_every_gold_answer():
    dev = read_squad_v1_json(os.path.join(SQUAD_DIR, "dev-v1.1.json"))
    assert len(dev) == 2
    assert dev[0]["answers"]["text"] == ["late September", "in late September", "September"]
    assert dev[0]["context"].startswith("The orchard")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_squad_json_layouts(layout):
    data = load_squad(layout, squad_json=SQUAD_DIR)
    assert list(data) == ["train", "valid"] and len(data["train"]) == 3 and len(data["valid"]) == 2
    row = data["valid"][0]
    assert row["target"] == "late September"  # training target = first gold answer
    assert row["answers"] == ["late September", "in late September", "September"]
    assert row["id"] == "d1"
    assert set(data["train"].column_names) == {"id", "context", "query", "target", "answers"}


def _write(tmp_path, obj, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_bad_json_is_rejected_with_a_reason(tmp_path):
    qa = {"id": "1", "question": "q?", "answers": [{"text": "a", "answer_start": 0}]}
    good = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "a b", "qas": [qa]}]}]}
    assert len(read_squad_v1_json(_write(tmp_path, good))) == 1
    with pytest.raises(ValueError, match="not JSON"):
        read_squad_v1_json(_write(tmp_path, "{oops"))
    with pytest.raises(ValueError, match="'data' list"):
        read_squad_v1_json(_write(tmp_path, [1, 2]))
    with pytest.raises(ValueError, match="only '1.1'"):
        read_squad_v1_json(_write(tmp_path, {**good, "version": "v2.0"}))
    v2 = {"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "2", "question": "q?", "answers": [], "is_impossible": True}]}]}]}
    with pytest.raises(ValueError, match="SQuAD v2 unanswerable"):
        read_squad_v1_json(_write(tmp_path, v2))
    no_answer = {"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "3", "question": "q?", "answers": []}]}]}]}
    with pytest.raises(ValueError, match="non-empty 'answers'"):
        read_squad_v1_json(_write(tmp_path, no_answer))
    no_paragraphs = {"version": "1.1", "data": [{"title": "t"}]}
    with pytest.raises(ValueError, match="paragraphs"):
        read_squad_v1_json(_write(tmp_path, no_paragraphs))


def test_squad_json_directory_must_hold_official_names(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_squad("c_q", squad_json=str(tmp_path))
    with pytest.raises(ValueError, match="must be a directory"):
        load_squad("c_q", squad_json=os.path.join(SQUAD_DIR, "dev-v1.1.json"))
    with pytest.raises(ValueError, match="unknown SQuAD layout"):
        load_squad("cqa", squad_json=SQUAD_DIR)
