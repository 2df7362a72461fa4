"""bAbI question answering (BABILong `qa{N}_0k`: plain bAbI stories without haystack) for memory models.

Every question becomes one row with the strings the reference implementation trains on:
    context = story facts before the question, joined by spaces, + ' '     (WRITE)
    query   = question + ' '                                               (READ prompt)
    target  = answer                                                       (READ target)

Two sources:
(a) a `save_to_disk` DatasetDict (e.g. the hub datasets `yurakuratov/babilong_qa{1..5}_0k`, see
    scripts/download_babi.sh), with either BABILong's raw columns `input`, `question`, `target` (prepared here) or
    the already prepared `context`, `query`, `target` (kept as they are);
(b) the original bAbI text files (e.g. `tasks_1-20_v1-2/en-valid-10k/qa2_train.txt`, `qa2_valid.txt`,
    `qa2_test.txt`): numbered lines; a story starts again when the numbering restarts at 1; a statement line is
    `N sentence`; a question line is `N question<TAB>answer<TAB>supporting fact numbers`. The context of a question
    is every statement of its story before it (earlier questions are not part of it), as BABILong builds it.

BABILong's loader drops the last question of every file (an off-by-one in its length), which is why the reference
data have 8999/999/999 rows; reading the text files here keeps every question (9000/1000/1000 for en-valid-10k).

CLI (writes the save_to_disk form that every run script reads):
    python babi_utils.py --babi_dir tasks_1-20_v1-2/en-valid-10k --task qa2 --output_path ./data/babilong_qa2_0k
"""
import argparse
import glob
import os
import re

from datasets import Dataset, DatasetDict, load_from_disk

SPLITS = ("train", "valid", "test")
TASKS = tuple(f"qa{n}" for n in range(1, 21))  # the text format is the same for all 20 bAbI tasks
HUB_TASKS = {f"qa{n}": f"babilong_qa{n}_0k" for n in range(1, 6)}  # what the reference trained on
_LINE = re.compile(r"^(\d+) (.*)$")


def prepare_example(story: str, question: str, answer: str) -> dict:
    """BABILong fields -> the memory-model strings of the reference (trailing spaces included)."""
    return {"context": story.strip() + " ", "query": question.strip() + " ", "target": answer.strip()}


def parse_babi_lines(lines: list[str], source: str = "<lines>") -> list[dict]:
    """Original bAbI text lines -> one prepared row (context, query, target) per question."""
    rows = []
    facts = {}  # line number -> statement, for the current story
    previous_number = 0
    for line_index, raw_line in enumerate(lines, start=1):
        line = raw_line.rstrip("\n").rstrip("\r")
        if line.strip() == "":
            continue
        where = f"{source}, line {line_index}"
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{where}: cannot parse {line!r}; a bAbI line is '<number> <sentence>' or "
                             "'<number> <question>\\t<answer>\\t<supporting fact numbers>'")
        number, text = int(match.group(1)), match.group(2)
        if number == 1:
            facts, previous_number = {}, 0
        if number != previous_number + 1:
            raise ValueError(f"{where}: line number {number} follows {previous_number}; numbers must count up by "
                             "one inside a story and restart at 1 for a new story")
        previous_number = number
        if "\t" not in text:
            if "?" in text:  # a question whose answer would silently become story text
                raise ValueError(f"{where}: {line!r} looks like a question line without tabs; a question line is "
                                 "'<number> <question>\\t<answer>\\t<supporting fact numbers>' (tabs, not spaces)")
            facts[number] = text.strip()
            continue
        fields = text.split("\t")
        question, answer = fields[0].strip(), fields[1].strip()
        supporting = fields[2].split() if len(fields) > 2 else []
        if question == "" or answer == "":
            raise ValueError(f"{where}: question line {line!r} needs a question and an answer separated by a tab")
        if not all(s.isdigit() and int(s) in facts for s in supporting):
            raise ValueError(f"{where}: supporting facts {fields[2]!r} must be numbers of earlier statements of "
                             "the same story")
        if len(facts) == 0:
            raise ValueError(f"{where}: question {question!r} has no story statements before it")
        rows.append(prepare_example(" ".join(facts.values()), question, answer))
    if len(rows) == 0:
        raise ValueError(f"{source}: no question lines found (a question line has a tab before its answer)")
    return rows


def read_babi_file(path: str) -> Dataset:
    with open(path, encoding="utf-8") as f:
        return Dataset.from_list(parse_babi_lines(f.readlines(), source=path))


def find_task_files(babi_dir: str, task: str) -> dict:
    """{split: path} for `{task}_train.txt` / `{task}_<name>_train.txt` (valid, test alike) in babi_dir."""
    if task not in TASKS:
        raise ValueError(f"unknown bAbI task {task!r}; choose one of qa1 ... qa20")
    if not os.path.isdir(babi_dir):
        raise ValueError(f"--babi_dir {babi_dir!r} is not a directory (expected e.g. tasks_1-20_v1-2/en-valid-10k)")
    paths = {}
    for split in SPLITS:
        found = sorted(set(glob.glob(os.path.join(babi_dir, f"{task}_{split}.txt")))
                       | set(glob.glob(os.path.join(babi_dir, f"{task}_*_{split}.txt"))))
        if len(found) > 1:
            raise ValueError(f"several {split} files for {task} in {babi_dir}: {found}")
        if len(found) == 0:
            raise ValueError(f"no {task} {split} file in {babi_dir} (expected {task}_{split}.txt or "
                             f"{task}_<name>_{split}.txt; en-valid-10k has train, valid and test files)")
        paths[split] = found[0]
    return paths


def load_babi_text(babi_dir: str, task: str) -> DatasetDict:
    return DatasetDict({split: read_babi_file(path) for split, path in find_task_files(babi_dir, task).items()})


def _prepare_split(rows: Dataset, name: str) -> Dataset:
    columns = set(rows.column_names)
    if {"context", "query", "target"} <= columns:
        return rows  # already prepared (the reference's saved form)
    if {"input", "question", "target"} <= columns:
        def prepare(row):
            return prepare_example(row["input"], row["question"], row["target"])

        return rows.map(prepare, remove_columns=sorted(columns), desc=f"bAbI {name}")
    raise ValueError(f"bAbI split {name!r} has columns {sorted(columns)}; expected input/question/target "
                     "(BABILong) or context/query/target")


def load_babi_from_disk(data_path: str) -> DatasetDict:
    """A save_to_disk DatasetDict with train/valid[/test] -> prepared splits (context, query, target)."""
    if not os.path.isdir(data_path):
        raise ValueError(f"--data_path {data_path!r} does not exist (run scripts/download_babi.sh, or read the "
                         "original text files with --babi_dir)")
    data = load_from_disk(data_path)
    if not isinstance(data, DatasetDict) or "train" not in data or "valid" not in data:
        found = list(data) if isinstance(data, DatasetDict) else type(data).__name__
        raise ValueError(f"{data_path} must hold a DatasetDict with train and valid splits (test optional), "
                         f"found {found}")
    return DatasetDict({split: _prepare_split(data[split], split) for split in SPLITS if split in data})


def main():
    parser = argparse.ArgumentParser(description="Original bAbI text files -> save_to_disk dataset (context/query/target)")
    parser.add_argument("--babi_dir", required=True, help="folder with qaN_*train.txt, qaN_*valid.txt, qaN_*test.txt")
    parser.add_argument("--task", required=True, help="qa1 ... qa20")
    parser.add_argument("--output_path", required=True)
    args = parser.parse_args()
    if os.path.exists(args.output_path):
        raise FileExistsError(f"{args.output_path} exists; remove it or choose another --output_path")
    data = load_babi_text(args.babi_dir, args.task)
    data.save_to_disk(args.output_path)
    print(f"saved {args.output_path}: " + ", ".join(f"{split} {len(rows)}" for split, rows in data.items()))


if __name__ == "__main__":
    main()
