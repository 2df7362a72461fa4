import json
import random
from pathlib import Path

import datasets
import pytest

import prepare_pg19_chunks as pg
from sentence_split import sentences, split_sentences

FIXTURE = Path(__file__).parent / "data" / "pg19_fixture"


def fixture_books(split):
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted((FIXTURE / split).glob("*.txt"))}


# ---------------------------------------------------------------------------------------------------------------
# Sentence splitter


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Smith went to Washington. He arrived at 5 p.m. on Tuesday.",
         ["Mr. Smith went to Washington.", "He arrived at 5 p.m. on Tuesday."]),
        ("Dr. Watson met Mrs. Hudson and St. James. They talked.",
         ["Dr. Watson met Mrs. Hudson and St. James.", "They talked."]),
        ("Use tools, e.g. Hammers and saws. Then rest, i.e. Sleep.",
         ["Use tools, e.g. Hammers and saws.", "Then rest, i.e. Sleep."]),
        ("J. R. R. Tolkien wrote books. He was English.", ["J. R. R. Tolkien wrote books.", "He was English."]),
        ("The carpenter, Wm. Fry, came. Capt. Coffin dined.", ["The carpenter, Wm. Fry, came.", "Capt. Coffin dined."]),
        ('He said, "I am done." Then he left.', ['He said, "I am done."', "Then he left."]),
        ('"Where are you going?" she asked. "Home," he said.', ['"Where are you going?" she asked.', '"Home," he said.']),
        ('He cried "Stop!" and ran. She followed.', ['He cried "Stop!" and ran.', "She followed."]),
        ("He said \u201cNo.\u201d She smiled.", ["He said \u201cNo.\u201d", "She smiled."]),
        ("Wait... what happened? I do not know.", ["Wait... what happened?", "I do not know."]),
        ("It was late... The house was dark.", ["It was late...", "The house was dark."]),
        ("It was late\u2026 The house was dark.", ["It was late\u2026", "The house was dark."]),
        ("What?! You did that? Yes!! Good.", ["What?!", "You did that?", "Yes!!", "Good."]),
        ("Pi is 3.14 today. (See p. 5.) Next.", ["Pi is 3.14 today.", "(See p. 5.)", "Next."]),
        ("See No. 5 in the list. No. I will not.", ["See No. 5 in the list.", "No.", "I will not."]),
        ("It reached me on the 4th inst., and I thank you.", ["It reached me on the 4th inst., and I thank you."]),
        ("We took both. _May 2nd._--Crossed the line.", ["We took both.", "_May 2nd._--Crossed the line."]),
        ("no final punctuation here", ["no final punctuation here"]),
        ("  One.\n\n  Two.  ", ["One.", "Two."]),
        ("", []),
        (" \n\t ", []),
    ],
)
def test_splitter_hard_cases(text, expected):
    assert sentences(text) == expected


def check_spans(text, spans):
    """In order, stripped, non-empty, only whitespace between and around them."""
    cursor = 0
    for start, end in spans:
        assert cursor <= start < end <= len(text)
        assert text[cursor:start].strip() == ""
        assert text[start:end] == text[start:end].strip()
        cursor = end
    assert text[cursor:].strip() == ""


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_splitter_spans_cover_fixture_books(split):
    for raw in fixture_books(split).values():
        for text in (raw, pg.normalize_whitespace(raw)):
            spans = split_sentences(text)
            assert len(spans) > 10
            check_spans(text, spans)


def test_splitter_is_local_and_linear():
    # Splitting a concatenation gives the pieces' sentences: decisions look only at neighbouring words.
    # (10002 ends with initials, "J. H. C.", which by design never end a sentence, so it is left out.)
    books = [pg.normalize_whitespace(t) for k, t in fixture_books("train").items() if k != "10002"]
    books += [pg.normalize_whitespace(t) for t in fixture_books("validation").values()]
    joined = " ".join(books)
    assert sentences(joined) == [s for b in books for s in sentences(b)]
    long_text = " ".join([joined] * 20)  # ~300 k characters, splits in well under a second
    assert len(split_sentences(long_text)) == 20 * len(split_sentences(joined))


# ---------------------------------------------------------------------------------------------------------------
# Packing one book


def make_book(n_sentences, seed=0):
    rng = random.Random(seed)
    words = "the old mill stood by a river and its wheel turned all day long".split()
    sents = []
    for i in range(n_sentences):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 14)))
        sents.append(f"Sentence {i} {body}.")
    return "\n".join(sents)


def check_row_consistency(row, book_text):
    """A chunk row agrees with the normalised book text it was cut from."""
    assert row["context"] == book_text[row["char_start"]:row["char_end"]]
    assert row["n_sentences"] == len(row["sentence_boundaries"]) >= 1
    assert row["sentence_boundaries"][0][0] == 0
    assert row["sentence_boundaries"][-1][1] == len(row["context"])
    check_spans(row["context"], [tuple(b) for b in row["sentence_boundaries"]])
    assert row["word_count"] == len(row["context"].split())
    # The chunk's sentences are the book's sentences (boundaries are not an artefact of cutting).
    book_spans = set(split_sentences(book_text))
    for s, e in row["sentence_boundaries"]:
        assert (row["char_start"] + s, row["char_start"] + e) in book_spans


@pytest.mark.parametrize("min_words", [1, 25, 60, 400])
@pytest.mark.parametrize("keep_short_last", [False, True])
def test_packing_min_words_and_tail(min_words, keep_short_last):
    book = pg.SplitBook("b", make_book(60, seed=min_words))
    rows = book.packed_rows("train", min_words, keep_short_last)
    total_words = sum(book.word_counts)
    for k, row in enumerate(rows):
        check_row_consistency(row, book.text)
        assert row["chunk_id"] == k and row["book_id"] == "b" and row["split"] == "train"
        is_tail = k == len(rows) - 1 and row["word_count"] < min_words
        if not is_tail:
            assert row["word_count"] >= min_words
            # greedy: dropping the chunk's last sentence would leave it short
            last_len = row["sentence_boundaries"][-1][1] - row["sentence_boundaries"][-1][0]
            assert row["word_count"] - len(row["context"][-last_len:].split()) < min_words
    # consecutive chunks, one space apart
    for a, b in zip(rows, rows[1:]):
        assert b["char_start"] == a["char_end"] + 1
    covered = sum(r["word_count"] for r in rows)
    if keep_short_last:
        assert rows[0]["char_start"] == 0 and rows[-1]["char_end"] == len(book.text)
        assert covered == total_words
    else:
        assert all(r["word_count"] >= min_words for r in rows)
        assert total_words - covered < min_words  # only a short tail is missing


def test_short_book_gives_only_a_tail():
    book = pg.SplitBook("tiny", "One short sentence. And another.")
    assert book.packed_rows("train", 100, keep_short_last=False) == []
    (row,) = book.packed_rows("train", 100, keep_short_last=True)
    assert row["word_count"] == 5 and row["n_sentences"] == 2


def test_sampled_rows_round_robin_without_replacement():
    books = [pg.SplitBook(f"b{i}", make_book(30 + 10 * i, seed=i)) for i in range(3)]
    rows = pg.sampled_rows(books, 40, 30, "validation", random.Random(1))
    assert len(rows) == 40
    keys = [(r["book_id"], r["char_start"]) for r in rows]
    assert len(set(keys)) == 40  # no chunk drawn twice
    by_id = {b.book_id: b for b in books}
    for r in rows:
        book = by_id[r["book_id"]]
        check_row_consistency(r, book.text)
        assert r["word_count"] >= 30
    # round robin: the first rounds visit the books in turn
    assert [r["book_id"] for r in rows[:6]] == ["b0", "b1", "b2"] * 2
    for book in books:
        ids = [r["chunk_id"] for r in rows if r["book_id"] == book.book_id]
        assert ids == list(range(len(ids)))
    # deterministic in the seed, different across seeds
    again = pg.sampled_rows(books, 40, 30, "validation", random.Random(1))
    other = pg.sampled_rows(books, 40, 30, "validation", random.Random(2))
    assert again == rows and other != rows


def test_sampled_rows_every_valid_start_then_error():
    book = pg.SplitBook("b", make_book(20))
    starts = book.valid_starts(50)
    assert starts and starts == list(range(len(starts)))  # a prefix of the sentences
    rows = pg.sampled_rows([book], len(starts), 50, "validation", random.Random(0))
    first_sentence_starts = sorted(r["char_start"] for r in rows)
    assert first_sentence_starts == [book.spans[i][0] for i in starts]
    with pytest.raises(ValueError, match="only .* distinct start"):
        pg.sampled_rows([book], len(starts) + 1, 50, "validation", random.Random(0))


# ---------------------------------------------------------------------------------------------------------------
# CLI on the fixture corpus


@pytest.fixture(scope="module")
def fixture_chunks(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunks") / "pg19_w60"
    pg.main(["--input_dir", str(FIXTURE), "--output_path", str(out), "--min_words", "60",
             "--sample_n_valid_chunks", "9", "--seed", "144"])
    return out


def test_cli_fixture_schema_and_consistency(fixture_chunks):
    saved = datasets.load_from_disk(str(fixture_chunks))
    assert list(saved) == ["train", "validation", "test"]
    for split, ds in saved.items():
        assert ds.features == pg.FEATURES
        books = {k: pg.normalize_whitespace(v) for k, v in fixture_books(split).items()}
        for row in ds:
            assert row["split"] == split
            check_row_consistency(row, books[row["book_id"]])
            assert row["word_count"] >= 60
    assert len(saved["validation"]) == 9
    assert set(saved["validation"]["book_id"]) == {"20001", "20002"}
    assert len(saved["train"]) >= 20 and set(saved["train"]["book_id"]) == {"10001", "10002", "10003"}
    info = json.loads((fixture_chunks / "prepare_pg19_chunks.json").read_text())
    assert info["args"]["seed"] == 144 and info["splits"]["validation"]["chunks"] == 9


def test_cli_output_exists_and_overwrite(fixture_chunks, tmp_path):
    base = ["--input_dir", str(FIXTURE), "--output_path", str(fixture_chunks), "--min_words", "60",
            "--splits", "train,test"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        pg.main(base)
    other = tmp_path / "not_a_dataset"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved DatasetDict"):
        pg.main(["--input_dir", str(FIXTURE), "--output_path", str(other), "--min_words", "60",
                 "--splits", "test", "--overwrite"])
    assert (other / "notes.txt").exists()
    # overwriting replaces the dataset (the old validation split disappears)
    copy = tmp_path / "copy"
    pg.main(["--input_dir", str(FIXTURE), "--output_path", str(copy), "--min_words", "60", "--splits", "test"])
    saved = pg.main(["--input_dir", str(FIXTURE), "--output_path", str(copy), "--min_words", "30",
                     "--splits", "train", "--overwrite"])
    assert list(saved) == ["train"] and min(saved["train"]["word_count"]) >= 30


def test_cli_saved_dataset_input_matches_input_dir(tmp_path):
    splits = {}
    for split in ("train", "test"):
        books = fixture_books(split)
        splits[split] = datasets.Dataset.from_dict({"url": [f"http://x/{k}" for k in books],
                                                    "text": list(books.values())})
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "books"))
    from_saved = pg.main(["--dataset_path", str(tmp_path / "books"), "--output_path", str(tmp_path / "a"),
                          "--min_words", "50", "--splits", "train,test", "--keep_short_last"])
    from_dir = pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "b"),
                        "--min_words", "50", "--splits", "train,test", "--keep_short_last"])
    for split in ("train", "test"):
        a, b = from_saved[split].to_list(), from_dir[split].to_list()
        assert [r["book_id"] for r in a] == [f"http://x/{r['book_id']}" for r in b]
        for r in a + b:
            r.pop("book_id")
        assert a == b
    with pytest.raises(ValueError, match="no text column 'body'"):
        pg.main(["--dataset_path", str(tmp_path / "books"), "--output_path", str(tmp_path / "c"),
                 "--min_words", "50", "--splits", "test", "--text_field", "body"])
    with pytest.raises(ValueError, match="no book-id column 'id'"):
        pg.main(["--dataset_path", str(tmp_path / "books"), "--output_path", str(tmp_path / "c"),
                 "--min_words", "50", "--splits", "test", "--book_id_field", "id"])
    with pytest.raises(ValueError, match=r"no split\(s\) \['validation'\]"):
        pg.main(["--dataset_path", str(tmp_path / "books"), "--output_path", str(tmp_path / "c"),
                 "--min_words", "50", "--splits", "test,validation"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--min_words", "0"], "--min_words must be > 0"),
        (["--min_words", "10", "--seed", "1"], "--seed only seeds --sample_n_valid_chunks"),
        (["--min_words", "10", "--splits", "train,test", "--sample_n_valid_chunks", "3"], "not in --splits"),
        (["--min_words", "10", "--sample_n_valid_chunks", "0"], "must be > 0"),
        (["--min_words", "10", "--dataset_name", "deepmind/pg19"], "only one input source"),
        (["--min_words", "10", "--text_field", "body"], "apply to datasets"),
        (["--min_words", "10", "--splits", "train,train"], "distinct"),
    ],
)
def test_cli_rejects_bad_options(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "o")] + extra)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_missing_split_folder_and_too_short_books(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*dev"):
        pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "o"), "--min_words", "10",
                 "--splits", "train,dev"])
    with pytest.raises(ValueError, match="no book has --min_words 100000"):
        pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "o"), "--min_words", "100000",
                 "--splits", "test"])
    with pytest.raises(ValueError, match="distinct start sentences"):
        pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "o"), "--min_words", "60",
                 "--splits", "validation", "--sample_n_valid_chunks", "100000", "--seed", "0"])
    assert not (tmp_path / "o").exists()


def test_cli_num_proc_and_drawn_seed(fixture_chunks, tmp_path):
    out = tmp_path / "o"
    saved = pg.main(["--input_dir", str(FIXTURE), "--output_path", str(out), "--min_words", "60",
                     "--splits", "train,validation", "--sample_n_valid_chunks", "3", "--num_proc", "2"])
    single = datasets.load_from_disk(str(fixture_chunks))
    assert saved["train"].to_list() == single["train"].to_list()  # same rows, same order
    info = json.loads((out / "prepare_pg19_chunks.json").read_text())
    assert isinstance(info["args"]["seed"], int)  # drawn and recorded, so the sample can be rebuilt
    again = pg.main(["--input_dir", str(FIXTURE), "--output_path", str(tmp_path / "again"), "--min_words", "60",
                     "--splits", "validation", "--sample_n_valid_chunks", "3", "--seed", str(info["args"]["seed"])])
    assert again["validation"].to_list() == saved["validation"].to_list()
