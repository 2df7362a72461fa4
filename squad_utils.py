"""SQuAD v1.1 for memory models: loading, the three WRITE/READ layouts, and the official EM/F1 metric.

Data. SQuAD v1.1 comes either from the hub (`squad`, splits train/validation) or from the official JSON files
(`train-v1.1.json`, `dev-v1.1.json`: {"version": "1.1", "data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}). Either way every question becomes one
row with `context`, `query`, `target` strings laid out for a memory model (WRITE reads `context`, READ reads
`query + target`), plus `answers` (all gold answer texts, for evaluation) and `id`.

Layouts (the reference's three SQuAD scripts, expressed as strings so one collator serves all):
    c_q   WRITE = context                  READ = question + ' ' + answer
    cq_a  WRITE = context + ' ' + question  READ = 'Answer: ' + answer
    qc_a  WRITE = question + ' ' + context  READ = 'Answer: ' + answer
Training target = the first gold answer (as in the reference); `answers` keeps every gold answer so that the
official metric can take the max over them.

Metric. The official SQuAD v1.1 exact match and F1: answers are normalised (lower case, punctuation removed,
articles a/an/the removed, whitespace collapsed); F1 is the bag-of-tokens overlap; each prediction is scored
against every gold answer and the best score is kept; the dataset score is the mean over questions. Scores are
returned as fractions in [0, 1] (the official script prints them multiplied by 100).

CLI (the save_to_disk form, for run scripts that read context/query/target as they are):
    python squad_utils.py --layout c_q [--squad_json DIR] --output_path ./data/squad_c_q
"""
import collections
import json
import os
import re
import string
from typing import Optional

from datasets import Dataset, DatasetDict, load_from_disk

LAYOUTS = ("c_q", "cq_a", "qc_a")
ANSWER_PROMPT = "Answer: "
SQUAD_JSON_FILES = {"train": "train-v1.1.json", "valid": "dev-v1.1.json"}
_PUNCTUATION = frozenset(string.punctuation)


# ----------------------------------------------------------------------------------------------------------------
# the official SQuAD v1.1 metric

def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official v1.1 order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(predictions: list[str], gold_answers: list[list[str]]) -> dict:
    """Mean over questions of the max over gold answers: {'squad_exact_match', 'squad_f1'} in [0, 1]."""
    if len(predictions) != len(gold_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(gold_answers)} questions")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    exact, f1 = 0.0, 0.0
    for prediction, golds in zip(predictions, gold_answers):
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"each question needs a non-empty list of gold answers, got {golds!r}")
        exact += max(exact_match_score(prediction, gold) for gold in golds)
        f1 += max(f1_score(prediction, gold) for gold in golds)
    return {"squad_exact_match": exact / len(predictions), "squad_f1": f1 / len(predictions)}


# ----------------------------------------------------------------------------------------------------------------
# layouts

def make_example(context: str, question: str, answers: list[str], layout: str) -> dict:
    """One question as memory-model strings: WRITE reads `context`, READ reads `query + target`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown SQuAD layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    answers = [answer.strip() for answer in answers]
    if len(answers) == 0 or answers[0] == "":
        raise ValueError(f"question {question!r} has no gold answer (SQuAD v1.1 always has one)")
    context, question = context.strip(), question.strip()
    if layout == "c_q":
        example = {"context": context, "query": question + " "}
    elif layout == "cq_a":
        example = {"context": context + " " + question, "query": ANSWER_PROMPT}
    else:  # qc_a
        example = {"context": question + " " + context, "query": ANSWER_PROMPT}
    example["target"] = answers[0]
    example["answers"] = answers
    return example


def _layout_rows(rows: Dataset, layout: str) -> Dataset:
    """Hub-shaped rows (id, context, question, answers={'text': [...]}) -> layout rows."""
    def to_layout(row):
        return {"id": row["id"], **make_example(row["context"], row["question"], row["answers"]["text"], layout)}

    return rows.map(to_layout, remove_columns=rows.column_names, desc=f"SQuAD layout {layout}")


# ----------------------------------------------------------------------------------------------------------------
# loading

def read_squad_v1_json(path: str) -> Dataset:
    """Rows (id, title, context, question, answers={'text','answer_start'}) from an official SQuAD v1.1 JSON file."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e}); expected the official SQuAD v1.1 format") from e
    where = f"{path}: not SQuAD v1.1 shaped"
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{where}: expected a top-level object with a 'data' list of articles")
    version = str(raw.get("version", "1.1"))
    if version != "1.1":
        raise ValueError(f"{where}: version is {version!r}, only '1.1' is supported (SQuAD v2 has unanswerable "
                         "questions that this task does not model)")
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for i, article in enumerate(raw["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{where}: data[{i}] has no 'paragraphs' list")
        for j, paragraph in enumerate(article["paragraphs"]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                    or not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where}: data[{i}].paragraphs[{j}] needs a 'context' string and a 'qas' list")
            for k, qa in enumerate(paragraph["qas"]):
                at = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if qa.get("is_impossible") or "plausible_answers" in qa:
                    raise ValueError(f"{where}: {at} is a SQuAD v2 unanswerable question; use the v1.1 files")
                if not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise ValueError(f"{where}: {at} needs 'id' and a 'question' string")
                answers = qa.get("answers")
                if not isinstance(answers, list) or len(answers) == 0:
                    raise ValueError(f"{where}: {at} needs a non-empty 'answers' list")
                for answer in answers:
                    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) \
                            or not isinstance(answer.get("answer_start"), int):
                        raise ValueError(f"{where}: {at} has an answer without 'text' (str) and "
                                         f"'answer_start' (int): {answer!r}")
                rows["id"].append(str(qa["id"]))
                rows["title"].append(str(article.get("title", "")))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [a["answer_start"] for a in answers]})
    if len(rows["id"]) == 0:
        raise ValueError(f"{where}: it holds no questions")
    return Dataset.from_dict(rows)


def load_named_dataset(name: str, offline_fix: str = ""):
    """--dataset_name: a local save_to_disk folder, else `datasets.load_dataset(name)` (a hub id). A failed hub load
    (no hub access, unknown id) is a ValueError naming the fix: a local copy (or `offline_fix`)."""
    if os.path.isdir(name):
        return load_from_disk(name)
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as error:  # connection, missing dataset, offline mode: the fix is the same
        local = f"./data/{name.split('/')[-1]}"
        raise ValueError(
            f"--dataset_name {name!r} is not a local folder and loading it from the hub failed "
            f"({type(error).__name__}: {error}). Without hub access, save it where the hub is reachable with python -c "
            f"\"import datasets; datasets.load_dataset('{name}').save_to_disk('{local}')\", copy the folder here and "
            f"pass --dataset_name {local}{offline_fix}") from error


def load_squad(layout: str, squad_json: Optional[str] = None, dataset_name: str = "squad") -> DatasetDict:
    """SQuAD v1.1 as a DatasetDict(train, valid) of layout rows (context, query, target, answers, id).

    squad_json: a directory holding the official `train-v1.1.json` and `dev-v1.1.json`; without it the data come
    from `dataset_name`: the hub dataset (`squad`) or a local save_to_disk copy of it (splits train and validation
    or valid; columns id, context, question, answers).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown SQuAD layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if squad_json is not None:
        if not os.path.isdir(squad_json):
            raise ValueError(f"--squad_json {squad_json!r} must be a directory holding "
                             f"{SQUAD_JSON_FILES['train']} and {SQUAD_JSON_FILES['valid']}")
        paths = {split: os.path.join(squad_json, name) for split, name in SQUAD_JSON_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"--squad_json: missing {', '.join(missing)} (the official SQuAD v1.1 file names)")
        raw = DatasetDict({split: read_squad_v1_json(path) for split, path in paths.items()})
    else:
        data = load_named_dataset(dataset_name, offline_fix=", or pass --squad_json DIR with the official "
                                  f"{SQUAD_JSON_FILES['train']} and {SQUAD_JSON_FILES['valid']}")
        eval_split = next((s for s in ("validation", "valid") if isinstance(data, DatasetDict) and s in data), None)
        if eval_split is None or "train" not in data:
            found = list(data) if isinstance(data, DatasetDict) else type(data).__name__
            raise ValueError(f"dataset {dataset_name!r} has splits {found}; expected train and validation (or valid)")
        raw = DatasetDict({"train": data["train"], "valid": data[eval_split]})
        for split, rows in raw.items():
            missing = {"id", "context", "question", "answers"} - set(rows.column_names)
            if missing:
                raise ValueError(f"dataset {dataset_name!r} split {split}: missing SQuAD columns {sorted(missing)}")
    return DatasetDict({split: _layout_rows(rows, layout) for split, rows in raw.items()})


def main():
    import argparse

    parser = argparse.ArgumentParser(description="SQuAD v1.1 -> save_to_disk dataset in one layout (train/valid; "
                                                 "columns context, query, target, answers, id)")
    parser.add_argument("--layout", required=True, help=", ".join(LAYOUTS))
    parser.add_argument("--squad_json", default=None, help="folder with train-v1.1.json and dev-v1.1.json "
                                                           "(default: the hub dataset 'squad')")
    parser.add_argument("--output_path", required=True)
    args = parser.parse_args()
    if os.path.exists(args.output_path):
        raise FileExistsError(f"{args.output_path} exists; remove it or choose another --output_path")
    data = load_squad(args.layout, squad_json=args.squad_json)
    data.save_to_disk(args.output_path)
    print(f"saved {args.output_path}: train {len(data['train'])}, valid {len(data['valid'])}")


if __name__ == "__main__":
    main()

