"""Exact match of generated answers: memory models (GradMem, RMT) WRITE the context, then decode greedily from
`[memory; query]`; a plain causal LM (the full-context baseline) decodes greedily after `context + query`.

The trainer's exact match is teacher-forced (each answer token is predicted from the true earlier ones). The numbers a
paper reports are the answers the model generates: here each answer token is predicted from the model's own earlier
tokens. A sample counts as correct when every answer token (labels != -100, except the `ignore_ids`, e.g. the KV
target's structural `!` and `|`) is generated right.

Memory models: any model with `write(context_ids) -> (memory, ...)` and `read(memory, ids) -> logits` (logits[:, j]
predicts token j), batches of the memory-model collator {context_input_ids, query_input_ids (query + answer), labels}.
Plain causal LMs: `model(input_ids=ids).logits` (logits[:, t] predicts token t + 1), batches of the causal-LM collator
{input_ids (context + query + answer), attention_mask, labels}. The batch's keys say which.
AnswerSamplesCallback (--log_samples) logs a few generated answers at every evaluation of a run and keeps them in the
run folder's samples.jsonl.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from transformers import TrainerCallback

IGNORE_INDEX = -100
SAMPLES_FILE = "samples.jsonl"  # in the run folder: the answer samples of every evaluation

logger = logging.getLogger("gradmem")


@torch.no_grad()
def generate_answer_tokens(model, memory: torch.Tensor, query_input_ids: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of the labelled span of each row: [B, Q] ids where every labelled position holds the token
    generated there (fed back for the next position) and every other position holds the input id."""
    def predict(ids, position):  # READ's logits[:, j] predict token j
        logits = model.read(memory, ids[:, : int(position.max()) + 1])
        return logits[torch.arange(ids.shape[0], device=ids.device), position]

    return _greedy_fill(predict, query_input_ids, labels)


@torch.no_grad()
def generate_answer_tokens_causal(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same for a plain causal LM reading `context + query + answer` ([B, T], right padded; labels aligned with
    the ids): each answer token is predicted from the sequence before it, generated answer tokens included. Right
    padding needs no attention mask: under causal attention (or a recurrence) no real token sees a pad."""
    if bool(((labels != IGNORE_INDEX)[:, 0]).any()):
        raise ValueError("a causal LM cannot generate an answer token at position 0 (nothing comes before it)")

    def predict(ids, position):  # logits[:, t] predict token t + 1
        logits = model(input_ids=ids[:, : int(position.max())]).logits
        return logits[torch.arange(ids.shape[0], device=ids.device), (position - 1).clamp_min(0)]

    return _greedy_fill(predict, input_ids, labels)


def _greedy_fill(predict: Callable, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """input_ids with each row's labelled positions filled greedily, left to right; `predict(ids, position)` gives the
    [B, V] logits of the token at `position` [B] of each row."""
    ids = input_ids.clone()
    labelled = labels != IGNORE_INDEX  # [B, Q]
    if not labelled.any():
        return ids
    first = labelled.float().argmax(dim=1)  # [B] first answer position (rows without one: 0, never written)
    n_answer = labelled.sum(dim=1)  # [B]
    rows = torch.arange(ids.shape[0], device=ids.device)
    for t in range(int(n_answer.max())):
        position = (first + t).clamp_max(ids.shape[1] - 1)  # [B]
        token = predict(ids, position).argmax(dim=-1)  # [B]
        write = (t < n_answer) & labelled[rows, position]
        ids[rows, position] = torch.where(write, token, ids[rows, position])
    return ids


def generated_answer_ids(model, batch: dict) -> torch.Tensor:
    """The batch's ids with the answers generated greedily: a memory model's batch (context_input_ids) is written,
    then read; a causal LM's batch (input_ids) is read as one sequence."""
    if "context_input_ids" in batch:
        memory = model.write(batch["context_input_ids"])[0]
        return generate_answer_tokens(model, memory, batch["query_input_ids"], batch["labels"])
    return generate_answer_tokens_causal(model, batch["input_ids"], batch["labels"])


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
            generated = generated_answer_ids(model, batch)
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


def keep_answer_texts(tokenizer, into: list) -> Callable:
    """An `on_batch` for generated_exact_match that appends (generated answer text, row is right) of each row to
    `into`."""
    def keep(batch, generated, right):
        for ids, labels, correct in zip(generated.cpu(), batch["labels"].cpu(), right.tolist()):
            into.append((tokenizer.decode(ids[labels != IGNORE_INDEX]), correct))

    return keep


@dataclass
class SampleLogArgs:
    """Answer samples at each evaluation (memory-model run scripts)."""

    log_samples: int = field(default=3, metadata={
        "help": f"at each evaluation, log the query, target and generated answer of the first N evaluated samples "
                f"and append them to {SAMPLES_FILE} in the run folder (0: none)"})

    def validate(self) -> None:
        if self.log_samples < 0:
            raise ValueError(f"--log_samples must be >= 0, got {self.log_samples}")


class AnswerSamplesCallback(TrainerCallback):
    """At each evaluation: the first `n_samples` rows of the evaluated split, their answers generated greedily after
    WRITE, logged and appended to <run folder>/samples.jsonl as {step, split, query, target, answer, correct} (split:
    the evaluation's metric prefix, e.g. eval, test). The same rows every time, so a run shows them being learnt."""

    def __init__(self, collator: Callable, tokenizer, n_samples: int, ignore_ids: Sequence[int] = ()):
        self.collator, self.tokenizer, self.n_samples, self.ignore_ids = collator, tokenizer, n_samples, ignore_ids

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = eval_dataloader.dataset
        rows = [rows[i] for i in range(min(self.n_samples, len(rows)))]
        split = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        answers = []
        generated_exact_match(getattr(model, "module", model), [self.collator(rows)], self.ignore_ids,
                              keep_answer_texts(self.tokenizer, answers))
        records = [{"step": state.global_step, "split": split, "query": row["query"], "target": row["target"],
                    "answer": answer, "correct": correct} for row, (answer, correct) in zip(rows, answers)]
        with open(Path(args.output_dir) / SAMPLES_FILE, "a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        logger.info("step %d %s samples (query | target | generated answer):\n%s", state.global_step, split, "\n".join(
            f"  {r['query']!r} | {r['target']!r} | {r['answer']!r}{'' if r['correct'] else '  (wrong)'}" for r in records))


def answer_sample_callbacks(args: SampleLogArgs, collator: Callable, tokenizer,
                            ignore_ids: Sequence[int] = ()) -> list:
    """[AnswerSamplesCallback] for run_experiment's extra_callbacks, or [] with --log_samples 0."""
    return [AnswerSamplesCallback(collator, tokenizer, args.log_samples, ignore_ids)] if args.log_samples else []
