"""run_experiment: train, evaluate the selected checkpoint on valid (and test), write the run folder; every argument
is validated before the run folder is touched.

A run script is wiring only:

    train_args, backbone_args, model_args, data_args = parse_cli(TrainArgs, BackboneArgs, GradMemArgs, DataArgs)
    tokenizer = load_tokenizer(backbone_args)
    splits = load_splits(data_args.data_path)
    model = build_grad_memgpt(backbone_args, model_args, tokenizer)  # or: config from backbone_source(...)
    run_experiment(train_args, model, tokenizer, splits, MemoryModelCollator(tokenizer), make_compute_metrics(tokenizer),
                   data_name=..., all_args=(backbone_args, model_args, data_args))

Run folder: `runs/<data>/<run_name>/run_<seed>/` (or `--exp_path`) with `run_config.json` (all args, package versions,
git commit), HF checkpoints, the selected model at the root (`config.json`, weights, tokenizer: `from_pretrained(run_dir)`),
tensorboard events, `all_results.json`, `trainer_state.json`, `learning_curve.png`.
Re-running the same command resumes an unfinished run and reports a finished one; `--overwrite` starts over, in a
run folder only. Nothing is written or deleted before every argument is validated (README: Resume, --overwrite).
"""
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import (EarlyStoppingCallback, PreTrainedTokenizerBase, Trainer, TrainerCallback,
                          TrainingArguments)

from figures import save_png
from guards import CollapseRollback, restore_checkpoint_in_place
from training_args import TrainArgs
from training_checkpoints import load_init_checkpoint, newest_usable_checkpoint
from training_collators import reduce_logits_to_predictions
from training_loop import (GradMemTrainer, NonFiniteGuardState, NonFiniteStepSkippingAdamW, StopAfterWallTime,
                           StopOnMetricValue, freeze_parameters_without_gradient)
from training_run_folder import (CURVE_FILE, plan_run_folder, prepare_run_folder, resolve_run_dir,
                                 write_run_record)
from training_runs import flat_args, read_json_file

logger = logging.getLogger("gradmem")

COMMON_METRICS = {"loss", "token_accuracy", "exact_match"}  # reported by every evaluation


def report_targets(report_to: str) -> list:
    """The --report_to list without 'none'; an unknown name is an error."""
    wanted = [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]
    unknown = [r for r in wanted if r not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"--report_to {report_to}: unknown {unknown}; use tensorboard, wandb or none")
    return wanted


def _report_callbacks(report_to: str, run_dir: Path, run_name: str, is_main: bool) -> tuple:
    """(HF report_to list, extra callbacks). Tensorboard events go straight into the run folder."""
    wanted = report_targets(report_to)
    callbacks, hf_report = [], []
    if "tensorboard" in wanted and is_main:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run_dir)  # instead of <run>/runs/<date>; also for the writer re-opened after train
        callbacks.append(tensorboard)
    if "wandb" in wanted:
        has_key = bool(os.environ.get("WANDB_API_KEY"))
        netrc = Path.home() / ".netrc"
        has_key = has_key or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
        if not has_key and "WANDB_MODE" not in os.environ:
            logger.warning("no wandb key: logging to wandb offline in %s (sync later with `wandb sync`)", run_dir)
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", "gradmem")
        hf_report.append("wandb")
    return hf_report, callbacks


def plot_learning_curve(log_history: list, path: Path, title: str = "") -> None:
    """PNG with eval exact match / token accuracy (left) and train / eval loss (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = next((i for i, r in enumerate(log_history) if "train_runtime" in r), len(log_history))
    log_history = log_history[:end]  # what was logged while training (not the re-evaluation of the best checkpoint)

    def series(key):
        points = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("eval_exact_match", "exact match"), ("eval_token_accuracy", "token accuracy")):
        x, y = series(key)
        if x:
            left.plot(x, y, marker="o", markersize=3, label=label)
    left.set_xlabel("step"), left.set_ylabel("eval"), left.set_ylim(-0.02, 1.02), left.grid(alpha=0.3)
    left.legend(loc="lower right")
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        x, y = series(key)
        if x:
            right.plot(x, y, label=label)
    right.set_xlabel("step"), right.set_ylabel("loss"), right.set_yscale("log"), right.grid(alpha=0.3)
    right.legend(loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _use_one_gpu_per_process(args: TrainingArguments) -> None:
    """A single process on a machine with several GPUs trains on one of them.

    HF's Trainer would otherwise wrap the model in nn.DataParallel over every visible GPU, which silently multiplies
    the batch by the GPU count (breaking --total_batch_size), gathers the model's stats into vectors and replicates
    the second-order WRITE graph per GPU. Several GPUs are used through DDP processes instead (NP=... in the presets).
    """
    if args.parallel_mode.value == "not_distributed":  # one process, several GPUs: nn.DataParallel
        logger.warning("%d GPUs are visible to this single process: training on one (cuda:0). Use several of them "
                       "with DDP: NP=%d bash scripts/<preset>.sh, or accelerate launch --config_file "
                       "accelerate_ddp.yaml --num_processes %d ...", args.n_gpu, args.n_gpu, args.n_gpu)
        args._n_gpu = 1  # transformers has no public switch for this; n_gpu is read from here


def _ensure_fp32(model: torch.nn.Module) -> None:
    """Master weights are fp32 (mixed precision = autocast only); a bf16-loaded pretrained model is upcast."""
    low = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if low:
        logger.warning("model parameters in %s: upcast to float32 (fp32 master weights; use --bf16 for autocast)", low)
        model.float()


def evaluate_splits(trainer: Trainer, eval_split, test_split, answer_metrics: Optional[Callable] = None,
                    prefix: str = "") -> dict:
    """Metrics of the model as it is now on valid (eval_) and test (test_), with generated-answer metrics when given."""
    metrics = {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, split in (("eval", eval_split), ("test", test_split)):
        if split is None:
            continue
        metrics.update(trainer.evaluate(split, metric_key_prefix=prefix + name))
        if answer_metrics is not None:
            metrics.update({f"{prefix}{name}_{k}": v for k, v in answer_metrics(model, split).items()})
    return metrics


def selected_evaluation(state) -> dict:
    """The eval_ metrics the selected checkpoint had when it was evaluated during training ({} if none was)."""
    best = state.best_model_checkpoint
    step = int(Path(best).name.rsplit("-", 1)[-1]) if best else None
    for entry in reversed(state.log_history):
        if entry.get("step") == step and any(key.startswith("eval_") for key in entry):
            return {key: value for key, value in entry.items() if key.startswith("eval_")}
    return {}


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation the backbone runs (memory models keep their causal LM in `.model`)."""
    backbone = getattr(model, "model", model)
    return getattr(getattr(backbone, "config", None), "_attn_implementation", None) or "default"


def setup_line(trainer: Trainer, precision: str, fast_step: str) -> str:
    """One line at the start of a run: where and how it computes."""
    device = trainer.args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    tf32 = " (tf32 matmuls)" if trainer.args.tf32 and precision == "no" else ""
    if fast_step == "off":
        fast = "off (--fast_step off)"
    elif device.type != "cuda":
        fast = "off (not on CUDA)"
    else:
        fast = "auto (decided, and logged, at the first step)"
    model = trainer.accelerator.unwrap_model(trainer.model)
    lean = getattr(model, "uses_lean_ops", None)  # GradMem's lean SwiGLU / RMSNorm (other models: no such option)
    return (f"device {device} ({name}) x {trainer.args.world_size} process(es) | precision "
            f"{'bf16 autocast, fp32 weights' if precision == 'bf16' else 'fp32'}{tf32} | attention "
            f"{attention_implementation(model)} | fast step {fast}"
            + ("" if lean is None else f" | lean ops {'on' if lean else 'off'}"))


def report_finished_run(run_dir: Path, reason: str) -> dict:
    """The saved results of a finished run, logged; nothing is trained or written."""
    results = read_json_file(run_dir / "all_results.json", "results file")
    logger.info("%s: %s; nothing to train (a larger --max_steps continues it, --overwrite starts over). Results (all "
                "of them in all_results.json):\n%s", run_dir, reason, final_table(results))
    return results


def final_table(metrics: dict) -> str:
    """A few lines that end a run: the selected checkpoint, its exact match, steps and what the guards did."""
    def value(key):
        v = metrics.get(key)
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("best checkpoint", value("best_model_checkpoint"))]
    for split, name in (("eval", "valid"), ("test", "test")):
        if f"{split}_exact_match" in metrics:
            generated = f"{split}_generated_exact_match"
            rows.append((f"{name} exact match", value(f"{split}_exact_match") + (
                f" (generated answers: {value(generated)})" if generated in metrics else "")))
    rows += [("steps", value("global_step")), ("skipped steps", value("skipped_steps")),
             ("spike-skipped steps", value("spike_skipped_steps")), ("rollbacks", value("rollbacks"))]
    return "\n".join(f"  {name:<20} {text}" for name, text in rows)


def check_scheduler_name(name: str) -> None:
    from transformers import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        raise ValueError(f"--lr_scheduler_type {name!r} is not a scheduler; choose one of "
                         f"{', '.join(t.value for t in SchedulerType)}") from None


def evaluation_metric_names(model, collator: Callable, compute_metrics: Callable, eval_split,
                            next_token_logits: bool = False, callbacks: Sequence = ()) -> set:
    """The metric names an evaluation reports (without the eval_ prefix), found by one forward pass on two eval rows:
    loss, compute_metrics' names (with the model's stats) and the callbacks' `metric_names`."""
    from transformers.trainer_utils import EvalPrediction

    batch = collator([eval_split[i] for i in range(min(2, len(eval_split)))])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train(was_training)
    stats = out.get("stats") if isinstance(out, dict) else None
    predictions = reduce_logits_to_predictions(out["logits"], batch["labels"], next_token_logits=next_token_logits)
    if stats:
        predictions = (predictions.numpy(), {k: v.detach().float().cpu().numpy() for k, v in stats.items()})
    else:
        predictions = predictions.numpy()
    metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=batch["labels"].numpy()))
    return {"loss", *metrics, *(name for cb in callbacks for name in getattr(cb, "metric_names", ()))}


def check_metric_names(train_args: TrainArgs, metric_names: Callable[[], set]) -> None:
    """--metric_for_best_model and --stop_metric name metrics that the evaluation reports. Names other than the
    common ones (loss, token_accuracy, exact_match) are looked up with `metric_names()` (a forward pass)."""
    options = ["metric_for_best_model"] + (["stop_metric"] if train_args.stop_metric_value is not None else [])
    wanted = {option: getattr(train_args, option) for option in options}
    if all(value.removeprefix("eval_") in COMMON_METRICS for value in wanted.values()):
        return
    names = metric_names()
    for option, value in wanted.items():
        if value.removeprefix("eval_") not in names:
            raise ValueError(f"--{option} {value!r} is not a metric of this evaluation; choose one of "
                             f"{', '.join(sorted(names))}")


def optimizer_kwargs(train_args, nonfinite_hint: str = "") -> dict:
    """NonFiniteStepSkippingAdamW's arguments: AdamW's, the non-finite step limit and the spike guard's, whose floor is
    the clipping norm (a norm at or below it is never a spike; guards.py)."""
    return {"lr": train_args.learning_rate, "betas": (train_args.adam_beta1, train_args.adam_beta2),
            "eps": train_args.adam_epsilon, "max_consecutive": train_args.max_consecutive_skipped_steps,
            "hint": nonfinite_hint, "spike_factor": train_args.spike_factor, "spike_window": train_args.spike_window,
            "spike_floor": max(0.0, train_args.max_grad_norm or 0.0)}


def run_experiment(
    train_args: TrainArgs,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits,
    collator: Callable,
    compute_metrics: Callable,
    data_name: str,
    all_args: Sequence = (),
    next_token_logits: bool = False,
    nonfinite_hint: str = "",
    extra_callbacks: Sequence[TrainerCallback] = (),
    answer_metrics: Optional[Callable] = None,
) -> dict:
    """Train, evaluate the best checkpoint on valid (and test if present), write the run folder. Returns metrics.

    The best checkpoint is selected on valid; test is only evaluated (prefix test_). Where the final checkpoint is not
    the best one, it is evaluated too (prefix final_eval_, final_test_).

    data_name:          folder name of the data (run folder runs/<data_name>/<run_name>/run_<seed>).
    all_args:           the other CLI dataclasses, stored in run_config.json together with train_args.
    next_token_logits:  the model's logits[:, t] predict token t+1 (plain causal LMs); memory models: False.
    nonfinite_hint:     the likely cause named when many steps in a row are not finite (e.g. the inner lr).
    answer_metrics:     (model, split) -> dict of metrics of generated answers (evaluation.make_generated_answer_metrics),
                        added for valid and test with the same prefixes.
    """
    from accelerate import PartialState

    state = PartialState(cpu=train_args.use_cpu)  # with --use_cpu, several processes run DDP over gloo
    run_dir = resolve_run_dir(train_args, data_name)
    cli_args = {**flat_args([train_args, *all_args]), "mixed_precision": train_args.mixed_precision()}

    # ---- decide and validate everything before the run folder is touched (every process raises alike) ----
    check_scheduler_name(train_args.lr_scheduler_type)
    report_targets(train_args.report_to)
    plan = plan_run_folder(run_dir, train_args, cli_args, state.num_processes)
    if plan.finished is not None:
        return report_finished_run(run_dir, plan.finished)
    resume_from = plan.resume_from
    _ensure_fp32(model)
    if train_args.init_checkpoint is not None:
        if resume_from is None:
            load_init_checkpoint(model, train_args.init_checkpoint, partial=train_args.init_checkpoint_partial)
        else:
            logger.info("resuming from %s: --init_checkpoint is not loaded again", resume_from)
    freeze_parameters_without_gradient(model)  # then DDP needs no find_unused_parameters
    eval_split = splits["valid"]
    if train_args.max_eval_samples is not None:
        eval_split = eval_split.select(range(min(train_args.max_eval_samples, len(eval_split))))
    check_metric_names(train_args, lambda: evaluation_metric_names(model, collator, compute_metrics, eval_split,
                                                                   next_token_logits, extra_callbacks))

    # ---- run folder: start over, resume, or start fresh (the main process writes, the others wait) ----
    if state.is_main_process:
        prepare_run_folder(run_dir, plan)
        write_run_record(run_dir, [train_args, *all_args], cli_args, state.num_processes, plan)
    state.wait_for_everyone()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("run folder %s | %s trainable parameters | train %d, valid %d%s", run_dir, f"{n_params:,}",
                len(splits["train"]), len(eval_split), f" | resuming from {resume_from.name}" if resume_from else "")

    # ---- Trainer ----
    precision = train_args.mixed_precision()
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # the flags win over `accelerate launch --mixed_precision`
    greater_is_better = not train_args.metric_for_best_model.endswith("loss")
    run_name = train_args.run_name or run_dir.parent.name
    hf_report, report_callbacks = _report_callbacks(train_args.report_to, run_dir, run_name, state.is_main_process)
    args = TrainingArguments(
        output_dir=str(run_dir),
        run_name=run_name,
        max_steps=train_args.max_steps,
        per_device_train_batch_size=train_args.per_device_batch_size,
        per_device_eval_batch_size=train_args.per_device_eval_batch_size or train_args.per_device_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        learning_rate=train_args.learning_rate,
        lr_scheduler_type=train_args.lr_scheduler_type,
        warmup_steps=train_args.warmup_steps,
        weight_decay=train_args.weight_decay,
        adam_beta1=train_args.adam_beta1,
        adam_beta2=train_args.adam_beta2,
        adam_epsilon=train_args.adam_epsilon,
        max_grad_norm=train_args.max_grad_norm,
        bf16=precision == "bf16",
        tf32=train_args.tf32 if torch.cuda.is_available() else None,
        eval_strategy="steps",
        eval_steps=train_args.eval_steps,
        eval_on_start=resume_from is None,
        save_strategy="steps",
        save_steps=train_args.eval_steps,
        save_total_limit=2,  # the latest (to resume) and the best; 1 would delete the latest at the end
        load_best_model_at_end=True,
        metric_for_best_model=train_args.metric_for_best_model,
        greater_is_better=greater_is_better,
        logging_steps=train_args.logging_steps,
        report_to=hf_report or "none",
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient (see parameters_without_gradient)
        ddp_broadcast_buffers=False,  # the models' buffers are constants (rotary frequencies): no broadcast per forward
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=train_args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not train_args.use_cpu,
        use_cpu=train_args.use_cpu,
        disable_tqdm=not sys.stderr.isatty(),  # progress bars only on a terminal, not in log files
        seed=train_args.seed,
    )
    _use_one_gpu_per_process(args)
    callbacks = list(report_callbacks) + list(extra_callbacks) + [NonFiniteGuardState()]
    early_stopping = None
    if train_args.early_stopping_patience > 0:
        early_stopping = EarlyStoppingCallback(early_stopping_patience=train_args.early_stopping_patience)
        callbacks.append(early_stopping)
    if train_args.stop_metric_value is not None:
        callbacks.append(StopOnMetricValue(train_args.stop_metric, train_args.stop_metric_value))
    if train_args.max_train_minutes is not None:
        callbacks.append(StopAfterWallTime(train_args.max_train_minutes))
    rollback = None
    if train_args.collapse_ratio > 0:
        rollback = CollapseRollback(train_args.metric_for_best_model, ratio=train_args.collapse_ratio,
                                    max_rollbacks=train_args.max_rollbacks)
        callbacks.append(rollback)
    trainer = GradMemTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=splits["train"],
        eval_dataset=eval_split,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: reduce_logits_to_predictions(
            logits, labels, next_token_logits=next_token_logits),
        callbacks=callbacks,
        optimizer_cls_and_kwargs=(NonFiniteStepSkippingAdamW, optimizer_kwargs(train_args, nonfinite_hint)),
        early_stopping=early_stopping,
        fast_step=train_args.fast_step,
        rollback=rollback,
    )

    if state.is_main_process:
        logger.info("%s", setup_line(trainer, precision, train_args.fast_step))

    # ---- train, then evaluate the best checkpoint ----
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trained = time.monotonic()
    trainer.remove_callback(EarlyStoppingCallback)  # training is over: no "metric not found" on test evaluations
    test_split = splits["test"] if "test" in splits and len(splits["test"]) > 0 else None
    metrics = {} if train_args.final_evaluation else selected_evaluation(trainer.state)
    if not metrics:  # evaluated after training (or never evaluated during it)
        metrics = evaluate_splits(trainer, eval_split, test_split, answer_metrics)
    best, final = trainer.state.best_model_checkpoint, newest_usable_checkpoint(run_dir)
    if (train_args.final_evaluation and final is not None and best is not None
            and final.resolve() != Path(best).resolve()):
        model = trainer.accelerator.unwrap_model(trainer.model)
        best_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        restore_checkpoint_in_place(model, None, final)
        metrics.update(evaluate_splits(trainer, eval_split, test_split, answer_metrics, prefix="final_"))
        metrics["final_checkpoint"] = str(final)
        model.load_state_dict(best_weights)
    metrics["train_wall_s"] = round(trained - started, 2)  # trainer.train(), its evaluations and checkpoints included
    metrics["final_evaluation_wall_s"] = round(time.monotonic() - trained, 2)
    guard = trainer._step_guard()
    metrics["skipped_steps"] = guard.skipped_steps if guard is not None else 0
    if guard is not None and guard.spike_guard.enabled:
        metrics["spike_skipped_steps"] = int(guard.spike_guard.spikes)
    if trainer.rollback is not None:
        metrics["rollbacks"] = trainer.rollback.rollbacks
    metrics["global_step"] = trainer.state.global_step
    metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    # the selected model at the run root (config with the backbone's, weights, tokenizer): from_pretrained(run_dir)
    # needs nothing else. Every process calls it; the main one writes.
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        plot_learning_curve(trainer.state.log_history, run_dir / CURVE_FILE, title=f"{data_name} / {run_name}")
        logger.info("results of %s (all of them in all_results.json):\n%s", run_dir, final_table(metrics))
    return metrics
