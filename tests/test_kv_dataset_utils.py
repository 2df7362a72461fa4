import collections
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import kv_dataset_utils as kvu
from kv_dataset_utils import KVTaskSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def check_sample(spec: KVTaskSpec, context: str, query: str, target: str) -> None:
    """Everything the module docstring promises about one sample."""
    n_segments, min_len, max_len = spec.segment_params()
    alphabet = set(spec.alphabet)
    assert context.endswith("|") and context.count("|") == n_segments
    pairs = kvu.extract_kv_pairs(context)
    assert len(pairs) == spec.num_kv_pairs
    keys = [key for key, _ in pairs]
    assert len(set(keys)) == len(keys), "keys must be distinct"
    for key, value in pairs:
        assert len(key) == spec.k_length and len(value) == spec.v_length
        assert set(key + value) <= alphabet
    # what remains after removing the pairs is filler (alphabet only) and one `|` per segment
    segments = context[:-1].split("|")
    for segment in segments:
        pair_chars = sum(len(f"!{k}:{v}!") for k, v in kvu.extract_kv_pairs(segment))
        filler = "".join(segment.split("!")[0::2])  # the text outside `!KEY:VALUE!`
        assert set(filler) <= alphabet
        assert len(segment) == pair_chars + len(filler)
        assert max(min_len - pair_chars, 0) <= len(filler) <= max(max_len - pair_chars, 0)
    assert len(context) <= spec.max_context_length
    if spec.num_kv_pairs == 0:
        assert query == "?!:" and target == context
    else:
        assert query.startswith("?!") and query.endswith(":") and len(query) == spec.k_length + 3
        assert target == dict(pairs)[query[2:-1]] + "!|"


SPECS = {
    "N16-K2V2-V62": KVTaskSpec(16, 2, 2),
    "N8-K2V2-V512": KVTaskSpec(8, 2, 2, vocab_size=512),
    "N2-K4V4-S4(32-64)": KVTaskSpec(2, 4, 4, 4, 32, 64),
    "N5-K1V3-S3(0-9)-V512": KVTaskSpec(5, 1, 3, 3, 0, 9, vocab_size=512),
    "N8-K2V2-V62_noise_0.5": KVTaskSpec(8, 2, 2, noise=0.5),
    "N0-S2(3-6)": KVTaskSpec(0, 0, 0, 2, 3, 6),
    "N3-K11V1-V62": KVTaskSpec(3, 11, 1),  # keys beyond one int64: the multi-limb uniqueness path
}


# ----------------------------------------------------------------------------------------------------------------------
# format

def test_reference_example_tokenises_like_the_reference():
    tokenizer = kvu.create_tokenizer(62)
    batch = tokenizer(["!ab:cd!!ef:gh!|"], add_special_tokens=True, padding=True, pad_to_multiple_of=8)
    assert batch["input_ids"] == [[66, 4, 5, 68, 6, 7, 66, 66, 8, 9, 68, 10, 11, 66, 69, 0]]
    batch = tokenizer(["?!ab:" + "cd!|", "?!a:"], padding=True, pad_to_multiple_of=8, return_offsets_mapping=True)
    assert batch["input_ids"] == [[67, 66, 4, 5, 68, 6, 7, 66, 69] + [0] * 7, [67, 66, 4, 68] + [0] * 12]
    assert batch["offset_mapping"][1][:5] == [(0, 1), (1, 2), (2, 3), (3, 4), (0, 0)]


@pytest.mark.parametrize("name", list(SPECS))
def test_samples_have_the_documented_format(name):
    spec = SPECS[name]
    assert kvu.parse_dataset_name(name) == spec
    samples = kvu.generate_kv_samples(spec, 300, seed=1)
    for context, query, target in zip(samples["context"], samples["query"], samples["target"]):
        check_sample(spec, context, query, target)
    lengths = {len(c) for c in samples["context"]}
    if not spec.has_segments:  # fixed length: pairs (+ noise filler) + `|`
        assert lengths == {spec.max_context_length}


def test_plain_context_is_the_pairs_and_a_bar():
    samples = kvu.generate_kv_samples(KVTaskSpec(16, 2, 2), 50, seed=0)
    for context in samples["context"]:
        assert len(context) == 7 * 16 + 1
        assert context == "".join(f"!{k}:{v}!" for k, v in kvu.extract_kv_pairs(context)) + "|"
    assert KVTaskSpec(96, 2, 2).max_context_length == 673 and KVTaskSpec(128, 2, 2).max_context_length == 897


def test_segment_lengths_cover_their_whole_range():
    # N1-K1V1 (5 pair characters) in S2(3-8): the pair's segment has 0..3 filler, the other 3..8
    spec = KVTaskSpec(1, 1, 1, 2, 3, 8)
    lengths = collections.Counter(len(c) for c in kvu.generate_kv_samples(spec, 4000, seed=0)["context"])
    assert set(lengths) == set(range(5 + 0 + 3 + 2, 5 + 3 + 8 + 2 + 1))
    # and the filler is spread uniformly around the pair: the pair starts at every offset of its segment
    spec = KVTaskSpec(1, 1, 1, 1, 9, 9)  # 4 filler characters, pair at offset 0..4
    offsets = collections.Counter(c.index("!") for c in kvu.generate_kv_samples(spec, 5000, seed=0)["context"])
    assert set(offsets) == set(range(5)) and min(offsets.values()) > 850


def test_noise_is_the_filler_fraction():
    for p, length in ((0.25, 76), (0.5, 113), (0.75, 225)):
        spec = KVTaskSpec(8, 2, 2, noise=p)
        assert spec.segment_params() == (1, length - 1, length - 1) and spec.max_context_length == length
        assert spec.name == f"N8-K2V2-V62_noise_{p}_1M"
        for context in kvu.generate_kv_samples(spec, 20, seed=0)["context"]:
            filler = len(context) - 1 - 8 * 7
            assert len(context) == length and abs(filler / (len(context) - 1) - p) <= 1 / length


def test_vectorised_generator_matches_the_single_sample_generator_in_distribution():
    # the readable reference-semantics generator and the vectorised one: same support and statistics
    spec = KVTaskSpec(3, 1, 1, 2, 4, 12)
    ref = [kvu.generate_sequence(3, 1, 1, 2, 4, 12, kvu.BASE_KV_ALPHABET, rng=np.random.default_rng(i))
           for i in range(3000)]
    for sample in ref[:200]:
        check_sample(spec, sample["context"], sample["query"], sample["target"] + "")
        assert sample["input_sequence"] == sample["context"] + sample["query"]
        assert sorted(sum(sample["segment_ids_to_kv_ids"], [])) == [0, 1, 2]
    vec = kvu.generate_kv_samples(spec, 3000, seed=0)

    def length_hist(contexts):
        counts = collections.Counter(len(c) for c in contexts)
        return {k: v / len(contexts) for k, v in counts.items()}

    h_ref, h_vec = length_hist([s["context"] for s in ref]), length_hist(vec["context"])
    assert set(h_ref) == set(h_vec)
    assert 0.5 * sum(abs(h_ref.get(k, 0) - h_vec.get(k, 0)) for k in set(h_ref) | set(h_vec)) < 0.06

    def bar_hist(contexts):  # where the first segment ends: mixes the pair split and the filler draws
        counts = collections.Counter(c.index("|") for c in contexts)
        return {k: v / len(contexts) for k, v in counts.items()}

    b_ref, b_vec = bar_hist([s["context"] for s in ref]), bar_hist(vec["context"])
    assert 0.5 * sum(abs(b_ref.get(k, 0) - b_vec.get(k, 0)) for k in set(b_ref) | set(b_vec)) < 0.06


def test_single_sample_generator_keeps_the_reference_insertion_order():
    sample = kvu.generate_sequence(5, 2, 2, 1, 0, 0, rng=3)
    expected = "".join(f"!{k}:{v}!" for k, v in reversed(sample["kv_pairs"])) + "|"
    assert sample["context"] == expected
    assert kvu.generate_sequence(5, 2, 2, 1, 0, 0, rng=3) == sample
    copy = kvu.generate_sequence(0, 0, 0, 1, 4, 4, rng=0)
    assert copy["query"] == "?!:" and copy["target"] == "" and len(copy["context"]) == 5


# ----------------------------------------------------------------------------------------------------------------------
# keys

def test_repeated_key_detection_both_paths():
    # [B=2, N=4, k=2]: row 0 repeats key 0 at index 2 and 3, row 1 repeats key 1 at index 3
    keys = np.array([[[1, 2], [3, 4], [1, 2], [1, 2]], [[0, 0], [5, 5], [0, 1], [5, 5]]], dtype=np.int32)
    expected = [[False, False, True, True], [False, False, False, True]]
    assert kvu._repeated_keys(keys, 62).tolist() == expected
    long_keys = np.concatenate([keys] * 6, axis=2)  # k = 12 > 10 characters per int64 limb for 62 symbols
    assert kvu._repeated_keys(long_keys, 62).tolist() == expected


def test_unique_keys_are_uniform_over_ordered_distinct_tuples():
    # 3 keys from a key space of 3 (dense path: a permutation): every one of the 6 orders, equally often
    keys = kvu._sample_unique_keys(np.random.default_rng(0), 30000, 3, 1, 3)[:, :, 0]
    counts = collections.Counter(map(tuple, keys.tolist()))
    assert len(counts) == 6 and all(abs(c - 5000) < 400 for c in counts.values())
    # 2 keys from 4 (rejection path)
    keys = kvu._sample_unique_keys(np.random.default_rng(1), 30000, 2, 1, 4)[:, :, 0]
    counts = collections.Counter(map(tuple, keys.tolist()))
    assert len(counts) == 12 and all(abs(c - 2500) < 300 for c in counts.values())


def test_as_many_pairs_as_keys_uses_every_key_once():
    samples = kvu.generate_kv_samples(KVTaskSpec(62, 1, 1), 20, seed=0)
    for context in samples["context"]:
        assert sorted(k for k, _ in kvu.extract_kv_pairs(context)) == sorted(kvu.BASE_KV_ALPHABET)
    keys = kvu._sample_unique_keys(np.random.default_rng(0), 100, 40, 2, 7)  # dense, two characters per key
    codes = keys[:, :, 0] * 7 + keys[:, :, 1]
    assert all(len(set(row)) == 40 for row in codes.tolist()) and codes.min() == 0 and codes.max() == 48


# ----------------------------------------------------------------------------------------------------------------------
# determinism

def test_generation_is_deterministic_and_pinned():
    spec = KVTaskSpec(4, 2, 2)
    a = kvu.generate_kv_samples(spec, 2, seed=0)
    # pinned bytes: a change here changes every dataset built with this module
    assert list(zip(a["context"], a["query"], a["target"])) == [
        ("!eV:2R!!3D:mk!!45:ya!!bJ:zX!|", "?!bJ:", "zX!|"), ("!eh:dl!!e0:4Y!!BY:nq!!3U:cl!|", "?!3U:", "cl!|")]
    valid = kvu.generate_kv_samples(spec, 1, seed=0, stream=kvu.VALID_STREAM)
    assert valid["context"] == ["!BN:dH!!hP:Ht!!8z:3X!!E6:GH!|"]
    unicode = kvu.generate_kv_samples(kvu.parse_dataset_name("N2-K1V2-S2(6-9)-V512"), 2, seed=0)
    assert unicode["context"] == ["😢!i:jд!|!П:ТⓄ!|", "!◁:Ξ😩!|!◎:ι🙉!º|"]


def test_prefixes_agree_across_chunks_and_seeds_differ():
    spec = KVTaskSpec(2, 1, 1, 2, 3, 9)
    n = kvu.CHUNK_SIZE + 7
    long = kvu.generate_kv_samples(spec, n, seed=5)
    assert len(long["context"]) == n
    short = kvu.generate_kv_samples(spec, 10, seed=5)
    assert all(long[c][:10] == short[c] for c in short)
    assert kvu.generate_kv_samples(spec, n, seed=5) == long
    other = kvu.generate_kv_samples(spec, 10, seed=6)
    assert other["context"] != short["context"]
    assert long["context"][kvu.CHUNK_SIZE:] != long["context"][:7], "chunks must not repeat"


def test_build_kv_dataset_dict_splits_are_independent():
    spec = KVTaskSpec(4, 2, 2)
    small = kvu.build_kv_dataset_dict(spec, n_train=30, n_valid=20, seed=3)
    assert set(small) == {"train", "valid"} and small["train"].num_rows == 30 and small["valid"].num_rows == 20
    assert small["train"].column_names == ["context", "query", "target"]
    assert all(f.dtype == "string" for f in small["train"].features.values())
    assert small["train"][:] == kvu.generate_kv_samples(spec, 30, seed=3)
    assert not set(small["valid"]["context"]) & set(small["train"]["context"])
    bigger = kvu.build_kv_dataset_dict(spec, n_train=40, n_valid=20, seed=3)
    assert bigger["valid"][:] == small["valid"][:], "valid must not depend on n_train"
    assert bigger["train"][:30] == small["train"][:]
    with pytest.raises(ValueError, match="n_valid"):
        kvu.build_kv_dataset_dict(spec, n_train=3, n_valid=0)


# ----------------------------------------------------------------------------------------------------------------------
# names and validation

@pytest.mark.parametrize("name, spec, size", [
    ("N16-K2V2-V62_1M", KVTaskSpec(16, 2, 2), 1_000_000),
    ("N128-K2V2-V62_1M", KVTaskSpec(128, 2, 2), 1_000_000),
    ("N8-K1V1-V512_1M", KVTaskSpec(8, 1, 1, vocab_size=512), 1_000_000),
    ("N2-K4V4-S4(32-64)_1M", KVTaskSpec(2, 4, 4, 4, 32, 64), 1_000_000),
    ("N0-S1(4-4)_1M", KVTaskSpec(0, 0, 0, 1, 4, 4), 1_000_000),
    ("N8-K2V2-V62_noise_0.25_1M", KVTaskSpec(8, 2, 2, noise=0.25), 1_000_000),
    ("N16-K2V2-V62_noise_0.75_1M", KVTaskSpec(16, 2, 2, noise=0.75), 1_000_000),
    ("N5-K1V3-S3(0-9)-V512_10K", KVTaskSpec(5, 1, 3, 3, 0, 9, vocab_size=512), 10_000),
    ("N16-K2V2-V62_1234", KVTaskSpec(16, 2, 2), 1234),
    ("N16-K2V2-V62", KVTaskSpec(16, 2, 2), None),
])
def test_parse_dataset_name(name, spec, size):
    assert kvu.parse_dataset_name(name) == spec
    assert kvu.dataset_size(name) == size
    assert spec.dataset_name(size or 1_000_000) == (name if size else name + "_1M")
    assert spec.task_name == name.rsplit("_", 1)[0] if size else spec.task_name == name
    if size == 1_000_000:
        assert spec.name == name


@pytest.mark.parametrize("name, match", [
    ("N16", "-K{k}V{v} is required"),
    ("N16-K2V2_1M", "alphabet"),
    ("N16-K2V2-V62_1X", "malformed"),
    ("n16-K2V2-V62_1M", "malformed"),
    ("N-1-K2V2-V62", "malformed"),
    ("N16-K2V2-V100_1M", "unknown alphabet size"),
    ("N100-K1V1-V62_1M", "distinct keys"),
    ("N0-K2V2-V62", "copy task"),
    ("N4-S1(4-4)", "copy task N0"),
    ("N4-K2V2-S1(0-0)_1M", "no filler"),
    ("N4-K2V2-S2(9-3)", "min_segment_len"),
    ("N8-K2V2-V62_noise_1.5_1M", "noise"),
    ("N8-K2V2-V62_noise_0.2.5_1M", "malformed noise"),
    ("N8-K2V2-S2(4-8)_noise_0.5", "exclude each other"),
])
def test_bad_names_raise(name, match):
    with pytest.raises(ValueError, match=match):
        kvu.parse_dataset_name(name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_pairs=-1, k_length=2, v_length=2), "num_kv_pairs must be >= 0"),
    (dict(num_kv_pairs=4, k_length=-2, v_length=2), "k_length must be >= 0"),
    (dict(num_kv_pairs=4, k_length=2, v_length=0), "v_length must be >= 1|k_length and v_length"),
    (dict(num_kv_pairs=4, k_length=2, v_length=2, vocab_size=100), "unknown alphabet size"),
    (dict(num_kv_pairs=4, k_length=2, v_length=2, n_segments=0), "n_segments"),
    (dict(num_kv_pairs=4, k_length=2, v_length=2, noise=0.0), "noise"),
    (dict(num_kv_pairs=4, k_length=2, v_length=2, noise=1.0), "noise"),
    (dict(num_kv_pairs=4, k_length=2.0, v_length=2), "integer"),
    (dict(num_kv_pairs=0, k_length=0, v_length=0), "empty context"),
    (dict(num_kv_pairs=0, k_length=0, v_length=0, n_segments=1, min_segment_len=2, max_segment_len=2,
          noise=0.5), "exclude each other|copy task"),
    (dict(num_kv_pairs=3845, k_length=2, v_length=2), "allow only 3844"),
])
def test_bad_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVTaskSpec(**kwargs)


def test_other_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        kvu.generate_kv_samples(KVTaskSpec(4, 2, 2), -1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        kvu.generate_kv_samples(KVTaskSpec(4, 2, 2), 3, seed=-1)
    with pytest.raises(ValueError, match="syntax characters"):
        kvu.generate_sequence(2, 1, 1, 1, 0, 0, kv_alphabet="ab!")
    with pytest.raises(ValueError, match="distinct keys"):
        kvu.generate_sequence(5, 1, 1, 1, 0, 0, kv_alphabet="ab")
    with pytest.raises(ValueError, match="unknown alphabet size"):
        kvu.create_tokenizer(100)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers

# reference ids of the 512 alphabet's extras, at every range boundary
REFERENCE_EXTRA_IDS = {"①": 70, "⓴": 152, "😀": 153, "🙏": 232, "Α": 233, "Ω": 256, "α": 257, "ω": 281, "А": 282,
                       "я": 345, "¡": 346, "ÿ": 439, "■": 440, "◯": 519}


@pytest.mark.parametrize("vocab_size", [62, 512])
def test_tokenizer_ids_and_round_trip(vocab_size):
    for tokenizer in (kvu.create_tokenizer(vocab_size), kvu.load_kv_tokenizer(vocab_size)):
        assert tokenizer.vocab_size == len(tokenizer) == vocab_size + 8
        assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == \
            [0, 1, 2, 3]
        assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"
        chars = kvu.tokenizer_chars(vocab_size)
        assert chars[:66] == "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?:|"
        for i, ch in enumerate(chars):
            ids = tokenizer(ch, add_special_tokens=True)["input_ids"]
            assert ids == [i + 4], ch
            assert tokenizer.decode(ids) == ch
        kvu.check_tokenizer_alphabet(tokenizer, vocab_size)
        assert tokenizer(" \n")["input_ids"] == [3, 3]  # anything else is [UNK]
        assert tokenizer.decode([1, 4, 5, 2, 0], skip_special_tokens=True) == "ab"
        if vocab_size == 512:
            assert {ch: tokenizer.convert_tokens_to_ids(ch) for ch in REFERENCE_EXTRA_IDS} == REFERENCE_EXTRA_IDS
            sample = "!Д¦:😣ⓘ!!ì▾:ØP!!😠😗:Ⓔ◅!!ЦU:Β▦!|"  # a reference V512 context
            assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
            assert len(tokenizer(sample)["input_ids"]) == len(sample)


def test_committed_tokenizers_rebuild_identically(tmp_path):
    kvu.main(["--save_tokenizers", "--tokenizers_dir", str(tmp_path)])
    for vocab_size, committed in kvu.KV_TOKENIZER_DIR.items():
        rebuilt = tmp_path / f"kv_alphabet_{vocab_size}"
        names = sorted(p.name for p in committed.iterdir())
        assert names == sorted(p.name for p in rebuilt.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        for name in names:
            assert filecmp.cmp(committed / name, rebuilt / name, shallow=False), f"{committed / name} is stale"
        assert json.loads((committed / "tokenizer.json").read_text())["post_processor"] is None


def test_load_kv_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown alphabet size"):
        kvu.load_kv_tokenizer(100)
    with pytest.raises(FileNotFoundError, match="--save_tokenizers"):
        kvu.load_kv_tokenizer(tmp_path)
    tokenizer = kvu.load_kv_tokenizer(str(kvu.KV_TOKENIZER_DIR[62]))
    assert tokenizer("?!ab:")["input_ids"] == [67, 66, 4, 5, 68]


# ----------------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_builds_loads_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "kv"
    kvu.main(["--name", "N4-K2V2-V62_1M", "--n_train", "50", "--n_valid", "10", "--seed", "2", "--out", str(out),
              "--show", "1"])
    loaded = datasets.load_from_disk(str(out))
    expected = kvu.build_kv_dataset_dict(KVTaskSpec(4, 2, 2), 50, 10, seed=2)
    assert loaded["train"][:] == expected["train"][:] and loaded["valid"][:] == expected["valid"][:]
    meta = json.loads((out / "kv_task.json").read_text())
    assert meta["name"] == "N4-K2V2-V62_50" and meta["n_train"] == 50 and meta["seed"] == 2
    assert "context !" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # exists, no --overwrite
        kvu.main(["--name", "N4-K2V2-V62_1M", "--n_train", "5", "--n_valid", "5", "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    assert datasets.load_from_disk(str(out))["train"].num_rows == 50
    kvu.main(["--name", "N4-K2V2-V62_1M", "--n_train", "5", "--n_valid", "5", "--out", str(out), "--skip_existing"])
    assert datasets.load_from_disk(str(out))["train"].num_rows == 50

    # overrides win over the name; the name's size suffix sets n_train
    kvu.main(["--name", "N4-K2V2-V62_20", "--num_kv_pairs", "3", "--noise", "0.5", "--n_valid", "5", "--out",
              str(out), "--overwrite"])
    loaded = datasets.load_from_disk(str(out))
    assert loaded["train"].num_rows == 20 and not (tmp_path / "kv.tmp").exists()
    spec = KVTaskSpec(3, 2, 2, noise=0.5)
    for row in loaded["train"]:
        check_sample(spec, row["context"], row["query"], row["target"])


@pytest.mark.parametrize("argv, match", [
    (["--name", "N16-K2V2"], "alphabet"),
    (["--name", "N100-K1V1-V62"], "distinct keys"),
    (["--name", "N4-K2V2-V62", "--k_length", "-1"], "k_length must be >= 0"),
    (["--name", "N4-K2V2-V62", "--vocab_size", "64"], "unknown alphabet size"),
    (["--name", "N4-K2V2-V62", "--n_train", "0"], "--n_train must be >= 1"),
    (["--name", "N4-K2V2-V62", "--overwrite", "--skip_existing"], "exclude each other"),
    (["--n_train", "5"], "--name is required"),
])
def test_cli_bad_input_fails_before_any_work(argv, match, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        kvu.main(argv + ["--out", str(out)])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not out.exists()


def test_cli_runs_as_a_script(tmp_path):
    out = tmp_path / "N2-K1V1-V512"
    result = subprocess.run([sys.executable, "kv_dataset_utils.py", "--name", "N2-K1V1-V512_1M", "--n_train", "8",
                             "--n_valid", "4", "--out", str(out), "--show", "2"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "query   ?!" in result.stdout and (out / "dataset_dict.json").is_file()


def test_test_split_is_its_own_stream():
    spec = kvu.parse_dataset_name("N4-K2V2-V62")
    splits = kvu.build_kv_dataset_dict(spec, n_train=20, n_valid=10, seed=0, n_test=10)
    assert sorted(splits) == ["test", "train", "valid"] and len(splits["test"]) == 10
    contexts = {name: set(splits[name]["context"]) for name in splits}
    assert not contexts["test"] & (contexts["valid"] | contexts["train"])
    assert splits["test"]["context"] == kvu.generate_kv_samples(
        spec, 10, 0, kvu.TEST_STREAM)["context"]
    assert "test" not in kvu.build_kv_dataset_dict(spec, n_train=20, n_valid=10, seed=0)
