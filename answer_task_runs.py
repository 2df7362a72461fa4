"""The answer-task run scripts' common wiring: run_{gradmemgpt,rmt,gpt2}_on_{squad,phonebook,babi}.py each call one
function here with their task's data options (answer_tasks.SquadDataArgs, PhonebookDataArgs, BabiDataArgs).

Every family trains on the task's target tokens (teacher-forced token accuracy / exact match, as the reference) and
is scored at each evaluation on answers it decodes greedily (official SQuAD v1.1 EM/F1 against all gold answers):
- train_gradmem:      GradMem, WRITE context / READ query + target;
- train_rmt:          the RMT2Segm baseline, same layout;
- train_full_context: a plain causal LM (GPT-2, Llama, Pythia, Mamba) on context + query + target.
"""
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from answer_tasks import (AnswerGenerationArgs, add_eos, check_sequences_fit, full_context_rows,
                          generation_callbacks)
from evaluation import SampleLogArgs
from full_context_lm import (FullContextArgs, build_full_context_lm, check_full_context_fits,
                             check_full_context_options)
from grad_memgpt import PRESETS, GradMemArgs, build_grad_memgpt
from modeling_utils import max_positions
from rmt import RMTArgs, build_rmt, check_backbone
from training_args import BackboneArgs, TrainArgs, launched_world_size, parse_cli
from training_backbone import load_tokenizer
from training_checkpoints import load_init_checkpoint
from training_collators import CausalLMCollator, MemoryModelCollator, make_compute_metrics
from training_experiment import run_experiment
from training_runs import full_context_run_name, gradmem_text_run_name, rmt_run_name


@dataclass
class InitBaseArgs:
    init_base_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "safetensors file loaded into the backbone LM only (unused tensors are listed; every trainable "
                "backbone tensor must be in it unless --init_checkpoint_partial); not with --init_checkpoint"})


@dataclass
class RMTTaskArgs(InitBaseArgs):
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "hub id or folder of the tokenizer to use instead of the backbone's (--pretrained_model or "
                "--tokenizer_path)"})


def check_init_base(init_args: InitBaseArgs, train_args: TrainArgs) -> None:
    if init_args.init_base_checkpoint is not None and train_args.init_checkpoint is not None:
        raise ValueError("--init_base_checkpoint and --init_checkpoint are mutually exclusive (the reference used "
                         "the base checkpoint only without a full one)")


def load_base_checkpoint(model, init_args: InitBaseArgs, train_args: TrainArgs) -> None:
    """--init_base_checkpoint into the memory model's backbone LM."""
    if init_args.init_base_checkpoint is not None:
        load_init_checkpoint(model.model, init_args.init_base_checkpoint, partial=train_args.init_checkpoint_partial)


def fixed_layout_args(layout: str, args: Optional[Sequence[str]] = None) -> list:
    """The command line with `--layout layout` in front: the reference's run_gradmemgpt_on_squad_{cq_a,qc_a}.py."""
    args = list(sys.argv[1:] if args is None else args)
    if any(arg == "--layout" or arg.startswith("--layout=") for arg in args):
        raise ValueError(f"this script's layout is {layout}; for another one run run_gradmemgpt_on_squad.py --layout")
    return ["--layout", layout, *args]


def eval_batch_size(train_args: TrainArgs) -> int:
    return train_args.per_device_eval_batch_size or train_args.per_device_batch_size


def train_gradmem(data_type: type, args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, model_args, data_args, answer_args, init_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, GradMemArgs, data_type, AnswerGenerationArgs, InitBaseArgs, SampleLogArgs, args=args,
        presets=PRESETS)
    check_init_base(init_args, train_args)
    tokenizer = load_tokenizer(backbone_args)
    splits, data_name = data_args.load()
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)
    load_base_checkpoint(model, init_args, train_args)
    splits = add_eos(splits, tokenizer, answer_args)
    check_sequences_fit(tokenizer, splits, max_positions(model.model.config), model.mem_offset,
                        answer_args.max_context_length, answer_args.generation_max_new_tokens)
    if train_args.run_name is None and train_args.exp_path is None:
        train_args.run_name = gradmem_text_run_name(train_args, backbone_args, model_args)
    return run_experiment(
        train_args, model, tokenizer, splits,
        MemoryModelCollator(tokenizer, max_context_length=answer_args.max_context_length),
        make_compute_metrics(tokenizer, ignore_tokens=()),
        data_name=data_name, all_args=(backbone_args, model_args, data_args, answer_args, init_args, sample_args),
        nonfinite_hint=f"the inner lr ({model_args.inner_lr}) may be too large",
        extra_callbacks=generation_callbacks(answer_args, tokenizer, eval_batch_size(train_args),
                                             log_samples=sample_args.log_samples),
    )


def train_rmt(data_type: type, args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, rmt_args, data_args, answer_args, task_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, RMTArgs, data_type, AnswerGenerationArgs, RMTTaskArgs, SampleLogArgs, args=args)
    check_backbone(backbone_args)
    check_init_base(task_args, train_args)
    tokenizer_source = backbone_args if task_args.tokenizer is None else \
        dataclasses.replace(backbone_args, base_model=None, pretrained_model=task_args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_source)
    splits, data_name = data_args.load()
    model = build_rmt(backbone_args, rmt_args, tokenizer)
    load_base_checkpoint(model, task_args, train_args)
    splits = add_eos(splits, tokenizer, answer_args)
    # WRITE reads [memory prefix; context; write-out slots], READ [memory prefix; query + target]
    write_overhead = model.n_prefix + rmt_args.n_ctrl_tokens + rmt_args.n_mem_tokens
    check_sequences_fit(tokenizer, splits, max_positions(model.model.config), write_overhead,
                        answer_args.max_context_length, answer_args.generation_max_new_tokens)
    if train_args.run_name is None:
        train_args.run_name = rmt_run_name(train_args, backbone_args, rmt_args, launched_world_size())
    return run_experiment(
        train_args, model, tokenizer, splits,
        MemoryModelCollator(tokenizer, max_context_length=answer_args.max_context_length),
        make_compute_metrics(tokenizer, ignore_tokens=()),
        data_name=data_name, all_args=(backbone_args, rmt_args, data_args, answer_args, task_args, sample_args),
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
        extra_callbacks=generation_callbacks(answer_args, tokenizer, eval_batch_size(train_args),
                                             log_samples=sample_args.log_samples),
    )


def train_full_context(data_type: type, args: Optional[Sequence[str]] = None) -> dict:
    train_args, backbone_args, lm_args, data_args, answer_args, sample_args = parse_cli(
        TrainArgs, BackboneArgs, FullContextArgs, data_type, AnswerGenerationArgs, SampleLogArgs, args=args)
    check_full_context_options(backbone_args, lm_args)
    if answer_args.max_context_length is not None:
        raise ValueError("--max_context_length is for the memory models; the full-context LM truncates the whole "
                         "sequence from the start with --max_input_length")
    tokenizer = load_tokenizer(backbone_args)
    splits, data_name = data_args.load()
    model = build_full_context_lm(backbone_args, lm_args, tokenizer)
    splits = full_context_rows(add_eos(splits, tokenizer, answer_args))
    collator = CausalLMCollator(tokenizer, max_input_length=lm_args.max_input_length)
    check_full_context_fits(model, collator, splits)
    if train_args.run_name is None:
        train_args.run_name = full_context_run_name(train_args, backbone_args, lm_args, launched_world_size())
    return run_experiment(
        train_args, model, tokenizer, splits, collator,
        make_compute_metrics(tokenizer, ignore_tokens=()),
        data_name=data_name, all_args=(backbone_args, lm_args, data_args, answer_args, sample_args),
        next_token_logits=True,
        nonfinite_hint=f"Lower --learning_rate (now {train_args.learning_rate:g}).",
        extra_callbacks=generation_callbacks(answer_args, tokenizer, eval_batch_size(train_args), full_context=True,
                                             max_input_length=lm_args.max_input_length,
                                             log_samples=sample_args.log_samples),
    )
