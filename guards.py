"""Training that does not collapse: skip gradient-norm spikes, roll back to the best checkpoint after a collapse.

Two guards, each counted and logged whenever it acts:
- `GradNormSpikeGuard` (every step): a step whose gradient norm (before clipping) is above `factor` x the median of
  the last `window` norms, and above `floor` (the trainer's clipping norm), is skipped, as a non-finite step is. A norm
  at or below the clipping norm makes an update no larger than a clipped ordinary one; without the floor, a run whose
  loss nears zero has a tiny median and skips ordinary steps. Its state lives in device tensors and the check needs no
  host synchronisation, so the captured CUDA-graph step (fast_step.py) runs it inside the graph; the eager optimiser
  runs the same code. Every norm enters the window, skipped ones too, so a lasting change of scale is followed after
  about window / 2 steps instead of being skipped forever.
- `CollapseRollback` (every evaluation): when the selection metric falls below `ratio` x its best value (once the
  best is at least `min_best`), or the evaluation loss is not finite, the model and optimiser go back to the best
  checkpoint and the learning rate is multiplied by `lr_factor`; after `max_rollbacks` the run stops. A run resumed
  on another machine may lack its best checkpoint: it rolls back to the best saved one that was not collapsed, and
  stops when there is none (training on from a collapse only wastes the GPU and overwrites the good checkpoints).
"""
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from training_runs import checkpoint_folders, checkpoint_step

logger = logging.getLogger("gradmem")


class GradNormSpikeGuard:
    """Running-median spike test of the gradient norm, in device tensors (capturable, no host sync).

    factor <= 0 turns the test off (no step is a spike). The first `min_history` steps are never spikes, nor is a norm
    at or below `floor`.
    """

    def __init__(self, factor: float = 0.0, window: int = 200, min_history: int = 50, floor: float = 0.0,
                 device="cpu"):
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"spike guard: need window >= 1 and 1 <= min_history <= window, got {window}, {min_history}")
        if not (math.isfinite(factor) and math.isfinite(floor) and floor >= 0):
            raise ValueError(f"spike guard: factor and floor must be finite, floor >= 0, got {factor}, {floor}")
        self.factor, self.window, self.min_history = float(factor), int(window), int(min_history)
        self.floor = float(floor)
        self.history = torch.full((self.window,), float("nan"), device=device)  # recent norms, nan = empty slot
        self.position = torch.zeros((), dtype=torch.int64, device=device)  # norms seen so far
        self.spikes = torch.zeros((), dtype=torch.int64, device=device)  # steps skipped as spikes

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def check(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Is this step's norm (a 0-d tensor) a spike? Records it. Returns a 0-d bool tensor (never True for a
        non-finite norm: that step is skipped as non-finite)."""
        grad_norm = grad_norm.detach().float().to(self.history.device)
        if not self.enabled:
            return torch.zeros((), dtype=torch.bool, device=self.history.device)
        seen = (~torch.isnan(self.history)).sum()
        spike = ((seen >= self.min_history) & torch.isfinite(grad_norm) & (grad_norm > self.floor)
                 & (grad_norm > self.factor * torch.nanmedian(self.history)))
        value = torch.where(torch.isfinite(grad_norm), grad_norm, torch.full_like(grad_norm, float("nan")))
        self.history.index_copy_(0, self.position.remainder(self.window).view(1), value.view(1))
        self.position.add_(1)
        self.spikes.add_(spike.long())
        return spike

    def live_tensors(self) -> tuple:
        """The live state tensors (what a recorded graph reads and writes)."""
        return self.history, self.position, self.spikes

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "position": self.position.clone(), "spikes": self.spikes.clone()}

    def load_state_dict(self, state: dict) -> None:
        """In place: a recorded CUDA graph keeps reading the same tensors."""
        saved = state["history"]
        if saved.numel() != self.window:  # another window: keep the newest norms that fit
            saved = torch.cat([torch.full((self.window,), float("nan")), saved.float().cpu()])[-self.window:]
        self.history.copy_(saved)
        self.position.copy_(state["position"])
        self.spikes.copy_(state["spikes"])


class CollapseRollback(TrainerCallback):
    """At each evaluation: roll back to the best checkpoint when the run has collapsed (see the module docstring).

    The rollback copies the best checkpoint's weights and AdamW state into the live tensors (in place, so a recorded
    CUDA graph keeps working), scales every learning rate by `lr_factor` from then on, and appends a record
    {"rollback": n, "step", "from_checkpoint", "metric", "best", "lr_scale"} to the log history.
    """

    def __init__(self, metric: str = "exact_match", ratio: float = 0.5, min_best: float = 0.2,
                 lr_factor: float = 0.5, max_rollbacks: int = 3):
        if not 0 < ratio < 1 or not 0 < lr_factor <= 1 or max_rollbacks < 1:
            raise ValueError("rollback: need 0 < ratio < 1, 0 < lr_factor <= 1 and max_rollbacks >= 1")
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.ratio, self.min_best, self.lr_factor, self.max_rollbacks = ratio, min_best, lr_factor, max_rollbacks
        self.ratio_test = not self.key.endswith("loss")  # for a loss metric only a non-finite eval loss counts
        self.rollbacks = 0
        self.best = None

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume: the rollbacks and the best value so far come back from the log history."""
        self.rollbacks = sum(1 for record in state.log_history if "rollback" in record)
        values = [r[self.key] for r in state.log_history if r.get(self.key) is not None and "step" in r
                  and r["step"] > 0 and math.isfinite(r[self.key])]
        self.best = max(values) if values else None

    def collapsed(self, metrics: dict) -> Optional[str]:
        """Why this evaluation counts as a collapse, or None. Updates the best value seen."""
        value, loss = metrics.get(self.key), metrics.get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            return f"eval_loss {loss}"
        if value is None or not self.ratio_test:
            return None
        if not math.isfinite(value):
            return f"{self.key} {value}"
        if self.best is not None and self.best >= self.min_best and value < self.ratio * self.best:
            return f"{self.key} {value:.4f} < {self.ratio:g} x best {self.best:.4f}"
        self.best = value if self.best is None else max(self.best, value)
        return None

    def rollback_target(self, args, state) -> Optional[Path]:
        """The best checkpoint; when it is not on disk (a run resumed on another machine), the saved checkpoint whose
        recorded metric is best and not itself collapsed; None when there is neither."""
        if state.best_model_checkpoint and Path(state.best_model_checkpoint).is_dir():
            return Path(state.best_model_checkpoint)
        if args is None:
            return None
        recorded = {r["step"]: r[self.key] for r in state.log_history
                    if r.get(self.key) is not None and "step" in r and math.isfinite(r[self.key])}
        usable = []
        for folder in checkpoint_folders(args.output_dir):
            value = recorded.get(checkpoint_step(folder))
            if value is None or not (folder / "model.safetensors").is_file():
                continue
            if self.ratio_test and self.best is not None and value < self.ratio * self.best:
                continue
            usable.append((value if self.ratio_test else -value, checkpoint_step(folder), folder))
        return max(usable)[2] if usable else None

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, lr_scheduler=None,
                    **kwargs):
        if state.global_step == 0 or not metrics:
            return
        reason = self.collapsed(metrics)
        if reason is None:
            return
        best = self.rollback_target(args, state)
        if best is None:
            logger.warning("collapse at step %d (%s) and no checkpoint to roll back to (the best one is not on disk, "
                           "nor another saved one that was not collapsed): stopping", state.global_step, reason)
            control.should_training_stop = True
            return
        if self.rollbacks >= self.max_rollbacks:
            logger.warning("collapse at step %d (%s) after %d rollbacks: stopping", state.global_step, reason,
                           self.rollbacks)
            control.should_training_stop = True
            return
        self.rollbacks += 1
        restore_checkpoint_in_place(model, optimizer, Path(best))
        scale = self.lr_factor ** self.rollbacks
        if lr_scheduler is not None:  # LambdaLR: lr = base_lr x lambda(step)
            lr_scheduler.base_lrs = [base * self.lr_factor for base in lr_scheduler.base_lrs]
        record = {"rollback": self.rollbacks, "step": state.global_step, "from_checkpoint": Path(best).name,
                  "reason": reason, "lr_scale": scale}
        state.log_history.append(record)
        logger.warning("collapse at step %d (%s): rolled back to %s, learning rate x%g from now on (rollback %d of "
                       "at most %d)", state.global_step, reason, Path(best).name, scale, self.rollbacks,
                       self.max_rollbacks)


def restore_checkpoint_in_place(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Copy a Trainer checkpoint's weights (model.safetensors) and AdamW state (optimizer.pt) into the live tensors."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    model = getattr(model, "module", model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in weights:
                tensor.copy_(weights[name])
    if optimizer is None or not (folder / "optimizer.pt").is_file():
        return
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimiser
    params = [p for group in inner.param_groups for p in group["params"]]
    with torch.no_grad():
        for index, param in enumerate(params):
            for key, value in saved["state"].get(index, {}).items():
                live = inner.state[param].get(key)
                if isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor):
                    live.copy_(value.to(live.dtype))
