"""Batches and scores: the collators of memory models and plain causal LMs, and the metrics of their predictions.

Memory models (GradMem, RMT) return logits aligned with the labels (modeling_utils.MemoryModelOutput); a plain
causal LM's logits are shifted by reduce_logits_to_predictions, so one compute_metrics serves every model.
"""
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def pad_right(sequences: list, pad_value: int, pad_to_multiple_of: Optional[int] = 8) -> torch.Tensor:
    """[B, L] right-padded tensor, L = longest rounded up to a multiple (at least 1)."""
    length = max(1, max(len(s) for s in sequences))
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def encode_with_target_labels(
    tokenizer: PreTrainedTokenizerBase,
    prefixes: list,
    targets: list,
    max_length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = 8,
) -> dict:
    """Tokenise `prefix + target` strings; label exactly the tokens whose characters overlap the target span.

    A token is a target token when its character span (st, en) intersects [len(prefix), len(prefix)+len(target)).
    Special tokens (empty spans) and pads are never labels. With `max_length`, the START of the sequence is dropped
    (the target sits at the end). Returns input_ids [B, L], attention_mask [B, L], labels [B, L] (= ids on target
    tokens, -100 elsewhere; aligned with input_ids, not shifted).
    """
    texts = [p + t for p, t in zip(prefixes, targets)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    all_ids, all_labels = [], []
    for ids, offsets, prefix, target in zip(enc["input_ids"], enc["offset_mapping"], prefixes, targets):
        t_start, t_end = len(prefix), len(prefix) + len(target)
        labels = [tok if (st < t_end and en > t_start and en > st) else IGNORE_INDEX
                  for tok, (st, en) in zip(ids, offsets)]
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[-max_length:], labels[-max_length:]
        all_ids.append(ids)
        all_labels.append(labels)
    input_ids = pad_right(all_ids, tokenizer.pad_token_id, pad_to_multiple_of)
    attention_mask = pad_right([[1] * len(s) for s in all_ids], 0, pad_to_multiple_of)
    labels = pad_right(all_labels, IGNORE_INDEX, pad_to_multiple_of)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MemoryModelCollator:
    """Examples {context, query, target} -> {context_input_ids [B,S], query_input_ids [B,Q], labels [B,Q]}.

    Memory models (GradMem, RMT) WRITE the context and READ `query + target`; labels are the target tokens of the
    query sequence, aligned with query_input_ids (no shift). Right padding to a multiple of `pad_to_multiple_of`.
    `max_context_length` keeps the FIRST tokens of the context (as the reference did for memory models).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_context_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.max_context_length = max_context_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list) -> dict:
        context_ids = self.tokenizer([ex["context"] for ex in examples], add_special_tokens=True)["input_ids"]
        if self.max_context_length is not None:
            context_ids = [ids[: self.max_context_length] for ids in context_ids]
        query = encode_with_target_labels(
            self.tokenizer, [ex["query"] for ex in examples], [ex["target"] for ex in examples],
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return {
            "context_input_ids": pad_right(context_ids, self.tokenizer.pad_token_id, self.pad_to_multiple_of),
            "query_input_ids": query["input_ids"],
            "labels": query["labels"],
        }


class CausalLMCollator:
    """Full-context baseline: `context + query + target` -> {input_ids, attention_mask, labels} (all [B, T]).

    Labels are the target tokens, aligned with input_ids (HF causal LMs shift internally). `max_input_length`
    drops the START of the sequence (the beginning of the context), so query and target are always kept.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_input_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list) -> dict:
        return encode_with_target_labels(
            self.tokenizer, [ex["context"] + ex["query"] for ex in examples], [ex["target"] for ex in examples],
            max_length=self.max_input_length, pad_to_multiple_of=self.pad_to_multiple_of,
        )


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

def reduce_logits_to_predictions(logits: Any, labels: torch.Tensor, next_token_logits: bool = False) -> Any:
    """`preprocess_logits_for_metrics`: argmax on the device; keeps the model's stats dict if it returned one.

    Memory models return (logits [B,Q,V], memory, stats) with logits[:, j] predicting label j. A plain causal LM's
    logits[:, t] predicts token t+1 (`next_token_logits=True`): predictions are shifted right by one so that they
    line up with the labels too; compute_metrics then never needs to know which kind of model it evaluates.
    """
    stats = None
    if isinstance(logits, (tuple, list)):
        stats = next((x for x in logits if isinstance(x, dict)), None)
        logits = logits[0]
    predictions = logits.argmax(dim=-1)  # [B, T]
    if next_token_logits:
        first = torch.full_like(predictions[:, :1], IGNORE_INDEX)
        predictions = torch.cat([first, predictions[:, :-1]], dim=1)
    return (predictions, stats) if stats else predictions


def reduce_stats(stats: dict) -> dict:
    """Per-batch stat values -> one number each: max of *_max, min of *_min, mean of the rest."""
    out = {}
    for name, values in stats.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            continue
        if name.endswith("_max"):
            out[name] = float(values.max())
        elif name.endswith("_min"):
            out[name] = float(values.min())
        else:
            out[name] = float(values.mean())
    return out


def single_token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str], what: str = "ignore token") -> list:
    """The ids of tokens that must each be one token of the tokenizer (e.g. the KV target's `!` and `|`); `what`
    names them in the error."""
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{what} {token!r} is not a single token of the tokenizer")
        ids.append(token_id)
    return ids


def make_compute_metrics(tokenizer: PreTrainedTokenizerBase, ignore_tokens: Sequence[str] = ("!", "|")) -> Callable:
    """compute_metrics for predictions already aligned with labels (see reduce_logits_to_predictions).

    token_accuracy: correct / all labelled tokens of the eval set (token-weighted).
    exact_match:    fraction of samples (with at least one labelled token) whose labelled tokens are all correct.
    Label tokens in `ignore_tokens` (the KV target's structural `!` and `|`) count for neither. The mean (max/min
    for *_max/*_min) of every stat the model returned is added.
    """
    ignore_ids = np.asarray(single_token_ids(tokenizer, ignore_tokens), dtype=np.int64)

    def compute_metrics(eval_pred) -> dict:
        predictions, stats = eval_pred.predictions, None
        if isinstance(predictions, (tuple, list)):
            predictions, stats = predictions[0], (predictions[1] if len(predictions) > 1 else None)
        predictions = np.asarray(predictions)
        labels = np.asarray(eval_pred.label_ids)
        mask = (labels != IGNORE_INDEX) & ~np.isin(labels, ignore_ids)  # [N, T]
        correct = (predictions == labels) & mask
        n_tokens = mask.sum()
        has_target = mask.any(axis=1)
        sample_correct = ((predictions == labels) | ~mask).all(axis=1)
        metrics = {
            "token_accuracy": float(correct.sum() / n_tokens) if n_tokens else float("nan"),
            "exact_match": float(sample_correct[has_target].mean()) if has_target.any() else float("nan"),
        }
        if isinstance(stats, dict):
            metrics.update(reduce_stats(stats))
        return metrics

    return compute_metrics

