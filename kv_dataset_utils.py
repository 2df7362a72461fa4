"""Synthetic key-value retrieval data for GradMem: generator, dataset names, character tokenizers, builder CLI.

Sample format (the reference's, char for char)
------------------------------------------------
A sample has three strings. `context` holds N key-value pairs, each written `!KEY:VALUE!`, and ends with `|`;
`query` is `?!KEY:` for one of the N keys; `target` is `VALUE!|`. Keys are N distinct random strings of
`k_length` alphabet characters, values are random strings of `v_length` characters (values may repeat).
Example (N2-K2V2-V62): context `!ab:cd!!ef:gh!|`, query `?!ab:`, target `cd!|`.

Segments (the reference's `n_segments`, `min_segment_len`, `max_segment_len`): each pair goes to a uniformly
random segment. Segment s holding pairs of `kv_chars` characters in total gets
`F ~ randint(max(min_segment_len - kv_chars, 0), max(max_segment_len - kv_chars, 0))` (both ends included) random
filler characters of the alphabet; its pairs are inserted into the filler at positions drawn uniformly from
[0, F] and sorted in decreasing order, the segment's first pair at the largest position (so a segment's pairs always
appear in reverse order of generation, e.g. with an empty filler); then `|` closes the segment. The context is the
concatenation of the segments. The paper's no-noise datasets use one segment of length 0-0: context = the pairs + `|`,
7N+1 characters for K2V2. Filler never contains `!?:|`, so pairs stay unambiguous.

Noise (the `*_noise_{p}` family; the reference never published its definition, this is ours): noise p in (0, 1)
means that random filler characters make up the fraction p of the context before its final `|`. With
L = N * (k_length + v_length + 3) pair characters, the context holds F = floor(p * L / (1 - p) + 0.5) filler
characters, and the pairs are inserted into them exactly as in one segment of length L + F (the noise dataset equals
segments S1(L+F - L+F)). Every context of a noise dataset therefore has L + F + 1 characters: for N8-K2V2,
p = 0.25 / 0.5 / 0.75 gives 76 / 113 / 225 characters instead of 57.

The copy task (`N0-S1(4-4)`): no pairs, the context is filler + `|`, query `?!:`, target = the context (as the
reference's copy-task notebook set it; `generate_sequence` returns the reference's raw empty target for N0).

Alphabets: 62 symbols = a-z A-Z 0-9; 512 symbols = those 62 and 450 extra printable Unicode characters
(enclosed alphanumerics, emoticons, Greek, Cyrillic, Latin-1, geometric shapes), in the reference's order.

Dataset names
-------------
`N{n}-K{k}V{v}-V{vocab}` (no filler), `N{n}-K{k}V{v}-S{segments}({min}-{max})` (filler segments; `-V512` appended
for the 512 alphabet), `N{n}-K{k}V{v}-V{vocab}_noise_{p}` (noise), `N0-S{s}({min}-{max})` (copy task), followed by
a train-size suffix: `_1M` for 1,000,000 train samples (all reference names), otherwise `_{n}K`, `_{n}M` or `_{n}`
(`KVTaskSpec.dataset_name(n_train)`). `KVTaskSpec.name` is the `_1M` name. `parse_dataset_name` accepts all of
these, with or without the size suffix.

Determinism
-----------
Samples are generated in chunks of CHUNK_SIZE rows; chunk c of stream `split` uses
`numpy.random.SeedSequence(seed, spawn_key=(split, c))` (split 0 = train, 1 = valid). So a dataset is a pure function
of (spec, n, seed, split): identical byte for byte on every run (with the same numpy), the first n samples do not
depend on how many are generated, and the valid split shares no random stream with train (it is also the same valid
split whatever n_train is). Samples are not de-duplicated across splits (for tiny key spaces exact repeats happen).

Tokenizers
----------
One token per character: `[PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3`, then a-z (4-29), A-Z (30-55), 0-9 (56-65), `!?:|`
(66-69), then the extras (70-519 for 512). Vocabulary 70 / 520. No post-processor (no BOS/EOS added), right padding
and truncation, any other character (space, newline) -> `[UNK]`. Saved in tokenizers/kv_alphabet_{62,512}/.

CLI
---
    python kv_dataset_utils.py --name N16-K2V2-V62_1M --out data/N16-K2V2-V62_1M
    python kv_dataset_utils.py --name N8-K2V2-V62_noise_0.5_1M --n_train 10000 --show 3
    python kv_dataset_utils.py --save_tokenizers
"""
import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np
import pyarrow as pa

REPO_ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------------
# Alphabets

STRUCT_CHARS = "!?:|"  # syntax: pair delimiters, query mark, key/value separator, segment end
BASE_KV_ALPHABET = string.ascii_letters + string.digits  # 62 symbols
KV_ALPHABET_SIZES = (62, 512)

# Candidate extra characters, in order; the 512 alphabet takes the first 450 that pass `_is_extra_char`.
EXTRA_CHAR_RANGES = (
    (0x2460, 0x2473),  # circled numbers 1-20
    (0x24B6, 0x24F4),  # circled letters A-Z a-z, circled 0, negative circled 11-20
    (0x1F600, 0x1F64F),  # emoticons
    (0x0391, 0x03A9),  # Greek capitals
    (0x03B1, 0x03C9),  # Greek small
    (0x0410, 0x044F),  # Cyrillic
    (0x00A1, 0x00FF),  # Latin-1 supplement
    (0x25A0, 0x25FF),  # geometric shapes
    (0x2500, 0x257F),  # box drawing
)


def _is_extra_char(ch: str) -> bool:
    """Printable, not already used, not a control/format/unassigned (C*), mark (M*) or separator (Z*) character."""
    return (ch.isprintable() and ch not in STRUCT_CHARS and ch not in BASE_KV_ALPHABET
            and unicodedata.category(ch)[0] not in "CMZ")


def get_extra_chars(n: int) -> str:
    """The first n extra characters (the 512 alphabet uses n = 450)."""
    extra = [chr(c) for lo, hi in EXTRA_CHAR_RANGES for c in range(lo, hi + 1) if _is_extra_char(chr(c))]
    if n > len(extra):
        raise ValueError(f"only {len(extra)} extra characters are defined, asked for {n}")
    return "".join(extra[:n])


def kv_alphabet(vocab_size: int) -> str:
    """The symbols keys, values and filler are drawn from (STRUCT_CHARS excluded)."""
    _check_vocab_size(vocab_size)
    return BASE_KV_ALPHABET + get_extra_chars(vocab_size - len(BASE_KV_ALPHABET))


def _check_vocab_size(vocab_size) -> None:
    if vocab_size not in KV_ALPHABET_SIZES:
        raise ValueError(f"unknown alphabet size {vocab_size!r}: the KV alphabets have {KV_ALPHABET_SIZES} symbols")


# ----------------------------------------------------------------------------------------------------------------------
# Task spec and dataset names

@dataclass(frozen=True)
class KVTaskSpec:
    """Parameters of one KV-retrieval task (see the module docstring for their meaning)."""

    num_kv_pairs: int
    k_length: int
    v_length: int
    n_segments: int = 1
    min_segment_len: int = 0
    max_segment_len: int = 0
    vocab_size: int = 62
    noise: Optional[float] = None

    def __post_init__(self):
        for f in ("num_kv_pairs", "k_length", "v_length", "n_segments", "min_segment_len", "max_segment_len"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{f} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{f} must be >= 0, got {value}")
        _check_vocab_size(self.vocab_size)
        if self.n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {self.n_segments}")
        if self.min_segment_len > self.max_segment_len:
            raise ValueError(f"min_segment_len ({self.min_segment_len}) > max_segment_len ({self.max_segment_len})")
        if self.num_kv_pairs == 0:
            if self.k_length or self.v_length:
                raise ValueError("the copy task (num_kv_pairs=0) has no keys or values: set k_length=v_length=0")
            if self.max_segment_len == 0:
                raise ValueError("num_kv_pairs=0 with max_segment_len=0 gives an empty context: give filler segments")
        else:
            if self.k_length < 1 or self.v_length < 1:
                raise ValueError(f"k_length and v_length must be >= 1, got K{self.k_length}V{self.v_length}")
            n_keys = self.vocab_size ** self.k_length
            if self.num_kv_pairs > n_keys:
                raise ValueError(f"{self.num_kv_pairs} pairs need as many distinct keys, but keys of {self.k_length} "
                                 f"characters over {self.vocab_size} symbols allow only {n_keys}: use fewer pairs, "
                                 "longer keys or the 512 alphabet")
        if self.noise is not None:
            if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 < self.noise < 1:
                raise ValueError(f"noise must be a fraction in (0, 1) (None = no filler), got {self.noise!r}")
            if self.has_segments:
                raise ValueError("noise and filler segments exclude each other: noise p already fixes the filler "
                                 "(one segment); drop n_segments/min_segment_len/max_segment_len or noise")
            if self.num_kv_pairs == 0:
                raise ValueError("noise is defined relative to the pairs; the copy task (num_kv_pairs=0) has none")

    @property
    def has_segments(self) -> bool:
        return not (self.n_segments == 1 and self.max_segment_len == 0)

    @property
    def pair_length(self) -> int:
        """Characters of one `!KEY:VALUE!`."""
        return self.k_length + self.v_length + 3 if self.num_kv_pairs else 0

    @property
    def alphabet(self) -> str:
        return kv_alphabet(self.vocab_size)

    def segment_params(self) -> tuple[int, int, int]:
        """(n_segments, min_segment_len, max_segment_len) that generate this task; noise p becomes one segment."""
        if self.noise is None:
            return self.n_segments, self.min_segment_len, self.max_segment_len
        pair_chars = self.num_kv_pairs * self.pair_length
        filler = math.floor(self.noise * pair_chars / (1 - self.noise) + 0.5)
        return 1, pair_chars + filler, pair_chars + filler

    @property
    def max_context_length(self) -> int:
        """Longest possible context in characters (= tokens); the exact length when it cannot vary."""
        n_seg, _, max_len = self.segment_params()
        pair_chars = self.num_kv_pairs * self.pair_length
        # a segment holding c pair characters has max(max_len, c) characters before its `|`
        return (n_seg - 1) * max_len + max(max_len, pair_chars) + n_seg

    @property
    def task_name(self) -> str:
        """The dataset name without the train-size suffix, e.g. `N16-K2V2-V62`."""
        name = f"N{self.num_kv_pairs}"
        if self.num_kv_pairs:
            name += f"-K{self.k_length}V{self.v_length}"
        if self.has_segments:
            name += f"-S{self.n_segments}({self.min_segment_len}-{self.max_segment_len})"
            if self.vocab_size != 62:
                name += f"-V{self.vocab_size}"
        else:
            name += f"-V{self.vocab_size}"
        if self.noise is not None:
            name += f"_noise_{self.noise:g}"
        return name

    def dataset_name(self, n_train: int) -> str:
        return f"{self.task_name}_{format_size(n_train)}"

    @property
    def name(self) -> str:
        """The reference-style name of the 1M-sample dataset, e.g. `N16-K2V2-V62_1M`."""
        return self.dataset_name(1_000_000)


def format_size(n: int) -> str:
    """1_000_000 -> '1M', 5000 -> '5K', 1234 -> '1234'."""
    if n <= 0:
        raise ValueError(f"dataset size must be positive, got {n}")
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}K"
    return str(n)


_NAME_RE = re.compile(
    r"N(?P<n>\d+)"
    r"(?:-K(?P<k>\d+)V(?P<v>\d+))?"
    r"(?:-S(?P<s>\d+)\((?P<min>\d+)-(?P<max>\d+)\))?"
    r"(?:-V(?P<vocab>\d+))?"
    r"(?:_noise_(?P<noise>[0-9.]+(?:e-?\d+)?))?"
    r"(?:_(?P<size>\d+)(?P<unit>[KM]?))?"
)
NAME_SCHEME = ("N{pairs}-K{key_len}V{value_len}-V{62|512}[_noise_{p}][_{size}] or "
               "N{pairs}-K{key_len}V{value_len}-S{segments}({min}-{max})[-V512][_{size}] or N0-S{segments}({min}-{max})"
               "[_{size}], size like 1M, 10K or 1234 (e.g. N16-K2V2-V62_1M, N8-K2V2-V62_noise_0.25_1M, "
               "N2-K4V4-S4(32-64)_1M)")


def _match_name(name: str) -> re.Match:
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"malformed KV dataset name {name!r}; expected {NAME_SCHEME}")
    return m


def parse_dataset_name(name: str) -> KVTaskSpec:
    """`N16-K2V2-V62_1M` -> KVTaskSpec(16, 2, 2, vocab_size=62). The size suffix is optional (see dataset_size)."""
    m = _match_name(name)
    n = int(m["n"])
    if (m["k"] is None) != (n == 0):
        raise ValueError(f"malformed KV dataset name {name!r}: -K{{k}}V{{v}} is required with pairs and absent for "
                         f"the copy task N0; expected {NAME_SCHEME}")
    if m["s"] is None and m["vocab"] is None:
        raise ValueError(f"malformed KV dataset name {name!r}: give the alphabet (-V62 / -V512) or filler segments "
                         f"(-S{{s}}({{min}}-{{max}})); expected {NAME_SCHEME}")
    spec = KVTaskSpec(
        num_kv_pairs=n,
        k_length=int(m["k"] or 0),
        v_length=int(m["v"] or 0),
        n_segments=int(m["s"]) if m["s"] else 1,
        min_segment_len=int(m["min"]) if m["s"] else 0,
        max_segment_len=int(m["max"]) if m["s"] else 0,
        vocab_size=int(m["vocab"]) if m["vocab"] else 62,
        noise=_parse_float(m["noise"], name) if m["noise"] else None,
    )
    if m["s"] is not None and not spec.has_segments:
        raise ValueError(f"{name!r}: S1(0-0) means no filler; name it {spec.task_name}")
    return spec


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"malformed noise {text!r} in {name!r}; expected {NAME_SCHEME}") from None


def dataset_size(name: str) -> Optional[int]:
    """The train size a name's suffix states (`_1M` -> 1_000_000), or None without a suffix."""
    m = _match_name(name)
    if m["size"] is None:
        return None
    return int(m["size"]) * {"": 1, "K": 1000, "M": 1_000_000}[m["unit"]]


# ----------------------------------------------------------------------------------------------------------------------
# Single-sample generator (reference semantics, plain Python; the readable specification of the vectorised one)

def generate_sequence(num_kv_pairs: int = 3, k_length: int = 4, v_length: int = 4, n_segments: int = 4,
                      min_segment_len: int = 32, max_segment_len: int = 64, kv_alphabet: str = BASE_KV_ALPHABET,
                      rng: Union[np.random.Generator, int, None] = None) -> dict:
    """One sample, with the reference's arguments and output keys.

    rng: a numpy Generator, an int seed, or None (fresh OS entropy: not reproducible).
    Returns kv_pairs [(key, value)], segment_ids_to_kv_ids [[pair index] per segment], context, query,
    input_sequence (= context + query) and target.
    """
    if set(kv_alphabet) & set(STRUCT_CHARS):
        raise ValueError(f"kv_alphabet must not contain the syntax characters {STRUCT_CHARS!r}")
    if num_kv_pairs > len(kv_alphabet) ** k_length:
        raise ValueError(f"{num_kv_pairs} distinct keys of length {k_length} do not exist over "
                         f"{len(kv_alphabet)} symbols")
    rng = np.random.default_rng(rng)

    def random_string(length: int) -> str:
        return "".join(kv_alphabet[i] for i in rng.integers(0, len(kv_alphabet), size=length))

    keys: list[str] = []
    while len(keys) < num_kv_pairs:  # rejection sampling: keys distinct
        key = random_string(k_length)
        if key not in keys:
            keys.append(key)
    kv_pairs = [(key, random_string(v_length)) for key in keys]

    pair_segment = rng.integers(0, n_segments, size=num_kv_pairs)
    segment_ids_to_kv_ids = [[j for j in range(num_kv_pairs) if pair_segment[j] == s] for s in range(n_segments)]
    segments = []
    for kv_ids in segment_ids_to_kv_ids:
        pair_strings = [f"!{kv_pairs[j][0]}:{kv_pairs[j][1]}!" for j in kv_ids]
        kv_chars = sum(len(p) for p in pair_strings)
        filler_len = int(rng.integers(max(min_segment_len - kv_chars, 0), max(max_segment_len - kv_chars, 0) + 1))
        pieces = list(random_string(filler_len))
        positions = sorted(rng.integers(0, filler_len + 1, size=len(kv_ids)).tolist(), reverse=True)
        for position, pair_string in zip(positions, pair_strings):
            pieces.insert(position, pair_string)
        segments.append("".join(pieces) + "|")
    context = "".join(segments)

    if num_kv_pairs == 0:
        query, target = "?!:", ""
    else:
        key, value = kv_pairs[int(rng.integers(0, num_kv_pairs))]
        query, target = f"?!{key}:", f"{value}!|"
    return dict(kv_pairs=kv_pairs, segment_ids_to_kv_ids=segment_ids_to_kv_ids, context=context, query=query,
                input_sequence=context + query, target=target)


# ----------------------------------------------------------------------------------------------------------------------
# Vectorised generator

CHUNK_SIZE = 1 << 14  # rows per random stream; part of the determinism contract (changing it changes the data)
TRAIN_STREAM, VALID_STREAM, TEST_STREAM = 0, 1, 2
DEFAULT_N_TEST = 2_000  # test samples of a built dataset: reported numbers come from a split selection never saw


def _chars_to_strings(codes: np.ndarray) -> np.ndarray:
    """[B, L] Unicode code points (0 = padding at the end) -> [B] numpy str array (trailing NULs dropped)."""
    codes = np.ascontiguousarray(codes, dtype="<u4")
    return codes.view(f"<U{codes.shape[1]}")[:, 0] if codes.shape[1] else np.full(codes.shape[0], "", dtype="<U1")


def _repeated_keys(keys: np.ndarray, alphabet_size: int) -> np.ndarray:
    """keys [B, N, k] symbol ids -> [B, N] bool, True where a key equals an earlier key of its row."""
    B, N, k = keys.shape
    chars_per_limb = 1
    while chars_per_limb < k and alphabet_size ** (chars_per_limb + 1) < 2 ** 62:
        chars_per_limb += 1
    limbs = []  # each key as ceil(k / chars_per_limb) exact int64 numbers
    for start in range(0, k, chars_per_limb):
        limb = np.zeros((B, N), dtype=np.int64)
        for i in range(start, min(start + chars_per_limb, k)):
            limb = limb * alphabet_size + keys[:, :, i]
        limbs.append(limb)
    repeated = np.zeros((B, N), dtype=bool)
    if len(limbs) == 1:
        order = np.argsort(limbs[0], axis=1, kind="stable")  # equal keys keep their index order
        sorted_codes = np.take_along_axis(limbs[0], order, axis=1)
        same_as_previous = sorted_codes[:, 1:] == sorted_codes[:, :-1]  # [B, N-1]
        row, col = np.nonzero(same_as_previous)
        repeated[row, order[row, col + 1]] = True
    else:  # long keys: unique (row, limbs) tuples; np.unique returns the index of each first occurrence
        table = np.stack([np.broadcast_to(np.arange(B)[:, None], (B, N))] + limbs, axis=-1).reshape(B * N, -1)
        _, first = np.unique(table, axis=0, return_index=True)
        repeated.reshape(-1)[:] = True
        repeated.reshape(-1)[first] = False
    return repeated


def _sample_unique_keys(rng: np.random.Generator, B: int, N: int, k: int, alphabet_size: int) -> np.ndarray:
    """[B, N, k] symbol ids; the N keys of a row are distinct and uniform over all such ordered tuples.

    Sparse case (N at most half of the key space): keys that repeat an earlier key of their row are redrawn until
    none does. The procedure commutes with any permutation of the key space and ends on distinct tuples, which that
    group permutes transitively, so the result is uniform over ordered distinct tuples, exactly like the reference's
    one-key-at-a-time rejection sampling. Dense case: the first N keys of a random permutation of the key space
    (rejection would need ~key_space draws for the last key).
    """
    key_space = alphabet_size ** k
    if 2 * N > key_space:
        codes = rng.permuted(np.broadcast_to(np.arange(key_space), (B, key_space)), axis=1)[:, :N]  # [B, N]
        return np.stack([codes // alphabet_size ** (k - 1 - i) % alphabet_size for i in range(k)],
                        axis=-1).astype(np.int32)
    keys = rng.integers(0, alphabet_size, size=(B, N, k), dtype=np.int32)
    rows = np.arange(B)  # rows that may still hold a repeated key
    while N > 1 and len(rows):
        repeated = _repeated_keys(keys[rows], alphabet_size)  # [R, N]
        has_repeat = repeated.any(axis=1)
        rows, repeated = rows[has_repeat], repeated[has_repeat]
        row_keys = keys[rows]
        row_keys[repeated] = rng.integers(0, alphabet_size, size=(int(repeated.sum()), k), dtype=np.int32)
        keys[rows] = row_keys
    return keys


def _generate_chunk(spec: KVTaskSpec, rng: np.random.Generator, B: int) -> dict[str, np.ndarray]:
    """B samples of `spec` as numpy str arrays {context, query, target}."""
    alphabet = np.array([ord(c) for c in spec.alphabet], dtype=np.uint32)
    A = len(alphabet)
    N, k, v, P = spec.num_kv_pairs, spec.k_length, spec.v_length, spec.pair_length
    S, min_len, max_len = spec.segment_params()
    rows = np.arange(B)

    keys = _sample_unique_keys(rng, B, N, k, A)  # [B, N, k]
    values = rng.integers(0, A, size=(B, N, v), dtype=np.int32)  # [B, N, v]
    pair_segment = rng.integers(0, S, size=(B, N))  # [B, N]

    # filler length of each segment, then where segments start and end
    pairs_in_segment = (pair_segment[:, :, None] == np.arange(S)).sum(axis=1)  # [B, S]
    kv_chars = pairs_in_segment * P
    filler_len = rng.integers(np.maximum(min_len - kv_chars, 0), np.maximum(max_len - kv_chars, 0) + 1)  # [B, S]
    segment_len = filler_len + kv_chars + 1  # + `|`
    segment_end = np.cumsum(segment_len, axis=1)  # [B, S]
    segment_start = segment_end - segment_len
    context_len = segment_end[:, -1]  # [B]

    # insertion positions, uniform in [0, F] of the pair's segment. Within a segment the sorted positions go to the
    # pairs in decreasing index order (the reference inserts its first pair at the largest position).
    position = rng.integers(0, filler_len[rows[:, None], pair_segment] + 1)  # [B, N]
    pair_order = np.argsort(pair_segment * N + (N - 1 - np.arange(N)), axis=1)  # [B, N] t-th pair of the context
    sort_key = np.sort(pair_segment * (max_len + 1) + position, axis=1)  # positions grouped by segment, ascending
    sorted_segment, sorted_position = sort_key // (max_len + 1), sort_key % (max_len + 1)
    first_in_segment = np.cumsum(pairs_in_segment, axis=1) - pairs_in_segment  # [B, S] context rank of 1st pair
    rank_in_segment = np.arange(N) - np.take_along_axis(first_in_segment, sorted_segment, axis=1)
    start_in_context_order = (np.take_along_axis(segment_start, sorted_segment, axis=1) + sorted_position
                              + rank_in_segment * P)  # [B, N] start of the t-th pair of the context
    pair_start = np.empty_like(start_in_context_order)  # [B, N] start of pair j
    np.put_along_axis(pair_start, pair_order, start_in_context_order, axis=1)

    L = int(context_len.max())
    if max_len > 0:  # filler: every free slot gets an independent uniform symbol (the order of iid draws is moot)
        context = alphabet[rng.integers(0, A, size=(B, L), dtype=np.int32)]
        context[np.arange(L) >= context_len[:, None]] = 0  # padding, dropped by the str conversion
    else:
        context = np.zeros((B, L), dtype=np.uint32)
    # write the pairs `!KEY:VALUE!` one character column at a time (flat indexing: fast, small temporaries)
    flat_context = context.reshape(-1)
    flat_start = (rows[:, None] * L + pair_start).reshape(-1)  # [B*N]
    for i in range(P):
        if i == 0 or i == P - 1:
            flat_context[flat_start + i] = ord("!")
        elif i <= k:
            flat_context[flat_start + i] = alphabet[keys[:, :, i - 1]].reshape(-1)
        elif i == k + 1:
            flat_context[flat_start + i] = ord(":")
        else:
            flat_context[flat_start + i] = alphabet[values[:, :, i - k - 2]].reshape(-1)
    context[rows[:, None], segment_end - 1] = ord("|")
    context = _chars_to_strings(context)

    if N == 0:  # copy task: reproduce the context
        query = np.full(B, "?!:", dtype="<U3")
        target = context.copy()
    else:
        queried = rng.integers(0, N, size=B)
        query_codes = np.empty((B, k + 3), dtype=np.uint32)
        query_codes[:, :2] = [ord("?"), ord("!")]
        query_codes[:, 2:2 + k] = alphabet[keys[rows, queried]]
        query_codes[:, -1] = ord(":")
        target_codes = np.empty((B, v + 2), dtype=np.uint32)
        target_codes[:, :v] = alphabet[values[rows, queried]]
        target_codes[:, v:] = [ord("!"), ord("|")]
        query, target = _chars_to_strings(query_codes), _chars_to_strings(target_codes)
    return dict(context=context, query=query, target=target)


def _check_count(n, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")


def _generate_kv_chunks(spec: KVTaskSpec, n: int, seed: int, stream: int):
    """Yields the n samples as dicts of numpy str arrays, CHUNK_SIZE rows at a time (the last one trimmed)."""
    _check_count(n, "n")
    _check_count(seed, "seed")
    for chunk, start in enumerate(range(0, n, CHUNK_SIZE)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, chunk)))
        samples = _generate_chunk(spec, rng, CHUNK_SIZE)  # always whole chunks, so prefixes agree
        yield {column: strings[:n - start] for column, strings in samples.items()}


def generate_kv_samples(spec: KVTaskSpec, n: int, seed: int, stream: int = TRAIN_STREAM) -> dict[str, list[str]]:
    """n samples of `spec` as {'context': [...], 'query': [...], 'target': [...]}, a pure function of the arguments.

    Sample i depends only on (spec, seed, stream, i): the first m of n samples equal generate_kv_samples(spec, m, ...).
    """
    columns = {"context": [], "query": [], "target": []}
    for samples in _generate_kv_chunks(spec, n, seed, stream):
        for column, strings in samples.items():
            columns[column].extend(strings.tolist())
    return columns


def extract_kv_pairs(context: str) -> list[tuple[str, str]]:
    """The (key, value) pairs written in a context, in the order they appear (filler never contains `!`)."""
    return re.findall(r"!([^!?:|]+):([^!?:|]*)!", context)


# ----------------------------------------------------------------------------------------------------------------------
# Datasets

def build_kv_dataset_dict(spec: KVTaskSpec, n_train: int = 1_000_000, n_valid: int = 5_000, seed: int = 0,
                          n_test: int = 0):
    """datasets.DatasetDict({'train', 'valid'[, 'test']}) with string columns context, query, target.

    train is stream 0 of `seed`, valid stream 1, test stream 2 (each independent of the others and of their sizes):
    valid is for checkpoint selection, test (n_test > 0) for the reported numbers only.
    """
    for n, what in ((n_train, "n_train"), (n_valid, "n_valid")):
        _check_count(n, what)
        if n == 0:
            raise ValueError(f"{what} must be >= 1")
    _check_count(n_test, "n_test")
    splits = {}
    wanted = [("train", n_train, TRAIN_STREAM), ("valid", n_valid, VALID_STREAM), ("test", n_test, TEST_STREAM)]
    for split, n, stream in wanted[:3 if n_test else 2]:
        columns = {"context": [], "query": [], "target": []}
        for samples in _generate_kv_chunks(spec, n, seed, stream):  # numpy -> Arrow, no Python str objects
            for column, strings in samples.items():
                columns[column].append(pa.array(strings, type=pa.string()))
        table = pa.table({column: pa.chunked_array(arrays, type=pa.string()) for column, arrays in columns.items()})
        # the content is a pure function of these arguments: naming them spares datasets from hashing (a copy of)
        # the whole table for its fingerprint
        identity = json.dumps([asdict(spec), n, seed, stream, CHUNK_SIZE, np.__version__])
        fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
        splits[split] = datasets.Dataset(datasets.table.InMemoryTable(table), split=datasets.NamedSplit(split),
                                         fingerprint=fingerprint)
    return datasets.DatasetDict(splits)


def save_kv_dataset(dataset_dict, out_dir: Union[str, Path], spec: KVTaskSpec, seed: int,
                    overwrite: bool = False) -> Path:
    """save_to_disk into a temporary sibling folder, then move it to out_dir; also writes kv_task.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: pass --overwrite (overwrite=True) or choose another --out")
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")  # one per process: two builders never mix
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    dataset_dict.save_to_disk(str(tmp_dir))
    meta = dict(name=spec.dataset_name(len(dataset_dict["train"])), spec=asdict(spec),
                n_train=len(dataset_dict["train"]), n_valid=len(dataset_dict["valid"]),
                n_test=len(dataset_dict["test"]) if "test" in dataset_dict else 0, seed=seed,
                chunk_size=CHUNK_SIZE, numpy=np.__version__)
    (tmp_dir / "kv_task.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        if not overwrite:  # another process finished the same dataset meanwhile: keep the one already there
            shutil.rmtree(tmp_dir)
            return out_dir
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return out_dir


def build_named_dataset(path: Path) -> bool:
    """Generate a missing KV dataset whose folder name follows the KV naming scheme. False if the name does not.

    Train size from the name's suffix (`_1M`, `_20K`, none = 1M), 5000 valid and 2000 test samples (fewer for a
    smaller train size: as many as train), seed 0 (as `python kv_dataset_utils.py --name NAME --out PATH --n_test ...`
    would build it). Under several processes the main one builds it while the others wait; a run that finds another
    one's copy finished first keeps that one. The KV run scripts pass this to the trainer's load_splits.
    """
    path = Path(path)
    try:
        spec = parse_dataset_name(path.name)
        n_train = dataset_size(path.name) or 1_000_000
    except ValueError:
        return False
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not path.exists():
            n_valid, n_test, seed = 5_000, min(DEFAULT_N_TEST, n_train), 0
            logging.getLogger("gradmem").info(
                "%s does not exist: generating it (%s: %d train, %d valid, %d test samples, seed %d)", path,
                spec.task_name, n_train, n_valid, n_test, seed)
            splits = build_kv_dataset_dict(spec, n_train=n_train, n_valid=n_valid, seed=seed, n_test=n_test)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                save_kv_dataset(splits, path, spec, seed)
            except FileExistsError:  # another run built the same dataset (same name and seed) meanwhile
                pass
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")  # ids 0-3
KV_TOKENIZER_DIR = {v: REPO_ROOT / "tokenizers" / f"kv_alphabet_{v}" for v in KV_ALPHABET_SIZES}


def tokenizer_chars(vocab_size: int) -> str:
    """Characters with ids 4, 5, ...: the base 62, then `!?:|`, then the extras."""
    return BASE_KV_ALPHABET + STRUCT_CHARS + kv_alphabet(vocab_size)[len(BASE_KV_ALPHABET):]


def _build_backend_tokenizer(vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(tokenizer_chars(vocab_size)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one piece per code point
    tokenizer.decoder = decoders.Fuse()  # decode without spaces
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def create_tokenizer(vocab_size: int = 62):
    """Character tokenizer of the `vocab_size` alphabet (vocabulary vocab_size + 8) as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_build_backend_tokenizer(vocab_size), pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", padding_side="right",
                                   truncation_side="right", clean_up_tokenization_spaces=False)


def _tokenizer_config() -> dict:
    return dict(tokenizer_class="PreTrainedTokenizerFast", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                unk_token="[UNK]", add_bos_token=False, add_eos_token=False, padding_side="right",
                truncation_side="right", clean_up_tokenization_spaces=False, model_max_length=1 << 20)


def save_kv_tokenizer(vocab_size: int, out_dir: Union[str, Path, None] = None) -> Path:
    """Writes tokenizer.json and tokenizer_config.json (our own serialisation: byte-identical whatever the
    transformers version; a fresh backend, so no padding state leaks into the file)."""
    out_dir = Path(out_dir) if out_dir is not None else KV_TOKENIZER_DIR[vocab_size]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_build_backend_tokenizer(vocab_size).to_str(pretty=True) + "\n",
                                            encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    return out_dir


def load_kv_tokenizer(vocab_size_or_path: Union[int, str, Path] = 62):
    """Loads a saved KV tokenizer: 62 / 512 (the committed tokenizers/ folders) or a folder path."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size_or_path, int):
        _check_vocab_size(vocab_size_or_path)
        path = KV_TOKENIZER_DIR[vocab_size_or_path]
    else:
        path = Path(vocab_size_or_path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: run `python kv_dataset_utils.py --save_tokenizers`")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def check_tokenizer_alphabet(tokenizer, vocab_size: int) -> None:
    """Every alphabet character is one token with its reference id and decodes back (the reference's self-check)."""
    chars = tokenizer_chars(vocab_size)
    ids = tokenizer(chars, add_special_tokens=True)["input_ids"]
    if ids != list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(chars))):
        raise ValueError("tokenizer ids do not match the KV alphabet (char i must be one token with id i + 4)")
    if tokenizer.decode(ids) != chars:
        raise ValueError("tokenizer does not decode the KV alphabet back to itself")


# ----------------------------------------------------------------------------------------------------------------------
# CLI

SPEC_FIELDS = [f.name for f in fields(KVTaskSpec)]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build a KV-retrieval DatasetDict (train/valid/test) or save the tokenizers.")
    p.add_argument("--name", help=f"dataset name: {NAME_SCHEME}")
    p.add_argument("--out", help="output folder (default: data/<dataset name>)")
    p.add_argument("--n_train", type=int, help="train samples (default: the name's size suffix, else 1,000,000)")
    p.add_argument("--n_valid", type=int, default=5_000, help="valid samples, for checkpoint selection (default: 5000)")
    p.add_argument("--n_test", type=int, default=DEFAULT_N_TEST,
                   help=f"test samples, for reported numbers only; 0: no test split (default: {DEFAULT_N_TEST})")
    p.add_argument("--seed", type=int, default=0, help="random seed; train and valid use separate streams (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--skip_existing", action="store_true", help="do nothing if the output folder exists")
    p.add_argument("--show", type=int, default=0, metavar="K", help="print the first K train samples")
    for f in ("num_kv_pairs", "k_length", "v_length", "n_segments", "min_segment_len", "max_segment_len",
              "vocab_size"):
        p.add_argument(f"--{f}", type=int, help="overrides the name's value")
    p.add_argument("--noise", type=float, help="overrides the name's value (fraction of filler, see module doc)")
    p.add_argument("--save_tokenizers", action="store_true",
                   help="write tokenizers/kv_alphabet_{62,512}/ (or --tokenizers_dir) and exit")
    p.add_argument("--tokenizers_dir", help="parent folder for --save_tokenizers (default: the repo's tokenizers/)")
    return p


def main(argv=None) -> None:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.save_tokenizers:
        if args.name:
            parser.error("--save_tokenizers builds no dataset: drop --name")
        for vocab_size in KV_ALPHABET_SIZES:
            out = (Path(args.tokenizers_dir) / f"kv_alphabet_{vocab_size}") if args.tokenizers_dir else None
            out = save_kv_tokenizer(vocab_size, out)
            check_tokenizer_alphabet(load_kv_tokenizer(out), vocab_size)
            print(f"saved {out}")
        return
    if args.tokenizers_dir:
        parser.error("--tokenizers_dir only goes with --save_tokenizers")
    if not args.name:
        parser.error("--name is required (e.g. --name N16-K2V2-V62_1M)")

    # everything is checked before any work
    try:
        spec = parse_dataset_name(args.name)
        overrides = {f: getattr(args, f) for f in SPEC_FIELDS if getattr(args, f) is not None}
        spec = replace(spec, **overrides)
        n_train = args.n_train if args.n_train is not None else (dataset_size(args.name) or 1_000_000)
        for n, flag in ((n_train, "--n_train"), (args.n_valid, "--n_valid")):
            if n < 1:
                raise ValueError(f"{flag} must be >= 1, got {n}")
        if args.n_test < 0:
            raise ValueError(f"--n_test must be >= 0, got {args.n_test}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
    except ValueError as e:
        parser.error(str(e))
    out_dir = Path(args.out) if args.out else REPO_ROOT / "data" / spec.dataset_name(n_train)
    if args.overwrite and args.skip_existing:
        parser.error("--overwrite and --skip_existing exclude each other")
    if out_dir.exists() and args.skip_existing:
        print(f"{out_dir} exists, skipped")
        return
    if out_dir.exists() and not args.overwrite:
        parser.error(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")

    print(f"building {spec.dataset_name(n_train)}: {spec}, n_train={n_train}, n_valid={args.n_valid}, "
          f"n_test={args.n_test}, seed={args.seed}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    dataset_dict = build_kv_dataset_dict(spec, n_train, args.n_valid, args.seed, n_test=args.n_test)
    t1, c1 = time.perf_counter(), time.process_time()
    save_kv_dataset(dataset_dict, out_dir, spec, args.seed, overwrite=args.overwrite)
    t2, c2 = time.perf_counter(), time.process_time()
    print(f"generated in {t1 - t0:.1f} s ({c1 - c0:.1f} s CPU), saved to {out_dir} in {t2 - t1:.1f} s "
          f"({c2 - c1:.1f} s CPU)")
    print(dataset_dict)
    for row in dataset_dict["train"].select(range(min(args.show, n_train))):
        print(f"context {row['context']}\nquery   {row['query']}\ntarget  {row['target']}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
