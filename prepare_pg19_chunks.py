"""Cut PG19 books into sentence-aligned chunks of at least --min_words words and save them as a DatasetDict.

Each book's text is whitespace-normalised (`" ".join(text.split())`), split into sentences (sentence_split.py,
offline), and consecutive sentences are packed greedily until the chunk has at least --min_words words. A final
chunk shorter than that is dropped unless --keep_short_last. With --sample_n_valid_chunks N the `validation`
split instead gets N chunks that start at random sentences: books are visited round-robin and each visit draws,
without replacement, one start sentence from which at least --min_words words remain in the book.

Input, one of:
  --dataset_name NAME   a hub dataset (default deepmind/pg19), one split per name in --splits;
  --dataset_path DIR    a DatasetDict saved with `save_to_disk`, holding the splits in --splits;
  --input_dir DIR       plain-text books, one UTF-8 file per book: DIR/<split>/<book_id>.txt.
Hub and saved datasets need a text column (--text_field) and a book-id column (--book_id_field).

Output row schema (one row per chunk):
  context              the chunk text (a slice of the normalised book text)
  word_count           int32, words in the chunk (whitespace-separated, counted per sentence)
  n_sentences          int32
  book_id              str
  chunk_id             int32, index of the chunk within its book (in sampling order for sampled chunks)
  split                str
  char_start, char_end int32, context == normalised_book_text[char_start:char_end]
  sentence_boundaries  list of [start, end] per sentence, relative to the chunk: context[start:end] is a sentence

Example:
  python prepare_pg19_chunks.py --input_dir tests/data/pg19_fixture --output_path ./data/pg19_fixture_w60 \
      --min_words 60 --sample_n_valid_chunks 8 --seed 144
"""

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import datasets

from sentence_split import split_sentences

DEFAULT_DATASET_NAME = "deepmind/pg19"
SAMPLED_SPLIT = "validation"
BOOK_ID_FIELD_CANDIDATES = ("book_id", "url")  # deepmind/pg19 has no id column; its `url` is unique per book

FEATURES = datasets.Features(
    {
        "context": datasets.Value("string"),
        "word_count": datasets.Value("int32"),
        "n_sentences": datasets.Value("int32"),
        "book_id": datasets.Value("string"),
        "chunk_id": datasets.Value("int32"),
        "split": datasets.Value("string"),
        "char_start": datasets.Value("int32"),
        "char_end": datasets.Value("int32"),
        "sentence_boundaries": datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=2)),
    }
)


# ---------------------------------------------------------------------------------------------------------------
# Chunking of one book


def normalize_whitespace(text):
    return " ".join(text.split())


class SplitBook:
    """A whitespace-normalised book with its sentence spans and per-sentence word counts."""

    def __init__(self, book_id, raw_text):
        self.book_id = str(book_id)
        self.text = normalize_whitespace(raw_text)
        self.spans = split_sentences(self.text)  # [(start, end)] in self.text
        self.word_counts = [len(self.text[s:e].split()) for s, e in self.spans]

    def chunk_row(self, first, last, chunk_id, split):
        """The row for sentences first..last (inclusive)."""
        spans = self.spans[first : last + 1]
        char_start, char_end = spans[0][0], spans[-1][1]
        return {
            "context": self.text[char_start:char_end],
            "word_count": sum(self.word_counts[first : last + 1]),
            "n_sentences": len(spans),
            "book_id": self.book_id,
            "chunk_id": chunk_id,
            "split": split,
            "char_start": char_start,
            "char_end": char_end,
            "sentence_boundaries": [[s - char_start, e - char_start] for s, e in spans],
        }

    def end_of_chunk_from(self, first, min_words):
        """Index of the last sentence of the chunk starting at sentence `first`, or None if fewer than
        min_words words remain in the book from there."""
        words = 0
        for i in range(first, len(self.spans)):
            words += self.word_counts[i]
            if words >= min_words:
                return i
        return None

    def packed_rows(self, split, min_words, keep_short_last):
        """Consecutive chunks covering the book; the short tail is kept only with keep_short_last."""
        rows = []
        first = 0
        while first < len(self.spans):
            last = self.end_of_chunk_from(first, min_words)
            if last is None:
                if keep_short_last:
                    rows.append(self.chunk_row(first, len(self.spans) - 1, len(rows), split))
                break
            rows.append(self.chunk_row(first, last, len(rows), split))
            first = last + 1
        return rows

    def valid_starts(self, min_words):
        """Sentence indices from which at least min_words words remain in the book."""
        remaining = 0
        starts = []
        for i in range(len(self.spans) - 1, -1, -1):
            remaining += self.word_counts[i]
            if remaining >= min_words:
                starts.append(i)
        return starts[::-1]


def sampled_rows(books, n_chunks, min_words, split, rng):
    """n_chunks chunks starting at random sentences, books visited round-robin, starts drawn without replacement."""
    queues = []  # per book: its start sentences in a random order
    for book in books:
        starts = book.valid_starts(min_words)
        rng.shuffle(starts)
        if starts:
            queues.append((book, starts))
    available = sum(len(starts) for _, starts in queues)
    if available < n_chunks:
        raise ValueError(
            f"--sample_n_valid_chunks {n_chunks}: the {split!r} split has only {available} distinct start "
            f"sentences with at least --min_words {min_words} words after them ({len(books)} books); "
            f"ask for fewer chunks or a smaller --min_words."
        )
    rows = []
    chunk_counts = [0] * len(queues)
    while len(rows) < n_chunks:
        for b, (book, starts) in enumerate(queues):
            if len(rows) == n_chunks:
                break
            if not starts:
                continue
            first = starts.pop()
            rows.append(book.chunk_row(first, book.end_of_chunk_from(first, min_words), chunk_counts[b], split))
            chunk_counts[b] += 1
    return rows


def _packed_batch(batch, text_field, split, min_words, keep_short_last):
    """datasets.map function: a batch of books -> their chunk rows (columns of FEATURES)."""
    if "path" in batch:
        texts = [Path(p).read_text(encoding="utf-8") for p in batch["path"]]
    else:
        texts = batch[text_field]
    rows = []
    for book_id, text in zip(batch["book_id"], texts):
        rows.extend(SplitBook(book_id, text).packed_rows(split, min_words, keep_short_last))
    return {name: [row[name] for row in rows] for name in FEATURES}


# ---------------------------------------------------------------------------------------------------------------
# Input sources: each gives, per split, a Dataset with a `book_id` column and either the text column or `path`


def books_from_input_dir(input_dir, splits):
    books = {}
    for split in splits:
        split_dir = Path(input_dir) / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"--input_dir {input_dir}: no folder {split_dir} for split {split!r}. Expected layout: "
                f"<input_dir>/<split>/<book_id>.txt, one folder per name in --splits."
            )
        paths = sorted(split_dir.glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"--input_dir {input_dir}: no .txt books in {split_dir}.")
        books[split] = datasets.Dataset.from_dict(
            {"book_id": [p.stem for p in paths], "path": [str(p) for p in paths]}
        )
    return books


def _with_book_id_column(ds, split, text_field, book_id_field, source):
    columns = ds.column_names
    if text_field not in columns:
        raise ValueError(f"{source} split {split!r} has no text column {text_field!r} (columns: {columns}); "
                         f"name it with --text_field.")
    if book_id_field is None:
        found = [c for c in BOOK_ID_FIELD_CANDIDATES if c in columns]
        if not found:
            raise ValueError(f"{source} split {split!r} has none of the book-id columns {BOOK_ID_FIELD_CANDIDATES} "
                             f"(columns: {columns}); name one with --book_id_field.")
        book_id_field = found[0]
    elif book_id_field not in columns:
        raise ValueError(f"{source} split {split!r} has no book-id column {book_id_field!r} (columns: {columns}).")
    ds = ds.select_columns([text_field, book_id_field])
    if book_id_field != "book_id":
        ds = ds.rename_column(book_id_field, "book_id")
    return ds


def books_from_datasets(args, splits):
    if args.dataset_path is not None:
        source = f"--dataset_path {args.dataset_path}"
        saved = datasets.load_from_disk(args.dataset_path)
        if not isinstance(saved, datasets.DatasetDict):
            raise ValueError(f"{source} is a single Dataset; save a DatasetDict with the splits {splits}.")
        missing = [s for s in splits if s not in saved]
        if missing:
            raise ValueError(f"{source} has no split(s) {missing} (it has {list(saved)}); fix --splits.")
        loaded = {s: saved[s] for s in splits}
    else:
        source = f"--dataset_name {args.dataset_name}"
        loaded = {s: datasets.load_dataset(args.dataset_name, split=s) for s in splits}
    return {s: _with_book_id_column(ds, s, args.text_field, args.book_id_field, source) for s, ds in loaded.items()}


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default=None,
                        help=f"hub dataset (default {DEFAULT_DATASET_NAME} when neither --dataset_path nor "
                             f"--input_dir is given)")
    parser.add_argument("--dataset_path", default=None, help="DatasetDict saved with save_to_disk")
    parser.add_argument("--input_dir", default=None, help="folder of plain-text books: <dir>/<split>/<book_id>.txt")
    parser.add_argument("--text_field", default="text", help="text column of a hub or saved dataset")
    parser.add_argument("--book_id_field", default=None,
                        help=f"book-id column of a hub or saved dataset (default: the first of "
                             f"{', '.join(BOOK_ID_FIELD_CANDIDATES)} present)")
    parser.add_argument("--splits", default="train,validation,test", help="comma-separated split names")
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--min_words", type=int, required=True, help="a chunk has at least this many words")
    parser.add_argument("--keep_short_last", action="store_true",
                        help="keep each book's final chunk even if it has fewer than --min_words words")
    parser.add_argument("--sample_n_valid_chunks", type=int, default=None,
                        help=f"the {SAMPLED_SPLIT!r} split gets this many randomly started chunks instead of "
                             f"sequential packing")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of --sample_n_valid_chunks (default: drawn at random and recorded)")
    parser.add_argument("--num_proc", type=int, default=1, help="processes for sequential packing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_path dataset")
    args = parser.parse_args(argv)

    sources = [name for name in ("dataset_name", "dataset_path", "input_dir") if getattr(args, name) is not None]
    if len(sources) > 1:
        parser.error(f"give only one input source; got {', '.join('--' + s for s in sources)}")
    if not sources:
        args.dataset_name = DEFAULT_DATASET_NAME
    if args.input_dir is not None and (args.text_field != "text" or args.book_id_field is not None):
        parser.error("--text_field/--book_id_field apply to datasets; with --input_dir the file name is the book id")
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not args.splits or len(set(args.splits)) != len(args.splits):
        parser.error(f"--splits must be distinct, non-empty names, got {args.splits}")
    if args.min_words <= 0:
        parser.error(f"--min_words must be > 0, got {args.min_words}")
    if args.num_proc < 1:
        parser.error(f"--num_proc must be >= 1, got {args.num_proc}")
    if args.sample_n_valid_chunks is not None:
        if args.sample_n_valid_chunks <= 0:
            parser.error(f"--sample_n_valid_chunks must be > 0, got {args.sample_n_valid_chunks}")
        if SAMPLED_SPLIT not in args.splits:
            parser.error(f"--sample_n_valid_chunks samples the {SAMPLED_SPLIT!r} split, which is not in "
                         f"--splits {args.splits}")
    elif args.seed is not None:
        parser.error("--seed only seeds --sample_n_valid_chunks; give both or neither")
    return args


def _check_output_path(path, overwrite):
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"--output_path {path} exists; pass --overwrite to replace it.")
    if path.is_dir() and any(path.iterdir()) and not (path / "dataset_dict.json").exists():
        raise FileExistsError(f"--output_path {path} exists and is not a saved DatasetDict; refusing to delete "
                              f"it with --overwrite. Choose another path.")


def build_chunks(args, work_dir):
    """DatasetDict of chunk rows for args.splits; intermediate arrow files go under work_dir."""
    if args.input_dir is not None:
        books_by_split = books_from_input_dir(args.input_dir, args.splits)
    else:
        books_by_split = books_from_datasets(args, args.splits)

    out = datasets.DatasetDict()
    for split, books in books_by_split.items():
        if split == SAMPLED_SPLIT and args.sample_n_valid_chunks is not None:
            if "path" in books.column_names:
                split_books = [SplitBook(r["book_id"], Path(r["path"]).read_text(encoding="utf-8")) for r in books]
            else:
                split_books = [SplitBook(r["book_id"], r[args.text_field]) for r in books]
            rng = random.Random(args.seed)
            rows = sampled_rows(split_books, args.sample_n_valid_chunks, args.min_words, split, rng)
            chunks = datasets.Dataset.from_list(rows, features=FEATURES)
        else:
            chunks = books.map(
                _packed_batch,
                batched=True,
                batch_size=8,
                remove_columns=books.column_names,
                features=FEATURES,
                num_proc=args.num_proc if args.num_proc > 1 else None,
                fn_kwargs=dict(text_field=args.text_field, split=split, min_words=args.min_words,
                               keep_short_last=args.keep_short_last),
                cache_file_name=os.path.join(work_dir, f"{split}.arrow"),
                desc=f"chunking {split}",
            )
        if len(chunks) == 0:
            raise ValueError(f"split {split!r}: no book has --min_words {args.min_words} words; lower --min_words "
                             f"or pass --keep_short_last.")
        out[split] = chunks
    return out


def main(argv=None):
    args = parse_args(argv)
    _check_output_path(args.output_path, args.overwrite)
    if args.sample_n_valid_chunks is not None and args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
        print(f"--seed not given; sampling validation chunks with seed {args.seed}")

    with tempfile.TemporaryDirectory(prefix="pg19_chunks_") as work_dir:
        chunks = build_chunks(args, work_dir)
        if Path(args.output_path).exists():
            shutil.rmtree(args.output_path)
        chunks.save_to_disk(args.output_path)

    # The returned DatasetDict reads the saved copy (the temporary arrow files are gone).
    saved = datasets.load_from_disk(args.output_path)
    summary = {
        split: {"chunks": len(ds), "books": len(set(ds["book_id"])), "words": int(sum(ds["word_count"]))}
        for split, ds in saved.items()
    }
    with open(Path(args.output_path) / "prepare_pg19_chunks.json", "w") as f:
        json.dump({"args": vars(args), "sentence_splitter": "sentence_split.py (rule-based)", "splits": summary},
                  f, indent=2)
    for split, info in summary.items():
        print(f"{split}: {info['chunks']} chunks from {info['books']} books, {info['words']} words")
    print(f"saved to {args.output_path}")
    return saved


if __name__ == "__main__":
    main()
