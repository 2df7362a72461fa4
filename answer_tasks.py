"""Answer tasks: SQuAD v1.1, phonebook lookup and bAbI, for every model family (GradMem, RMT, full-context LM).

A task's data are a DatasetDict(train, valid[, test]) of rows with `context` (what a memory model WRITEs), `query`
and `target` (READ reads query + target; the loss and the teacher-forced metrics are on the target tokens) and
`answers` (every gold answer text). The per-dataset parts are squad_utils.py, phonebook_utils.py and babi_utils.py;
this module
- picks and loads a task from the command line (SquadDataArgs, PhonebookDataArgs, BabiDataArgs, each with load()),
- appends EOS to the targets and checks that every sequence fits the backbone before any training,
- lays rows out for a full-context LM (one sequence `context + query + target`),
- decodes answers greedily (memory models from [memory; query], full-context LMs from context + query) and scores
  them at every evaluation with the official SQuAD v1.1 exact match / F1 (`squad_exact_match`, `squad_f1`).
"""
import collections
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from datasets import DatasetDict, load_from_disk
from transformers import TrainerCallback

from babi_utils import load_babi_from_disk, load_babi_text
from modeling_utils import max_positions
from phonebook_utils import load_phonebook
from evaluation import SAMPLES_FILE
from squad_utils import LAYOUTS, exact_match_score, load_squad, squad_v1_scores

logger = logging.getLogger("gradmem")

PHONEBOOK_HUB_IDS = tuple(f"booydar/phonebook_N{n}" for n in (2, 4, 8, 16, 32, 64))
PHONEBOOK_COLUMNS = {"context", "query", "target"}


# ----------------------------------------------------------------------------------------------------------------
# data

def with_answers(splits: DatasetDict) -> DatasetDict:
    """Tasks with one gold answer per question: `answers` = [target]."""
    return splits.map(lambda row: {"answers": [row["target"]]}, desc="answers")


def holds_phonebook(path: str) -> bool:
    """A local save_to_disk folder of phonebook rows (context/query/target; SQuAD rows have question/answers)."""
    data = load_from_disk(path)
    splits = data.values() if isinstance(data, DatasetDict) else [data]
    return all(PHONEBOOK_COLUMNS <= set(s.column_names) and "answers" not in s.column_names for s in splits)


@dataclass
class PhonebookDataArgs:
    """Phonebook lookup: N names with their numbers per context, the query a name, the answer its number."""

    dataset_name: str = field(metadata={
        "help": "a local save_to_disk folder (python phonebook_utils.py --output_path ...) or a hub id such as "
                "booydar/phonebook_N8"})

    def load(self) -> tuple:
        splits = with_answers(load_phonebook(self.dataset_name))
        return splits, os.path.basename(os.path.normpath(self.dataset_name))


@dataclass
class SquadDataArgs:
    """SQuAD v1.1 (hub or official JSON files, three layouts); a phonebook dataset too, for the reference's command
    lines, which trained phonebook through the SQuAD scripts."""

    dataset_name: str = field(default="squad", metadata={
        "help": "'squad' (the hub dataset, or --squad_json), a local save_to_disk copy of it, or a phonebook dataset "
                f"({', '.join(PHONEBOOK_HUB_IDS[:2])}, ..., or a local folder of phonebook rows)"})
    squad_json: Optional[str] = field(default=None, metadata={
        "help": "folder with the official train-v1.1.json and dev-v1.1.json (instead of the hub)"})
    layout: str = field(default="c_q", metadata={"help": f"SQuAD layout: {', '.join(LAYOUTS)}"})
    data_path: Optional[str] = field(default=None, metadata={
        "help": "not read (accepted for the reference's presets, which pass it; the reference ignored it too): the "
                "data come from --dataset_name / --squad_json"})

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown --layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.squad_json is not None and self.dataset_name != "squad":
            raise ValueError(f"--squad_json reads SQuAD from the official files; --dataset_name {self.dataset_name} "
                             "names other data: drop one of them")
        if self.data_path is not None:
            logger.warning("--data_path %s is not read (as in the reference): the data come from --dataset_name %s%s",
                           self.data_path, self.dataset_name,
                           "" if self.squad_json is None else f" / --squad_json {self.squad_json}")

    def is_phonebook(self) -> bool:
        """Which task --dataset_name names: a phonebook hub id, or a local folder whose rows are phonebook rows."""
        if self.dataset_name == "squad":
            return False
        if self.dataset_name in PHONEBOOK_HUB_IDS:
            return True
        if not os.path.isdir(self.dataset_name):
            raise ValueError(f"unknown --dataset_name {self.dataset_name!r}: use 'squad' (the hub dataset, or "
                             "--squad_json for the official files), a phonebook hub id (booydar/phonebook_N2 ... N64) "
                             "or a local save_to_disk folder of either")
        return holds_phonebook(self.dataset_name)

    def load(self) -> tuple:
        if self.is_phonebook():
            if self.layout != "c_q":
                raise ValueError(f"--layout applies to SQuAD only; {self.dataset_name} is a phonebook dataset")
            return PhonebookDataArgs(self.dataset_name).load()
        splits = load_squad(self.layout, squad_json=self.squad_json, dataset_name=self.dataset_name)
        return splits, "squad" if self.layout == "c_q" else f"squad_{self.layout}"


@dataclass
class BabiDataArgs:
    """bAbI (BABILong qa1-qa5 "0k"): a save_to_disk folder or the original bAbI text files."""

    data_path: Optional[str] = field(default=None, metadata={
        "help": "save_to_disk folder with train/valid/test, e.g. ./data/babilong_qa2_0k (scripts/download_babi.sh)"})
    babi_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of original bAbI text files (e.g. tasks_1-20_v1-2/en-valid-10k), with --babi_task"})
    babi_task: Optional[str] = field(default=None, metadata={"help": "qa1 ... qa20, with --babi_dir"})

    def validate(self) -> None:
        if (self.data_path is None) == (self.babi_dir is None):
            raise ValueError("give exactly one of --data_path (a save_to_disk folder) and --babi_dir (original "
                             "bAbI text files, with --babi_task)")
        if (self.babi_dir is None) != (self.babi_task is None):
            raise ValueError("--babi_dir and --babi_task go together")

    def load(self) -> tuple:
        if self.data_path is not None:
            splits = load_babi_from_disk(self.data_path)
            name = os.path.basename(os.path.normpath(self.data_path))
        else:
            splits = load_babi_text(self.babi_dir, self.babi_task)
            name = f"babi_{self.babi_task}_{os.path.basename(os.path.normpath(self.babi_dir))}"
        return with_answers(splits), name


def full_context_rows(splits: DatasetDict) -> DatasetDict:
    """Rows for a full-context LM, which reads `context + query + target` as one sequence: a space joins context and
    query unless the join already has whitespace (SQuAD contexts are stripped for the memory models; the reference's
    full-context LM read context + ' ' + question + ' ' + answer). bAbI and phonebook rows are unchanged."""
    def join(row):
        needs_space = row["context"] != "" and not row["context"][-1].isspace() and not row["query"][:1].isspace()
        return {"context": row["context"] + " " if needs_space else row["context"]}

    return splits.map(join, desc="full-context layout")


# ----------------------------------------------------------------------------------------------------------------
# targets, lengths

@dataclass
class AnswerGenerationArgs:
    """Answer targets and generation-based evaluation (answer-task run scripts)."""

    max_context_length: Optional[int] = field(default=None, metadata={
        "help": "memory models: keep the first N context tokens (default: a context that does not fit the backbone "
                "is an error)"})
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


def add_eos(splits: DatasetDict, tokenizer, args: AnswerGenerationArgs) -> DatasetDict:
    """EOS after every target (with --eos_after_target); `answers`, used for scoring, stay as they are."""
    if not args.eos_after_target:
        return splits
    if tokenizer.eos_token is None:
        raise ValueError("--eos_after_target needs a tokenizer with an EOS token")
    eos = tokenizer.eos_token
    return splits.map(lambda row: {"target": row["target"] + eos}, desc="EOS after target")


def check_sequences_fit(tokenizer, splits: DatasetDict, n_positions: Optional[int], n_prefix: int,
                        max_context_length: Optional[int] = None, n_generated: int = 0) -> None:
    """Memory models: fail before training when a WRITE or READ sequence would not fit the backbone's positions.

    WRITE = [memory (n_prefix positions); context], READ = [memory; query + target], and decoding appends up to
    `n_generated` tokens to the read prompt. A context longer than n_positions - n_prefix is an error unless
    --max_context_length (which keeps the first tokens of every context) is at most that limit.
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


# ----------------------------------------------------------------------------------------------------------------
# greedy decoding

def read_prompt(query: str) -> str:
    """The prompt decoding starts from: the query without its trailing whitespace.

    In training the target follows the query directly ('Where is Mary? ' + 'bathroom'); a BPE tokenizer merges the
    space into the first answer token (' bathroom'), so the token sequence before the first target token is the
    tokenised query *without* its trailing space. Decoding from that prompt matches what teacher forcing saw.
    """
    prompt = query.rstrip()
    if prompt == "":
        raise ValueError(f"query {query!r} is empty after removing trailing whitespace; cannot decode from it")
    return prompt


def tokenize_contexts(tokenizer, contexts: list, max_context_length=None) -> torch.Tensor:
    """Context ids exactly as the memory-model collator makes them: right padded to a multiple of 8."""
    truncate = {} if max_context_length is None else {"truncation": True, "max_length": max_context_length}
    return tokenizer(contexts, padding=True, pad_to_multiple_of=8, return_tensors="pt", **truncate).input_ids


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def equal_length_groups(prompts: list) -> list:
    """[(row indices, [g, L] ids)] of prompts with the same token length: decoded together, no prompt is padded."""
    by_length = collections.defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    return [(rows, torch.tensor([prompts[i] for i in rows])) for rows in by_length.values()]


def decode_new_tokens(tokenizer, new_ids: torch.Tensor) -> list:
    """Generated ids [g, T] -> answer strings, each cut at its first EOS."""
    eos_id = tokenizer.eos_token_id
    answers = []
    for ids in new_ids.tolist():
        if eos_id is not None and eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def greedy_read(model, memory: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int,
                eos_id: Optional[int]) -> torch.Tensor:
    """New ids [g, <= max_new_tokens] decoded from [memory; prompt] with the memory model's READ (no padding).

    READ's logits[:, j] predict query token j from the tokens before it, so the logits of one extra slot after the
    prompt predict the next token (what fills that slot cannot change them under causal attention).
    """
    ids = prompt_ids
    for _ in range(max_new_tokens):
        logits = model.read(memory, torch.cat([ids, ids[:, -1:]], dim=1))  # [g, L + 1, V]
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        if eos_id is not None and bool((ids[:, prompt_ids.shape[1]:] == eos_id).any(dim=1).all()):
            break
    return ids[:, prompt_ids.shape[1]:]


def memory_model_answers(model, tokenizer, contexts: list, queries: list, max_new_tokens: int, batch_size: int,
                         max_context_length=None) -> list:
    """Greedy answers of a memory model (GradMem, RMT): WRITE each context, then decode from [memory; read prompt]
    until EOS."""
    if len(contexts) != len(queries):
        raise ValueError(f"{len(contexts)} contexts for {len(queries)} queries")
    device = next(model.parameters()).device
    answers = [None] * len(contexts)
    with eval_mode(model):
        for start in range(0, len(contexts), batch_size):
            stop = min(start + batch_size, len(contexts))
            context_ids = tokenize_contexts(tokenizer, contexts[start:stop], max_context_length).to(device)
            with torch.no_grad():  # GradMem's WRITE still takes its inner gradient steps, without building a graph
                memory = model.write(context_ids)[0]  # [b, M, d]
            prompts = [tokenizer(read_prompt(q)).input_ids for q in queries[start:stop]]
            for rows, prompt_ids in equal_length_groups(prompts):
                new_ids = greedy_read(model, memory[rows], prompt_ids.to(device), max_new_tokens,
                                      tokenizer.eos_token_id)
                for i, answer in zip(rows, decode_new_tokens(tokenizer, new_ids)):
                    answers[start + i] = answer
    return answers


@torch.no_grad()
def full_context_answers(model, tokenizer, contexts: list, queries: list, max_new_tokens: int, batch_size: int,
                         max_input_length: Optional[int] = None) -> list:
    """Greedy answers of a full-context LM: decode from context + read prompt (its last `max_input_length` tokens, as
    in training) until EOS, with the model's own generate() and KV cache; never past the model's positions."""
    if len(contexts) != len(queries):
        raise ValueError(f"{len(contexts)} contexts for {len(queries)} queries")
    device = next(model.parameters()).device
    positions = max_positions(model.config)
    answers = [None] * len(contexts)
    with eval_mode(model):
        for start in range(0, len(contexts), batch_size):
            stop = min(start + batch_size, len(contexts))
            prompts = [tokenizer(context + read_prompt(query)).input_ids
                       for context, query in zip(contexts[start:stop], queries[start:stop])]
            if max_input_length is not None:
                prompts = [ids[-max_input_length:] for ids in prompts]
            for rows, prompt_ids in equal_length_groups(prompts):
                n_new = max_new_tokens if positions is None else min(max_new_tokens, positions - prompt_ids.shape[1])
                new_ids = prompt_ids[:, :0]
                if n_new > 0:
                    prompt_ids = prompt_ids.to(device)
                    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                         max_new_tokens=n_new, do_sample=False, use_cache=True,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                    new_ids = out[:, prompt_ids.shape[1]:]
                for i, answer in zip(rows, decode_new_tokens(tokenizer, new_ids)):
                    answers[start + i] = answer
    return answers


# ----------------------------------------------------------------------------------------------------------------
# evaluation of generated answers

class GenerationEvalCallback(TrainerCallback):
    """At every evaluation: decode greedy answers for the evaluated split and add the official SQuAD EM/F1.

    `decode(model, contexts, queries) -> answers`. The split must have `context`, `query` and `answers` (all gold
    answer strings) columns. `max_samples` limits the periodic evaluations during training to the first samples; the
    evaluations after training use all. Scores are added to the evaluation's metrics as `<prefix>_squad_exact_match`
    and `<prefix>_squad_f1` (prefix `eval`, or `test` for the final test evaluation), so they can drive
    `--metric_for_best_model` / `--stop_metric`, and end up in all_results.json and trainer_state.json. The Trainer
    logs its metrics before calling callbacks, so these two numbers are added to that log record afterwards; the
    trainer sends them to tensorboard/wandb (metric_names).
    """

    metric_names = ("squad_exact_match", "squad_f1")  # what it adds to an evaluation (checked by the trainer)

    def __init__(self, decode: Callable, max_samples: Optional[int] = None, n_samples: int = 3):
        self.decode = decode
        self.max_samples = max_samples
        self.n_samples = n_samples  # --log_samples: logged and appended to samples.jsonl at every evaluation
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
        queries, golds = list(rows["query"]), list(rows["answers"])
        predictions = self.decode(model, list(rows["context"]), queries)
        scores = {f"{prefix}_{name}": value for name, value in squad_v1_scores(predictions, golds).items()}
        metrics.update(scores)
        if state.log_history and any(key.startswith(prefix + "_") for key in state.log_history[-1]):
            state.log_history[-1].update(scores)
        if state.is_world_process_zero:
            records = [{"step": state.global_step, "split": prefix, "query": q, "target": list(a), "answer": p,
                        "correct": bool(max(exact_match_score(p, gold) for gold in a))}
                       for q, p, a in zip(queries[: self.n_samples], predictions[: self.n_samples], golds)]
            if records:
                with open(os.path.join(args.output_dir, SAMPLES_FILE), "a") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            lines = [f"  q: {r['query']!r}  p: {r['answer']!r}  gold: {r['target']}" for r in records]
            logger.warning("step %d generation %s | %s\n%s", state.global_step, prefix,
                           ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), "\n".join(lines))


def generation_callbacks(args: AnswerGenerationArgs, tokenizer, batch_size: int, full_context: bool = False,
                         max_input_length: Optional[int] = None, log_samples: int = 3) -> list:
    """The generation-based evaluation of a memory model, or of a full-context LM (`full_context`); the first
    `log_samples` answers of every evaluation are logged and appended to samples.jsonl in the run folder."""
    if args.generation_max_new_tokens == 0:
        return []
    n_new = args.generation_max_new_tokens
    if full_context:
        def decode(model, contexts, queries):
            return full_context_answers(model, tokenizer, contexts, queries, n_new, batch_size, max_input_length)
    else:
        def decode(model, contexts, queries):
            return memory_model_answers(model, tokenizer, contexts, queries, n_new, batch_size,
                                        args.max_context_length)
    return [GenerationEvalCallback(decode, max_samples=args.generation_eval_samples, n_samples=log_samples)]
