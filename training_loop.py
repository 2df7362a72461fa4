"""The training loop: the Hugging Face Trainer subclass, its optimizer that skips non-finite steps, the callbacks
that stop a run, and the freezing of parameters that cannot receive a gradient (so DDP needs no unused-parameter
search).

The trainer knows no model: it reads the output contract of modeling_utils.MemoryModelOutput (loss, logits, stats)
and two optional hooks of a model: `parameters_without_gradient()` (names of trainable parameters the loss cannot
reach) and, through fast_step, `captured_step_problem()` (whether the whole step can be recorded in a CUDA graph).
"""
import logging
import time
from typing import Optional, Sequence

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from guards import CollapseRollback, GradNormSpikeGuard

logger = logging.getLogger("gradmem")


def parameters_without_gradient(model: torch.nn.Module) -> list:
    """Names of the trainable parameters that the training loss cannot reach in the model's configuration, decided
    by the model from its config alone (its `parameters_without_gradient()`; a model without that hook has none).

    DDP without find_unused_parameters (which costs a traversal of the autograd graph every step) needs every
    trainable parameter to receive a gradient in every step; run_experiment freezes these instead.
    """
    hook = getattr(model, "parameters_without_gradient", None)
    return list(hook()) if callable(hook) else []


def freeze_parameters_without_gradient(model: torch.nn.Module) -> list:
    """Freeze (requires_grad=False) the parameters named by parameters_without_gradient, with a log line; returns
    their names. Nothing changes numerically: they would get no gradient, and AdamW skips such parameters."""
    names = parameters_without_gradient(model)
    if not names:
        return []
    params = dict(model.named_parameters())
    if all(name in names for name, p in params.items() if p.requires_grad):
        raise ValueError(f"no parameter of this model can receive a gradient (unreachable: {', '.join(names)}); "
                         "e.g. GradMem with a frozen backbone and grad_mode none: use first/second or add the inner loss")
    for name in names:
        params[name].requires_grad_(False)
    logger.warning("%d parameter tensors cannot receive a gradient in this configuration and are frozen (so that "
                   "DDP runs without find_unused_parameters): %s", len(names), ", ".join(names))
    return names


class NonFiniteStepSkippingAdamW(torch.optim.AdamW):
    """AdamW that skips (never applies) a step whose gradients, or whose loss, are not finite, or whose gradient
    norm is a spike (guards.GradNormSpikeGuard, `spike_factor` > 0).

    Inner-loop divergence (too large an inner lr) shows up as inf/nan meta-gradients. Such steps are counted;
    `max_consecutive` non-finite skips in a row raise an error with `hint` (the likely cause). The learning-rate
    schedule still advances on a skipped step. The spike guard's state is part of state_dict() (resumes with the run).
    """

    def __init__(self, params, max_consecutive: int = 20, hint: str = "", spike_factor: float = 0.0,
                 spike_window: int = 200, spike_floor: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_consecutive = max_consecutive
        self.hint = hint
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.loss_is_finite = True  # set by the trainer for each optimizer step
        self.step_taken_by_fast_path = False  # set by the trainer when fast_step applied (or skipped) the step
        self.pre_clip_grad_norm = None  # set by the trainer when it clipped the gradients before step()
        device = next((p.device for group in self.param_groups for p in group["params"]), "cpu")
        self.spike_guard = GradNormSpikeGuard(spike_factor, spike_window, max(1, spike_window // 4), spike_floor,
                                              device=device)

    def state_dict(self):
        state = super().state_dict()
        state["spike_guard"] = self.spike_guard.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        guard = state_dict.pop("spike_guard", None)
        super().load_state_dict(state_dict)
        if guard is not None:
            self.spike_guard.load_state_dict(guard)

    def record_step(self, finite: bool) -> None:
        """Count an applied (finite) or skipped step; raise after max_consecutive skipped steps in a row."""
        if finite:
            self.consecutive_skipped = 0
            return
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        logger.warning("non-finite loss or gradients: optimizer step skipped (%d in a row, %d in total)",
                       self.consecutive_skipped, self.skipped_steps)
        if self.consecutive_skipped >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive_skipped} optimizer steps in a row had non-finite loss or gradients; training stopped. "
                f"{self.hint or 'Lower --learning_rate, or check the data.'}"
            )

    @torch.no_grad()
    def step(self, closure=None):
        if self.step_taken_by_fast_path:  # the captured step already applied or skipped it (and counted it)
            self.step_taken_by_fast_path = False
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = self.pre_clip_grad_norm
        self.pre_clip_grad_norm = None
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
        norm = torch.as_tensor(norm, dtype=torch.float32, device=self.spike_guard.history.device)
        finite = torch.isfinite(norm) if grads else torch.ones((), dtype=torch.bool, device=norm.device)
        finite = finite & bool(self.loss_is_finite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        self.loss_is_finite = True
        spike = bool(self.spike_guard.check(norm))  # the same norm on every process (gradients are reduced by now)
        self.record_step(bool(finite))
        if not bool(finite):
            return None
        if spike:
            logger.info("gradient norm %.3g is a spike (> %g x the running median): optimizer step skipped",
                        float(norm), self.spike_guard.factor)
            return None
        return super().step(closure)


class StopAfterWallTime(TrainerCallback):
    """Stop at the first optimizer step that ends after `minutes` of training (wall clock from the start of
    trainer.train(), evaluations included): that step is evaluated and checkpointed, so a run ends on time, with its
    last state saved to resume from and its best checkpoint selected as usual. Under several processes the main
    process decides and broadcasts, so every process stops at the same step."""

    clock = staticmethod(time.monotonic)

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            return
        elapsed = self.clock() - self.start
        stop = [elapsed >= self.seconds]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(stop, src=0)
        if stop[0]:
            logger.warning("--max_train_minutes %g: %.1f min of training at step %d: evaluating, saving and stopping",
                           self.seconds / 60, elapsed / 60, state.global_step)
            control.should_evaluate = control.should_save = control.should_training_stop = True


class StopOnMetricValue(TrainerCallback):
    """Stop training once an eval metric reaches a value (>= for accuracies, <= for losses). The evaluation at step 0
    never stops a run: a stop there would train one step and end without a checkpoint to resume or report."""

    def __init__(self, metric: str, value: float):
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.value = value
        self.lower_is_better = metric.endswith("loss")

    def reached(self, current: float) -> bool:
        return current <= self.value if self.lower_is_better else current >= self.value

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        current = (metrics or {}).get(self.key)
        if current is None or state.global_step == 0:
            return
        if self.reached(current):
            logger.warning("%s = %.4f reached %s %s: stopping", self.key, current,
                           "<=" if self.lower_is_better else ">=", self.value)
            control.should_training_stop = True


class NonFiniteGuardState(TrainerCallback, ExportableState):
    """Keeps the counters of the non-finite-step guard (NonFiniteStepSkippingAdamW) in every checkpoint's
    trainer_state.json and restores them on resume, so that skipped steps in a row are counted across a kill and a
    resume. A run whose every optimizer step was skipped trained nothing: that is an error, never a result."""

    COUNTERS = ("skipped_steps", "consecutive_skipped")

    def __init__(self):
        self.guard = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {name: getattr(self.guard, name, 0) for name in self.COUNTERS}}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        while optimizer is not None and not isinstance(optimizer, NonFiniteStepSkippingAdamW):
            optimizer = getattr(optimizer, "optimizer", None)
        self.guard = optimizer
        saved = state.stateful_callbacks.get(type(self).__name__)
        if self.guard is not None and isinstance(saved, dict):
            for name in self.COUNTERS:
                setattr(self.guard, name, int(saved.get("attributes", {}).get(name, 0)))
        # a checkpoint written before this callback existed has no entry, and Trainer._save_checkpoint expects one
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard is not None and 0 < state.global_step <= self.guard.skipped_steps:
            raise FloatingPointError(
                f"all {state.global_step} optimizer steps had non-finite loss or gradients and were skipped: nothing "
                f"was trained. {self.guard.hint or 'Lower --learning_rate, or check the data.'}")


def tied_parameter_names(model: torch.nn.Module, missing: Sequence[str]) -> set:
    """The `missing` names that are the same tensor as a parameter that is not missing (tied weights)."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = set(missing)
    return {name for names in names_of.values() if not set(names) <= missing for name in names if name in missing}


class GradMemTrainer(Trainer):
    """HF Trainer + model stats averaged into the training logs (over the logged steps and the processes), skipped-step and early-stopping counters in every
    log record, and the reference's schedule length (num_training_steps / 0.9: a decaying schedule ends at 10%)."""

    def __init__(self, *args, early_stopping: Optional[EarlyStoppingCallback] = None, fast_step: str = "off",
                 rollback: Optional[CollapseRollback] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.early_stopping = early_stopping
        self.rollback = rollback
        self._stat_sums: dict = {}
        self._stat_count = 0
        self.fast_step_mode = fast_step
        self._fast_step = None  # fast_step.CapturedTrainStep once decided on
        self._fast_step_decided = False
        self._fast_grad_norm = None
        self._training_stream = None  # the CUDA stream train() runs on under several processes

    def train(self, *args, **kwargs):
        """Under several processes with the captured step possible, the whole training loop (DDP's construction
        included) runs on one side stream: DDP keeps each parameter's AccumulateGrad node, which remembers the stream
        it was made on, and CapturedTrainStep can only record a backward through those nodes on that same stream
        (on a side stream, not the default one). See fast_step's module docstring."""
        if not (self.fast_step_mode != "off" and self.args.world_size > 1 and torch.cuda.is_available()
                and self.args.device.type == "cuda"):
            return super().train(*args, **kwargs)
        default = torch.cuda.current_stream(self.args.device)
        self._training_stream = torch.cuda.Stream(self.args.device)
        self._training_stream.wait_stream(default)
        try:
            with torch.cuda.stream(self._training_stream):
                return super().train(*args, **kwargs)
        finally:
            default.wait_stream(self._training_stream)

    def _run_epoch(self, *args, **kwargs):
        """No step past --max_steps: a run resumed from a checkpoint at --max_steps (killed while writing its results)
        goes straight on to the final evaluations, where the Trainer would first take one more step."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """As the Trainer's; metrics that callbacks add after the Trainer has logged the evaluation (the names in their
        `metric_names`, e.g. SQuAD EM/F1 of generated answers) are sent to the loggers (tensorboard, wandb) too."""
        metrics = super().evaluate(*args, **kwargs)
        names = {n for cb in self.callback_handler.callbacks for n in getattr(cb, "metric_names", ())}
        late = {k: v for k, v in metrics.items() if any(k.endswith("_" + n) for n in names)}
        if late:
            self.control = self.callback_handler.on_log(self.args, self.state, self.control, late)
        return metrics

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        return super().create_scheduler(int(num_training_steps / 0.9), optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """As the Trainer's, with the scheduler's last lrs saved as floats. The captured step (fast_step) holds each
        group's lr as a GPU tensor, which the scheduler keeps as its last lrs; saved as they are, a checkpoint's
        scheduler.pt loads only where a GPU is (the Trainer loads it with no map_location), so a run trained on a GPU
        could not be resumed on a CPU machine."""
        scheduler = self.lr_scheduler
        last = getattr(scheduler, "_last_lr", None)
        if last is not None:
            scheduler._last_lr = [float(lr) for lr in last]
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            if last is not None:
                scheduler._last_lr = last

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        stats = outputs.get("stats") if isinstance(outputs, dict) else None
        if model.training and stats:
            self._add_stats(stats)
        return (loss, outputs) if return_outputs else loss

    def _add_stats(self, stats: dict) -> None:
        for name, value in stats.items():
            value = value.detach().float()
            self._stat_sums[name] = self._stat_sums.get(name, 0.0) + value
        self._stat_count += 1

    def _captured_step(self, model):
        """The fast_step.CapturedTrainStep for this run, or None (decided at the first step, with a log line)."""
        if self._fast_step_decided:
            return self._fast_step
        self._fast_step_decided = True
        from fast_step import CapturedTrainStep, fast_path_problem

        guard = self._step_guard()
        if self.fast_step_mode == "off":
            problem = "--fast_step off"
        elif guard is None:
            problem = "the optimizer is not NonFiniteStepSkippingAdamW"
        else:
            problem = fast_path_problem(self.accelerator.unwrap_model(model), guard,
                                        gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                                        world_size=self.args.world_size)
            if problem is None and self.args.world_size > 1 and self._training_stream is None:
                problem = "several processes, but the step is not taken inside GradMemTrainer.train (no side stream)"
        if problem is not None:
            stated = self.fast_step_mode == "off" or self.args.device.type != "cuda"  # in run_experiment's setup line
            logger.log(logging.DEBUG if stated else logging.INFO, "fast step off (%s): training steps run eagerly",
                       problem)
            return None
        precision = "bf16" if self.args.bf16 else "tf32" if self.args.tf32 else "fp32"
        # Several processes: the step averages gradients and loss over WORLD itself (one all-reduce inside the graph)
        # and runs the unwrapped model, so DDP's hooks stay idle.
        group = torch.distributed.group.WORLD if self.args.world_size > 1 else None
        self._fast_step = CapturedTrainStep(self.accelerator.unwrap_model(model), guard,
                                            max_grad_norm=self.args.max_grad_norm, precision=precision,
                                            process_group=group,
                                            spike_guard=guard.spike_guard if guard.spike_guard.enabled else None)
        logger.info("fast step on: each training step is recorded once per input shape in a CUDA graph and "
                    "replayed (precision %s; --fast_step off for eager steps)", precision)
        return self._fast_step

    def _issue_warnings_after_load(self, load_result) -> None:
        """No alarm for tied weights (lm_head = embeddings): they are saved under one name, the other is "missing"."""
        tied = tied_parameter_names(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
        missing = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _clip_grad_norm(self, model):
        if self._fast_grad_norm is not None:  # the captured step clipped already: report its pre-clip norm
            grad_norm, self._fast_grad_norm = self._fast_grad_norm, None
            return grad_norm
        grad_norm = super()._clip_grad_norm(model)
        guard = self._step_guard()
        if guard is not None:  # the spike test needs the norm before clipping
            guard.pre_clip_grad_norm = grad_norm
        return grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        fast = self._captured_step(model)
        if fast is not None:
            model.train()
            out = fast(self._prepare_inputs(inputs))
            self._add_stats(out.stats)
            self._fast_grad_norm = out.grad_norm
            guard = self._step_guard()
            guard.step_taken_by_fast_path = True
            guard.record_step(bool(out.finite))  # one host read per step (the spike count stays on the device)
            return out.loss
        loss = super().training_step(model, inputs, num_items_in_batch)
        guard = self._step_guard()
        if guard is not None and not torch.isfinite(loss):
            guard.loss_is_finite = False
        return loss

    def _step_guard(self) -> Optional[NonFiniteStepSkippingAdamW]:
        opt = self.optimizer
        while opt is not None and not isinstance(opt, NonFiniteStepSkippingAdamW):
            opt = getattr(opt, "optimizer", None)
        return opt

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log record
            if self._stat_count:
                names = sorted(self._stat_sums)
                means = torch.stack([self._stat_sums[name] / self._stat_count for name in names])  # over the steps
                for name, value in zip(names, _reduce_stats_across_processes(names, means).tolist()):
                    logs[name] = round(value, 6)
                self._stat_sums, self._stat_count = {}, 0
            guard = self._step_guard()
            if guard is not None:
                logs["skipped_steps"] = guard.skipped_steps
                if guard.spike_guard.enabled:
                    logs["spike_skipped_steps"] = int(guard.spike_guard.spikes)
            if self.rollback is not None:
                logs["rollbacks"] = self.rollback.rollbacks
        if self.early_stopping is not None:
            logs["patience"] = self.early_stopping.early_stopping_patience_counter
        super().log(logs, *args, **kwargs)


def _reduce_stats_across_processes(names: list, values: torch.Tensor) -> torch.Tensor:
    """One value per stat over all processes (every process logs at the same steps): max of *_max, min of *_min,
    mean of the rest, as reduce_stats does over evaluation batches. values [S] -> [S]."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    gathered = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, values)
    gathered = torch.stack(gathered)  # [P, S]
    return torch.stack([gathered[:, i].max() if name.endswith("_max") else
                        gathered[:, i].min() if name.endswith("_min") else gathered[:, i].mean()
                        for i, name in enumerate(names)])

