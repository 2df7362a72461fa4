"""Phonebook lookup for memory models: the `booydar/phonebook_N*` datasets and a local generator of the same shape.

A sample is a phone book of N entries (the context), one name from it (the query) and that name's number (the
target). Raw rows have `context`, `query`, `target`; the reference implementation prepares them as
    context = context.strip()                 (its preprocessing appends ' ', its run script strips it again)
    query   = '\\n' + query.strip() + ' '
    target  = target.strip()
Splits: `train` and `valid` (the hub datasets name their evaluation split `test`; it becomes `valid`), and `test` as
well where the data have both a `valid` and a `test` split (the local generator with `--n_test`): valid then selects
the checkpoint and test is only reported.

The local generator writes raw rows of this shape so the task runs without the hub:
    context  "Alice Moreno: 415-202-7731\\nBen Okafor: 303-958-1204\\n..."   (N distinct names, N numbers)
    query    "Ben Okafor:"
    target   "303-958-1204"
    python phonebook_utils.py --n_entries 8 --n_train 100000 --n_valid 1000 --seed 142 \\
        --output_path ./data/phonebook_N8                                   (add --n_test 1000 for a test split)
(`--prepared` saves the prepared strings instead; preparing is idempotent, so either form can be read.)
"""
import argparse
import os
import random

from datasets import Dataset, DatasetDict

FIRST_NAMES = (
    "Alice", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Keiko", "Liam",
    "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wendy", "Xavier",
    "Yusuf", "Zoe", "Amara", "Bruno", "Chen", "Dalia", "Emil", "Fatima",
)
LAST_NAMES = (
    "Moreno", "Okafor", "Lindqvist", "Tanaka", "Novak", "Haddad", "Fischer", "Kowalski", "Rossi", "Dubois",
    "Ivanova", "Murphy", "Silva", "Nguyen", "Schmidt", "Costa", "Petrov", "Andersen", "Kaur", "Mendes",
    "Yamamoto", "Brennan", "Lopez", "Weber", "Sato", "Horvat", "Khan", "Jensen", "Garcia", "Ward",
    "Becker", "Adeyemi",
)
MAX_ENTRIES = len(FIRST_NAMES) * len(LAST_NAMES)


def preprocess_example(context: str, query: str, target: str) -> dict:
    """Raw phonebook fields -> the strings the reference's GradMem script WRITEs and READs."""
    return {"context": context.strip(), "query": "\n" + query.strip() + " ", "target": target.strip()}


def preprocess_dataset(raw: DatasetDict, name: str = "phonebook") -> DatasetDict:
    """Raw DatasetDict -> DatasetDict of prepared rows: (train, valid) from train + valid or train + test (the hub's
    evaluation split), (train, valid, test) from train + valid + test."""
    if "train" not in raw or not {"valid", "test"} & set(raw):
        raise ValueError(f"{name}: expected a train split and a valid and/or test split, found {list(raw)}")
    if "valid" in raw and "test" in raw:
        splits = {"train": raw["train"], "valid": raw["valid"], "test": raw["test"]}
    else:
        splits = {"train": raw["train"], "valid": raw["valid" if "valid" in raw else "test"]}
    prepared = {}
    for split, rows in splits.items():
        missing = {"context", "query", "target"} - set(rows.column_names)
        if missing:
            raise ValueError(f"{name}/{split}: missing columns {sorted(missing)} (has {rows.column_names})")

        def prepare(row):
            return preprocess_example(row["context"], row["query"], row["target"])

        prepared[split] = rows.map(prepare, remove_columns=rows.column_names, desc=f"phonebook {split}")
    return DatasetDict(prepared)


def load_phonebook(dataset_name: str) -> DatasetDict:
    """A local save_to_disk folder (from the generator) or a hub dataset such as booydar/phonebook_N8."""
    from squad_utils import load_named_dataset

    raw = load_named_dataset(dataset_name, offline_fix=", or generate one locally (see this module's docstring)")
    if not isinstance(raw, DatasetDict):
        raise ValueError(f"{dataset_name} holds a single {type(raw).__name__}; expected a DatasetDict with splits")
    return preprocess_dataset(raw, name=dataset_name)


# ----------------------------------------------------------------------------------------------------------------
# local generator

def random_phone_number(rng: random.Random) -> str:
    return f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"


def generate_phonebook(n_entries: int, rng: random.Random) -> dict:
    """One raw sample: N distinct names with distinct numbers, one of them queried."""
    if not 1 <= n_entries <= MAX_ENTRIES:
        raise ValueError(f"n_entries must be in [1, {MAX_ENTRIES}], got {n_entries}")
    people = rng.sample([(first, last) for first in FIRST_NAMES for last in LAST_NAMES], n_entries)
    names = [f"{first} {last}" for first, last in people]
    numbers = []
    while len(numbers) < n_entries:
        number = random_phone_number(rng)
        if number not in numbers:
            numbers.append(number)
    asked = rng.randrange(n_entries)
    return {
        "context": "\n".join(f"{name}: {number}" for name, number in zip(names, numbers)),
        "query": f"{names[asked]}:",
        "target": numbers[asked],
    }


def build_phonebook_dataset(n_entries: int, n_train: int, n_valid: int, seed: int, n_test: int = 0) -> DatasetDict:
    """Raw DatasetDict(train, valid[, test when n_test > 0]), deterministic from the seed (each split has its own
    random stream, so adding a test split leaves train and valid as they were)."""
    if n_train < 1 or n_valid < 1 or n_test < 0:
        raise ValueError(f"n_train and n_valid must be >= 1 and n_test >= 0, got {n_train}, {n_valid} and {n_test}")
    splits = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n == 0:
            continue
        rng = random.Random(f"phonebook-{seed}-{split}")
        splits[split] = Dataset.from_list([generate_phonebook(n_entries, rng) for _ in range(n)])
    return DatasetDict(splits)


def main():
    parser = argparse.ArgumentParser(description="Generate a phonebook dataset (raw context/query/target, "
                                                 "save_to_disk with train/valid splits)")
    parser.add_argument("--n_entries", type=int, required=True, help="phone book entries per context (N)")
    parser.add_argument("--n_train", type=int, default=100_000)
    parser.add_argument("--n_valid", type=int, default=1_000)
    parser.add_argument("--n_test", type=int, default=0,
                        help="samples of a test split (default 0: none; valid selects, test is only reported)")
    parser.add_argument("--seed", type=int, default=142)
    parser.add_argument("--output_path", required=True, help="e.g. ./data/phonebook_N8")
    parser.add_argument("--prepared", action="store_true",
                        help="save the prepared strings (for run scripts that read context/query/target as they are: "
                             "run_{rmt,gpt2}_on_kv_retrieval.py); preparing is idempotent, so the phonebook and SQuAD "
                             "run scripts read either form")
    args = parser.parse_args()
    if os.path.exists(args.output_path):
        raise FileExistsError(f"{args.output_path} exists; remove it or choose another --output_path")
    data = build_phonebook_dataset(args.n_entries, args.n_train, args.n_valid, args.seed, n_test=args.n_test)
    if args.prepared:
        data = preprocess_dataset(data)
    data.save_to_disk(args.output_path)
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in data.items())
    print(f"saved {args.output_path}: {sizes}; example:\n{data['valid'][0]}")


if __name__ == "__main__":
    main()
