"""Exact match of generated answers for memory models (GradMem, RMT): WRITE the context, then decode greedily.

The trainer's exact match is teacher-forced (each answer token is predicted from the true earlier ones). The numbers a
paper reports are the answers the model generates: here each answer token is predicted from the model's own earlier
tokens, from `[memory; query]` alone. A sample counts as correct when every answer token (labels != -100, except
the `ignore_ids`, e.g. the KV target's structural `!` and `|`) is generated right.

Any model with `write(context_ids) -> (memory, ...)` and `read(memory, ids) -> logits` (logits[:, j] predicts token j)
works; batches are the memory-model collator's {context_input_ids, query_input_ids (query + answer), labels}.
"""
from typing import Callable, Iterable, Optional, Sequence

import torch

IGNORE_INDEX = -100


@torch.no_grad()
def generate_answer_tokens(model, memory: torch.Tensor, query_input_ids: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of the labelled span of each row: [B, Q] ids where every labelled position holds the token
    generated there (fed back for the next position) and every other position holds the input id."""
    ids = query_input_ids.clone()
    labelled = labels != IGNORE_INDEX  # [B, Q]
    if not labelled.any():
        return ids
    first = labelled.float().argmax(dim=1)  # [B] first answer position (rows without one: 0, never written)
    n_answer = labelled.sum(dim=1)  # [B]
    B = ids.shape[0]
    rows = torch.arange(B, device=ids.device)
    for t in range(int(n_answer.max())):
        position = (first + t).clamp_max(ids.shape[1] - 1)  # [B]
        logits = model.read(memory, ids[:, : int(position.max()) + 1])  # [B, L, V]
        token = logits[rows, position].argmax(dim=-1)  # [B]
        write = (t < n_answer) & labelled[rows, position]
        ids[rows, position] = torch.where(write, token, ids[rows, position])
    return ids


@torch.no_grad()
def generated_exact_match(model, batches: Iterable[dict], ignore_ids: Sequence[int] = (),
                          on_batch: Optional[Callable] = None) -> dict:
    """{'generated_exact_match', 'generated_token_accuracy', 'generated_samples'} over the batches (on the model's
    device), counting samples with at least one scored answer token. `on_batch(batch, generated ids, row is right)` sees
    each batch's generated answers (evaluate_model.py writes them out)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ignore = torch.tensor(list(ignore_ids), dtype=torch.long, device=device)
    correct = total = tokens_right = tokens = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            memory = model.write(batch["context_input_ids"])[0]
            generated = generate_answer_tokens(model, memory, batch["query_input_ids"], batch["labels"])
            labels = batch["labels"]
            scored = (labels != IGNORE_INDEX) & ~torch.isin(labels, ignore)
            right = (generated == labels) | ~scored
            if on_batch is not None:
                on_batch(batch, generated, right.all(dim=1))
            has = scored.any(dim=1)
            correct += int((right.all(dim=1) & has).sum())
            total += int(has.sum())
            tokens_right += int(((generated == labels) & scored).sum())
            tokens += int(scored.sum())
    finally:
        model.train(was_training)
    return {"generated_exact_match": correct / total if total else float("nan"),
            "generated_token_accuracy": tokens_right / tokens if tokens else float("nan"),
            "generated_samples": total}


def make_generated_answer_metrics(collator: Callable, ignore_ids: Sequence[int] = (),
                                  batch_size: int = 256) -> Callable:
    """(model, split) -> generated_exact_match over the split, collated with the run's collator."""
    def metrics(model, split) -> dict:
        def batches():
            for start in range(0, len(split), batch_size):
                rows = split.select(range(start, min(start + batch_size, len(split))))
                yield collator([dict(zip(rows.column_names, values)) for values in zip(*rows.to_dict().values())])
        return generated_exact_match(model, batches(), ignore_ids)

    return metrics
