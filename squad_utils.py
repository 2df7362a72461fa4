"""SQuAD v1.1 for memory models: loading, the three WRITE/READ layouts, and the official EM/F1 metric.

Data. SQuAD v1.1 comes either from the hub (`squad`, splits train/validation) or from the official JSON files
(`train-v1.1.json`, `dev-v1.1.json`: {"version": "1.1", "data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}). Either way every question becomes one
row with `context`, `query`, `target` strings laid out for a memory model (WRITE reads `context`, READ reads
`query + target`), plus `answers` (all gold answer texts, for evaluation) and `id`.

Layouts (the reference's three SQuAD scripts, expressed as strings so one collator serves all):
    c_q   WRITE = context                  READ = question + ' ' + answer
    cq_a  WRITE = context + ' ' + question  READ = 'Answer: ' + answer
    qc_a  WRITE = question + ' ' + context  READ = 'Answer: ' + answer
Training target = the first gold answer (as in the reference); `answers` keeps every gold answer so that the
official metric can take the max over them.

Metric. The official SQuAD v1.1 exact match and F1: answers are normalised (lower case, punctuation removed,
articles a/an/the removed, whitespace collapsed); F1 is the bag-of-tokens overlap; each prediction is scored
against every gold answer and the best score is kept; the dataset score is the mean over questions. Scores are
returned as fractions in [0, 1] (the official script prints them multiplied by 100).

CLI (the save_to_disk form, for run scripts that read context/query/target as they are):
    python squad_utils.py --layout c_q [--squad_json DIR] --output_path ./data/squad_c_q
"""
import collections
import json
import logging
import os
import re
import string
from dataclasses import dataclass, field
from typing import Optional

from datasets import Dataset, DatasetDict, load_from_disk
from transformers import TrainerCallback

from modeling_utils import max_positions

logger = logging.getLogger("gradmem")

LAYOUTS = ("c_q", "cq_a", "qc_a")
ANSWER_PROMPT = "Answer: "
SQUAD_JSON_FILES = {"train": "train-v1.1.json", "valid": "dev-v1.1.json"}
_PUNCTUATION = frozenset(string.punctuation)


# ----------------------------------------------------------------------------------------------------------------
# the official SQuAD v1.1 metric

def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official v1.1 order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(predictions: list[str], gold_answers: list[list[str]]) -> dict:
    """Mean over questions of the max over gold answers: {'squad_exact_match', 'squad_f1'} in [0, 1]."""
    if len(predictions) != len(gold_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(gold_answers)} questions")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    exact, f1 = 0.0, 0.0
    for prediction, golds in zip(predictions, gold_answers):
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"each question needs a non-empty list of gold answers, got {golds!r}")
        exact += max(exact_match_score(prediction, gold) for gold in golds)
        f1 += max(f1_score(prediction, gold) for gold in golds)
    return {"squad_exact_match": exact / len(predictions), "squad_f1": f1 / len(predictions)}


# ----------------------------------------------------------------------------------------------------------------
# layouts

def make_example(context: str, question: str, answers: list[str], layout: str) -> dict:
    """One question as memory-model strings: WRITE reads `context`, READ reads `query + target`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown SQuAD layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    answers = [answer.strip() for answer in answers]
    if len(answers) == 0 or answers[0] == "":
        raise ValueError(f"question {question!r} has no gold answer (SQuAD v1.1 always has one)")
    context, question = context.strip(), question.strip()
    if layout == "c_q":
        example = {"context": context, "query": question + " "}
    elif layout == "cq_a":
        example = {"context": context + " " + question, "query": ANSWER_PROMPT}
    else:  # qc_a
        example = {"context": question + " " + context, "query": ANSWER_PROMPT}
    example["target"] = answers[0]
    example["answers"] = answers
    return example


def _layout_rows(rows: Dataset, layout: str) -> Dataset:
    """Hub-shaped rows (id, context, question, answers={'text': [...]}) -> layout rows."""
    def to_layout(row):
        return {"id": row["id"], **make_example(row["context"], row["question"], row["answers"]["text"], layout)}

    return rows.map(to_layout, remove_columns=rows.column_names, desc=f"SQuAD layout {layout}")


# ----------------------------------------------------------------------------------------------------------------
# loading

def read_squad_v1_json(path: str) -> Dataset:
    """Rows (id, title, context, question, answers={'text','answer_start'}) from an official SQuAD v1.1 JSON file."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e}); expected the official SQuAD v1.1 format") from e
    where = f"{path}: not SQuAD v1.1 shaped"
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{where}: expected a top-level object with a 'data' list of articles")
    version = str(raw.get("version", "1.1"))
    if version != "1.1":
        raise ValueError(f"{where}: version is {version!r}, only '1.1' is supported (SQuAD v2 has unanswerable "
                         "questions that this task does not model)")
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for i, article in enumerate(raw["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{where}: data[{i}] has no 'paragraphs' list")
        for j, paragraph in enumerate(article["paragraphs"]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                    or not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where}: data[{i}].paragraphs[{j}] needs a 'context' string and a 'qas' list")
            for k, qa in enumerate(paragraph["qas"]):
                at = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if qa.get("is_impossible") or "plausible_answers" in qa:
                    raise ValueError(f"{where}: {at} is a SQuAD v2 unanswerable question; use the v1.1 files")
                if not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise ValueError(f"{where}: {at} needs 'id' and a 'question' string")
                answers = qa.get("answers")
                if not isinstance(answers, list) or len(answers) == 0:
                    raise ValueError(f"{where}: {at} needs a non-empty 'answers' list")
                for answer in answers:
                    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) \
                            or not isinstance(answer.get("answer_start"), int):
                        raise ValueError(f"{where}: {at} has an answer without 'text' (str) and "
                                         f"'answer_start' (int): {answer!r}")
                rows["id"].append(str(qa["id"]))
                rows["title"].append(str(article.get("title", "")))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [a["answer_start"] for a in answers]})
    if len(rows["id"]) == 0:
        raise ValueError(f"{where}: it holds no questions")
    return Dataset.from_dict(rows)


def load_named_dataset(name: str, offline_fix: str = ""):
    """--dataset_name: a local save_to_disk folder, else `datasets.load_dataset(name)` (a hub id). A failed hub load
    (no hub access, unknown id) is a ValueError naming the fix: a local copy (or `offline_fix`)."""
    if os.path.isdir(name):
        return load_from_disk(name)
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as error:  # connection, missing dataset, offline mode: the fix is the same
        local = f"./data/{name.split('/')[-1]}"
        raise ValueError(
            f"--dataset_name {name!r} is not a local folder and loading it from the hub failed "
            f"({type(error).__name__}: {error}). Without hub access, save it where the hub is reachable with python -c "
            f"\"import datasets; datasets.load_dataset('{name}').save_to_disk('{local}')\", copy the folder here and "
            f"pass --dataset_name {local}{offline_fix}") from error


def load_squad(layout: str, squad_json: Optional[str] = None, dataset_name: str = "squad") -> DatasetDict:
    """SQuAD v1.1 as a DatasetDict(train, valid) of layout rows (context, query, target, answers, id).

    squad_json: a directory holding the official `train-v1.1.json` and `dev-v1.1.json`; without it the data come
    from `dataset_name`: the hub dataset (`squad`) or a local save_to_disk copy of it (splits train and validation
    or valid; columns id, context, question, answers).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown SQuAD layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if squad_json is not None:
        if not os.path.isdir(squad_json):
            raise ValueError(f"--squad_json {squad_json!r} must be a directory holding "
                             f"{SQUAD_JSON_FILES['train']} and {SQUAD_JSON_FILES['valid']}")
        paths = {split: os.path.join(squad_json, name) for split, name in SQUAD_JSON_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"--squad_json: missing {', '.join(missing)} (the official SQuAD v1.1 file names)")
        raw = DatasetDict({split: read_squad_v1_json(path) for split, path in paths.items()})
    else:
        data = load_named_dataset(dataset_name, offline_fix=", or pass --squad_json DIR with the official "
                                  f"{SQUAD_JSON_FILES['train']} and {SQUAD_JSON_FILES['valid']}")
        eval_split = next((s for s in ("validation", "valid") if isinstance(data, DatasetDict) and s in data), None)
        if eval_split is None or "train" not in data:
            found = list(data) if isinstance(data, DatasetDict) else type(data).__name__
            raise ValueError(f"dataset {dataset_name!r} has splits {found}; expected train and validation (or valid)")
        raw = DatasetDict({"train": data["train"], "valid": data[eval_split]})
        for split, rows in raw.items():
            missing = {"id", "context", "question", "answers"} - set(rows.column_names)
            if missing:
                raise ValueError(f"dataset {dataset_name!r} split {split}: missing SQuAD columns {sorted(missing)}")
    return DatasetDict({split: _layout_rows(rows, layout) for split, rows in raw.items()})


# ----------------------------------------------------------------------------------------------------------------
# generation-based evaluation (any memory model with write() and generate(); any task with context/query/answers)

def read_prompt(query: str) -> str:
    """The READ prompt used for decoding: the query without its trailing whitespace.

    In training the target follows the query directly ('Where is Mary? ' + 'bathroom'); a BPE tokenizer merges the
    space into the first answer token (' bathroom'), so the token sequence before the first target token is the
    tokenised query *without* its trailing space. Decoding from that prompt matches what teacher forcing saw.
    """
    prompt = query.rstrip()
    if prompt == "":
        raise ValueError(f"query {query!r} is empty after removing trailing whitespace; cannot decode from it")
    return prompt


def tokenize_contexts(tokenizer, contexts: list[str], max_context_length=None):
    """Context ids exactly as the memory-model collator makes them: right padded to a multiple of 8."""
    truncate = {} if max_context_length is None else {"truncation": True, "max_length": max_context_length}
    return tokenizer(contexts, padding=True, pad_to_multiple_of=8, return_tensors="pt", **truncate).input_ids


def generate_answers(model, tokenizer, contexts: list[str], queries: list[str], max_new_tokens: int,
                     batch_size: int, max_context_length=None) -> list[str]:
    """Greedy answers: WRITE each context into memory, then decode from [memory; read prompt] until EOS.

    Prompts of equal token length are decoded together so that no prompt needs padding.
    """
    import torch

    if len(contexts) != len(queries):
        raise ValueError(f"{len(contexts)} contexts for {len(queries)} queries")
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers = [None] * len(contexts)
    try:
        for start in range(0, len(contexts), batch_size):
            stop = min(start + batch_size, len(contexts))
            context_ids = tokenize_contexts(tokenizer, contexts[start:stop], max_context_length).to(device)
            with torch.no_grad():  # WRITE still takes its inner gradient steps, without building a graph
                memory, _ = model.write(context_ids)  # [b, M, d]
            prompts = [tokenizer(read_prompt(q)).input_ids for q in queries[start:stop]]
            by_length = collections.defaultdict(list)
            for i, prompt in enumerate(prompts):
                by_length[len(prompt)].append(i)
            for rows in by_length.values():
                query_ids = torch.tensor([prompts[i] for i in rows], device=device)  # [g, L]
                with torch.no_grad():
                    new_ids = model.generate(memory[rows], query_ids, max_new_tokens=max_new_tokens,
                                             eos_token_id=eos_id)  # [g, <= max_new_tokens]
                for i, ids in zip(rows, new_ids.tolist()):
                    if eos_id is not None and eos_id in ids:
                        ids = ids[: ids.index(eos_id)]
                    answers[start + i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def check_sequences_fit(tokenizer, splits: DatasetDict, n_positions: Optional[int], n_prefix: int,
                        max_context_length: Optional[int] = None, n_generated: int = 0) -> None:
    """Fail before training when a WRITE or READ sequence would not fit the backbone's positions.

    WRITE = [memory prefix (n_prefix positions); context], READ = [memory prefix; query + target], and decoding
    appends up to `n_generated` tokens to the read prompt. A context longer than n_positions - n_prefix is an error
    unless --max_context_length (which keeps the first tokens of every context) is at most that limit.
    """
    if n_positions is None:
        return
    limit = n_positions - n_prefix
    if limit < 1:
        raise ValueError(f"the memory prefix ({n_prefix} positions) leaves no room in the backbone's "
                         f"{n_positions} positions")
    if max_context_length is not None and max_context_length > limit:
        raise ValueError(f"--max_context_length {max_context_length} exceeds the backbone's {n_positions} positions "
                         f"minus {n_prefix} memory positions = {limit}; pass --max_context_length {limit} or less")
    for split, rows in splits.items():
        contexts = sorted(set(list(rows["context"])))
        context_lengths = [len(ids) for ids in tokenizer(contexts)["input_ids"]]
        longest = max(context_lengths)
        if max_context_length is None and longest > limit:
            n_long = sum(length > limit for length in context_lengths)
            raise ValueError(
                f"{n_long} contexts of split {split!r} are longer than the backbone's {n_positions} positions minus "
                f"{n_prefix} memory positions = {limit} tokens (longest: {longest}); pass --max_context_length "
                f"{limit} to keep the first {limit} tokens of each context, or use fewer memory tokens")
        reads = [q + t for q, t in zip(list(rows["query"]), list(rows["target"]))]
        longest_read = max(len(ids) for ids in tokenizer(reads)["input_ids"]) + n_generated
        if longest_read > limit:
            raise ValueError(f"a READ sequence of split {split!r} needs {longest_read} positions (query + target"
                             f"{' + generated tokens' if n_generated else ''}) but only {limit} are left after the "
                             f"{n_prefix} memory positions")


class GenerationEvalCallback(TrainerCallback):
    """At every evaluation: decode greedy answers for the evaluated split and add the official SQuAD EM/F1.

    The split must have `context`, `query` and `answers` (all gold answer strings) columns. `max_samples` limits
    the periodic evaluations during training to the first samples; the evaluations after training use all. Scores are added to the
    evaluation's metrics as `<prefix>_squad_exact_match` and `<prefix>_squad_f1` (prefix `eval`, or `test` for
    the final test evaluation), so they can drive `--metric_for_best_model` / `--stop_metric`, and end up in
    all_results.json and trainer_state.json. The Trainer logs its metrics before calling callbacks, so these two
    numbers are added to that log record afterwards; GradMemTrainer sends them to tensorboard/wandb (metric_names).
    """

    metric_names = ("squad_exact_match", "squad_f1")  # what it adds to an evaluation (checked by the trainer)

    def __init__(self, tokenizer, max_new_tokens: int, batch_size: int, max_samples: Optional[int] = None,
                 max_context_length: Optional[int] = None, n_print: int = 3):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.max_context_length = max_context_length
        self.n_print = n_print
        self.training_done = False

    def on_train_end(self, args, state, control, **kwargs):
        self.training_done = True  # the final evaluations (best checkpoint on valid, test) decode every sample

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        rows = eval_dataloader.dataset
        if "answers" not in rows.column_names:
            raise ValueError(f"generation eval needs an 'answers' column; the evaluated split has {rows.column_names}")
        if self.max_samples is not None and not self.training_done:
            rows = rows.select(range(min(self.max_samples, len(rows))))
        prefix = "test" if any(key.startswith("test_") for key in metrics) else "eval"
        contexts, queries, golds = list(rows["context"]), list(rows["query"]), list(rows["answers"])
        predictions = generate_answers(model, self.tokenizer, contexts, queries, self.max_new_tokens,
                                       self.batch_size, self.max_context_length)
        scores = {f"{prefix}_{name}": value for name, value in squad_v1_scores(predictions, golds).items()}
        metrics.update(scores)
        if state.log_history and any(key.startswith(prefix + "_") for key in state.log_history[-1]):
            state.log_history[-1].update(scores)
        if state.is_world_process_zero:
            lines = [f"  q: {q!r}  p: {p!r}  gold: {a}" for q, p, a in
                     zip(queries[: self.n_print], predictions[: self.n_print], golds[: self.n_print])]
            logger.warning("step %d generation %s | %s\n%s", state.global_step, prefix,
                           ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), "\n".join(lines))


@dataclass
class AnswerGenerationArgs:
    """Answer targets and generation-based evaluation (question-answering run scripts)."""

    max_context_length: Optional[int] = field(default=None, metadata={
        "help": "keep the first N context tokens (default: a context that does not fit the backbone is an error)"})
    eos_after_target: bool = field(default=True, metadata={
        "help": "append the tokenizer's EOS token to every target, so that decoding knows where answers end"})
    generation_max_new_tokens: int = field(default=32, metadata={
        "help": "answer tokens decoded at evaluation (0: no generation-based evaluation)"})
    generation_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "during training, decode answers for the first N evaluated samples only (default: all); the "
                "final evaluations of the best checkpoint always decode every sample"})

    def validate(self) -> None:
        if self.generation_max_new_tokens < 0:
            raise ValueError("--generation_max_new_tokens must be >= 0")
        if self.generation_max_new_tokens > 0 and not self.eos_after_target:
            raise ValueError("generation-based evaluation needs --eos_after_target (without an EOS after the "
                             "target the model never learns to stop); or pass --generation_max_new_tokens 0")


def prepare_answer_splits(splits: DatasetDict, tokenizer, n_positions: Optional[int], n_prefix: int,
                          args: AnswerGenerationArgs) -> DatasetDict:
    """EOS after the targets (`answers`, used for scoring, unchanged) and the length check, before any training."""
    if args.eos_after_target:
        if tokenizer.eos_token is None:
            raise ValueError("--eos_after_target needs a tokenizer with an EOS token")
        eos = tokenizer.eos_token
        splits = splits.map(lambda row: {"target": row["target"] + eos}, desc="EOS after target")
    check_sequences_fit(tokenizer, splits, n_positions, n_prefix, args.max_context_length,
                        args.generation_max_new_tokens)
    return splits


def generation_callbacks(tokenizer, args: AnswerGenerationArgs, eval_batch_size: int) -> list:
    if args.generation_max_new_tokens == 0:
        return []
    return [GenerationEvalCallback(tokenizer, args.generation_max_new_tokens, eval_batch_size,
                                   max_samples=args.generation_eval_samples,
                                   max_context_length=args.max_context_length)]


def main():
    import argparse

    parser = argparse.ArgumentParser(description="SQuAD v1.1 -> save_to_disk dataset in one layout (train/valid; "
                                                 "columns context, query, target, answers, id)")
    parser.add_argument("--layout", required=True, help=", ".join(LAYOUTS))
    parser.add_argument("--squad_json", default=None, help="folder with train-v1.1.json and dev-v1.1.json "
                                                           "(default: the hub dataset 'squad')")
    parser.add_argument("--output_path", required=True)
    args = parser.parse_args()
    if os.path.exists(args.output_path):
        raise FileExistsError(f"{args.output_path} exists; remove it or choose another --output_path")
    data = load_squad(args.layout, squad_json=args.squad_json)
    data.save_to_disk(args.output_path)
    print(f"saved {args.output_path}: train {len(data['train'])}, valid {len(data['valid'])}")


if __name__ == "__main__":
    main()


def train_answer_task(train_args, backbone_args, model_args, answer_args: AnswerGenerationArgs, model, tokenizer,
                      splits, data_name: str, all_args: tuple) -> dict:
    """The common end of the question-answering GradMem scripts (bAbI, SQuAD, phonebook): answer splits checked
    against the backbone's positions, the run name, and the shared trainer with generation-based evaluation."""
    from training_runs import gradmem_text_run_name
    from training_collators import MemoryModelCollator, make_compute_metrics
    from training_experiment import run_experiment

    splits = prepare_answer_splits(splits, tokenizer, max_positions(model.model.config), model.mem_offset, answer_args)
    if train_args.run_name is None and train_args.exp_path is None:
        train_args.run_name = gradmem_text_run_name(train_args, backbone_args, model_args)
    return run_experiment(
        train_args, model, tokenizer, splits,
        MemoryModelCollator(tokenizer, max_context_length=answer_args.max_context_length),
        make_compute_metrics(tokenizer, ignore_tokens=()),
        data_name=data_name, all_args=all_args,
        nonfinite_hint=f"the inner lr ({model_args.inner_lr}) may be too large",
        extra_callbacks=generation_callbacks(
            tokenizer, answer_args, train_args.per_device_eval_batch_size or train_args.per_device_batch_size),
    )
