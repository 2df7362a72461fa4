"""A run's data: load_splits (a saved DatasetDict with checks) and the checks of data against tokenizer and model.

Datasets have the columns context, query, target. A task whose data can be generated from the folder name (the KV
run scripts) passes `build_missing`, which builds a missing folder; the trainer itself knows no task.
"""
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("gradmem")


def _string_column(split, column: str):
    """The Arrow ChunkedArray of a string column over the split's rows (no Python strings are made)."""
    return split.with_format("arrow")[:][column]


def _byte_lengths(split, column: str) -> np.ndarray:
    """UTF-8 byte length of every row of a string column (an upper bound of its characters and tokens)."""
    return np.concatenate([np.diff(_chunk_offsets(chunk)) for chunk in _string_column(split, column).chunks]
                          or [np.zeros(0, dtype=np.int64)])


def _chunk_offsets(chunk) -> np.ndarray:
    import pyarrow as pa

    dtype = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    return np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)


def column_characters(split, column: str) -> set:
    """The characters of a string column over ALL rows, read from the Arrow data buffer: a byte table (ASCII
    data: about a second for a million rows of a hundred characters) or one decode of the buffer (other text)."""
    chars = set()
    for chunk in _string_column(split, column).chunks:
        if len(chunk) == 0 or chunk.buffers()[2] is None:
            continue
        offsets = _chunk_offsets(chunk)
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
        seen = np.zeros(256, dtype=bool)
        seen[data] = True
        present = np.nonzero(seen)[0]
        if present.size and present[-1] >= 128:
            chars |= set(data.tobytes().decode("utf-8"))
        else:
            chars |= {chr(b) for b in present}
    return chars


def check_tokenizer_covers(tokenizer: PreTrainedTokenizerBase, split) -> None:
    """Every character of every row is known to the tokenizer (e.g. V512 data with the 62-symbol tokenizer is an
    error). Tokenizers without a real unknown token (byte-level: unk = eos or pad) cannot fail and are skipped."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        return
    for column in ("context", "query", "target"):
        if column not in split.column_names:
            continue
        chars = sorted(column_characters(split, column))
        ids = tokenizer(chars, add_special_tokens=False)["input_ids"] if chars else []
        bad = [ch for ch, ch_ids in zip(chars, ids) if unk in ch_ids]
        if bad:
            raise ValueError(f"the tokenizer does not know the characters {bad[:10]} of the data ({column!r}); "
                             "use the matching tokenizer (e.g. --tokenizer_path ./tokenizers/kv_alphabet_512/)")


def check_targets(splits) -> None:
    """A row with an empty target has nothing to learn or score: all rows of a split empty is an error, some of
    them a warning with the count (metrics skip such rows)."""
    for name, split in splits.items():
        if "target" not in split.column_names or len(split) == 0:
            continue
        empty = int((_byte_lengths(split, "target") == 0).sum())
        if empty == len(split):
            raise ValueError(f"every target of split {name!r} is empty: there is nothing to train on or to score")
        if empty:
            logger.warning("%d of %d rows of split %r have an empty target: they are neither trained on nor scored",
                           empty, len(split), name)


def check_data(tokenizer: PreTrainedTokenizerBase, splits) -> None:
    """The data checks of the KV-style run scripts: every character known to the tokenizer, targets not empty."""
    for split in splits.values():
        check_tokenizer_covers(tokenizer, split)
    check_targets(splits)


def longest_tokens(tokenizer: PreTrainedTokenizerBase, split, columns: Sequence[str], limit: int) -> int:
    """The most tokens (special tokens included) of the columns joined, over the rows that may exceed `limit`; 0 when
    none can. Vectorised: UTF-8 byte lengths bound the token counts, and only the rows over the bound are tokenised."""
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    suspects = np.nonzero(sum(_byte_lengths(split, c) for c in columns) + n_special > limit)[0]
    if suspects.size == 0:
        return 0
    rows = split.select(suspects)
    texts = ["".join(parts) for parts in zip(*(list(rows[c]) for c in columns))]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])


def check_memory_inputs_fit(tokenizer: PreTrainedTokenizerBase, splits, positions: Optional[int], n_prefix: int,
                            max_context_length: Optional[int] = None) -> None:
    """WRITE reads [n_prefix memory slots; context] and READ [n_prefix; query + target]: both must fit the
    backbone's positions (beyond them a model fails mid-training or trains on positions it cannot embed)."""
    if positions is None:
        return
    room = positions - n_prefix
    for name, split in splits.items():
        for columns, cut in ((("context",), max_context_length), (("query", "target"), None)):
            if cut is not None and cut <= room:
                continue  # the collator keeps the first `cut` tokens
            longest = longest_tokens(tokenizer, split, columns, room)
            if longest > room:
                fix = f"set --max_context_length {room} (keeps the first tokens) or" if columns == ("context",) \
                    else "use"
                raise ValueError(f"split {name!r}: {'+'.join(columns)} of up to {longest} tokens + {n_prefix} memory "
                                 f"positions exceed the backbone's {positions} positions; {fix} a larger "
                                 "--max_position_embeddings")


def load_splits(data_path: str, required: Sequence[str] = ("train", "valid"),
                columns: Sequence[str] = ("context", "query", "target"),
                build_missing: Optional[Callable[[Path], bool]] = None):
    """`datasets.load_from_disk` with checks: required splits present and non-empty, required columns present.

    build_missing(path): builds a missing folder from its name, False where the name names no dataset it can build
    (the KV scripts pass kv_dataset_utils.build_named_dataset: e.g. N8-K2V2-V62_1M is generated on the spot).
    """
    import datasets

    path = Path(data_path)
    if not path.exists() and not (build_missing is not None and build_missing(path)):
        raise FileNotFoundError(
            f"dataset folder {data_path} does not exist and its name is not a KV dataset name (like N8-K2V2-V62_1M). "
            "Build KV data with `python kv_dataset_utils.py --name N8-K2V2-V62_1M --out <folder>` (see --help), "
            "or name the folder after a KV dataset to have it generated"
        )
    for name in required:  # datasets cannot even load a saved empty split: check its file list first
        state_file = path / name / "state.json"
        if state_file.is_file() and json.loads(state_file.read_text()).get("_data_files") == []:
            raise ValueError(f"split {name!r} of {data_path} is empty")
    splits = datasets.load_from_disk(str(path))
    if not isinstance(splits, datasets.DatasetDict):
        raise ValueError(f"{data_path} holds a single Dataset; expected a DatasetDict with splits {list(required)}")
    for name in required:
        if name not in splits:
            raise ValueError(f"{data_path} has no {name!r} split (splits: {list(splits)})")
    for name, split in splits.items():
        if name in required and len(split) == 0:
            raise ValueError(f"split {name!r} of {data_path} is empty")
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise ValueError(f"split {name!r} of {data_path} lacks columns {missing} (has {split.column_names})")
    return splits
