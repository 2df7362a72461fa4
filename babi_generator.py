"""A local generator of bAbI task 1 (single supporting fact) stories, written in the original bAbI text format.

A story is a few people moving between rooms; every two statements a question asks where one of the people who has
moved is, and the answer is the room of that person's latest statement (the one supporting fact):

    1 Mary moved to the bathroom.
    2 John went to the hallway.
    3 Where is Mary? <TAB>bathroom<TAB>1
    4 Daniel went back to the hallway.
    5 Mary travelled to the office.
    6 Where is Mary? <TAB>office<TAB>5
    1 Sandra journeyed to the kitchen.                    (numbering restarts: a new story)

(`<TAB>` is a tab character; the question keeps the space before it, as the original files do.) Four people, six
rooms and five verbs as in bAbI's task 1; a story has 5 questions (10 statements; `--questions_per_story` sets it,
e.g. 1 for short stories of two statements to start a length curriculum with), the last one possibly fewer so that
a split has exactly the asked number of questions. The person asked about is drawn uniformly from the people who
have moved so far, so the answer may lie anywhere in the story.

Files get the original names, `qa1_single-supporting-fact_{train,valid,test}.txt`, so that babi_utils.py reads them
as it reads the original ones (`--babi_dir <folder> --babi_task qa1`, or babi_utils.load_babi_text). Every split is
generated from its own random stream, deterministically from the seed; a question's sample (its story so far and the
question) never appears in two splits: valid and test are drawn first, and train stories that share a sample with
them are drawn again.

    python babi_generator.py --out data/babi_local --n_train 20000 --n_valid 1000 --n_test 1000 --seed 142
"""
import argparse
import os
import random
from typing import Optional, Sequence

TASK = "qa1"
FILE_STEM = "qa1_single-supporting-fact"
SPLITS = ("train", "valid", "test")
PEOPLE = ("Mary", "John", "Sandra", "Daniel")
ROOMS = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom")
VERBS = ("moved to", "went to", "went back to", "travelled to", "journeyed to")
STATEMENTS_PER_QUESTION = 2
QUESTIONS_PER_STORY = 5
MAX_REDRAWS = 10_000  # stories drawn again in a row before the sample space counts as exhausted


def generate_story(rng: random.Random, n_questions: int = QUESTIONS_PER_STORY) -> list:
    """One story of n_questions questions, as its lines in order: ("fact", text) or ("question", text, answer,
    number of the supporting line); lines are numbered from 1."""
    room_of, line_of = {}, {}  # person -> latest room, person -> line number of that statement
    lines = []
    for _ in range(n_questions):
        for _ in range(STATEMENTS_PER_QUESTION):
            person = rng.choice(PEOPLE)
            room = rng.choice([r for r in ROOMS if r != room_of.get(person)])
            lines.append(("fact", f"{person} {rng.choice(VERBS)} the {room}."))
            room_of[person], line_of[person] = room, len(lines)
        asked = rng.choice(sorted(room_of))
        lines.append(("question", f"Where is {asked}?", room_of[asked], line_of[asked]))
    return lines


def question_samples(story: list) -> list:
    """(the story's statements before it, the question) of every question: what a model sees of that sample."""
    facts, samples = [], []
    for line in story:
        if line[0] == "fact":
            facts.append(line[1])
        else:
            samples.append((tuple(facts), line[1]))
    return samples


def story_lines(story: list) -> list:
    """The story in bAbI's text format: numbered lines, a question line `N question \\tanswer\\tsupport`."""
    out = []
    for number, line in enumerate(story, start=1):
        if line[0] == "fact":
            out.append(f"{number} {line[1]}")
        else:
            _, question, answer, support = line
            out.append(f"{number} {question} \t{answer}\t{support}")
    return out


def generate_split(n_questions: int, rng: random.Random, taken: Optional[set] = None,
                   per_story: int = QUESTIONS_PER_STORY) -> list:
    """Stories of per_story questions holding exactly n_questions questions; a story with a sample in `taken` is drawn
    again. The samples of the split are added to `taken` (so that the next split stays disjoint from this one)."""
    taken = set() if taken is None else taken
    stories, left, redrawn = [], n_questions, 0
    while left > 0:
        story = generate_story(rng, min(per_story, left))
        samples = question_samples(story)
        if any(s in taken for s in samples):
            redrawn += 1
            if redrawn > MAX_REDRAWS:
                raise ValueError(f"{MAX_REDRAWS} stories in a row repeated a sample of an earlier one: stories of "
                                 f"{per_story} question(s) hold too few distinct samples for {len(taken) + left} "
                                 "questions; ask for fewer questions or more questions per story")
            continue
        redrawn = 0
        taken.update(samples)
        stories.append(story)
        left -= len(samples)
    return stories


def generate_babi_qa1(n_train: int, n_valid: int, n_test: int, seed: int,
                      per_story: int = QUESTIONS_PER_STORY) -> dict:
    """{split: [story, ...]}: valid and test first, then train, pairwise disjoint in their question samples."""
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test), ("questions_per_story", per_story)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1 (questions), got {n}")
    taken = set()
    sizes = {"valid": n_valid, "test": n_test, "train": n_train}
    stories = {split: generate_split(n, random.Random(f"babi-{TASK}-{seed}-{split}"), taken, per_story)
               for split, n in sizes.items()}
    return {split: stories[split] for split in SPLITS}


def split_path(out: str, split: str) -> str:
    return os.path.join(out, f"{FILE_STEM}_{split}.txt")


def write_babi_qa1(out: str, n_train: int, n_valid: int, n_test: int, seed: int, overwrite: bool = False,
                   per_story: int = QUESTIONS_PER_STORY) -> dict:
    """Write the three files into `out`; returns {split: path}. Existing files are an error unless `overwrite`."""
    paths = {split: split_path(out, split) for split in SPLITS}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite or choose another --out")
    stories = generate_babi_qa1(n_train, n_valid, n_test, seed, per_story)
    os.makedirs(out, exist_ok=True)
    for split, path in paths.items():
        with open(path, "w", encoding="utf-8") as f:
            for story in stories[split]:
                f.write("\n".join(story_lines(story)) + "\n")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Generate bAbI task 1 (single supporting fact) stories in the "
                                                 "original text format (qa1_single-supporting-fact_*.txt)")
    parser.add_argument("--out", required=True, help="folder for the three files, e.g. data/babi_local")
    parser.add_argument("--n_train", type=int, default=10_000, help="questions in train")
    parser.add_argument("--n_valid", type=int, default=1_000, help="questions in valid")
    parser.add_argument("--n_test", type=int, default=1_000, help="questions in test")
    parser.add_argument("--seed", type=int, default=142)
    parser.add_argument("--questions_per_story", type=int, default=QUESTIONS_PER_STORY,
                        help="questions per story, two statements before each (1: stories of two statements)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files of the three splits")
    args = parser.parse_args(argv)
    try:
        paths = write_babi_qa1(args.out, args.n_train, args.n_valid, args.n_test, args.seed, args.overwrite,
                               args.questions_per_story)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"wrote {', '.join(paths.values())} ({args.n_train}/{args.n_valid}/{args.n_test} questions); read them with "
          f"--babi_dir {args.out} --babi_task {TASK}")
    return paths


if __name__ == "__main__":
    main()
