"""A whole GradMem training step recorded once in a CUDA graph and replayed: the fast path on CUDA.

One training step is WRITE (K inner steps, each differentiated again for the second-order meta-gradient), READ, the
outer loss, its backward, gradient clipping and the AdamW step. Run eagerly it is thousands of small kernels, each
launched from Python, plus host synchronisations inside transformers; at the paper's KV scale (context ~128 tokens,
batch 64) those launches, not the arithmetic, set the step time. `CapturedTrainStep` records the step once per input
shape in a CUDA graph and replays it: one launch per step and no host synchronisation.

What makes the step capturable (and what it changes):
- Static shapes: the batch is copied into input buffers of fixed shape ([B, S] context, [B, Q] query and labels).
  A new shape gets a graph of its own (up to `max_graphs`, then the step runs eagerly, with one log line). KV data
  of one N has one context length, so with the collator's padding to a multiple of 8 every batch has one shape.
- No host synchronisation in the step: the model gets its causal mask as a ready 4D tensor
  (`use_static_causal_mask` of modeling_utils.StaticCausalMask, same function as the mask transformers builds);
  model stats are tensors. Models: GradMemGPT and RMT2Segm (each says with captured_step_problem() when it cannot),
  and the full-context Llama and Mamba through modeling_utils.FullContextStep (the causal mask alone on right-padded
  batches: the same loss and gradients, see its docstring).
- Optimiser: the trainer's torch AdamW (or subclass), run with `capturable=True` (step counters on the GPU) and its
  learning rate held in a GPU tensor per param group. The scheduler's new value is copied into that tensor before
  every replay, so schedules work unchanged; the optimiser's state_dict keeps torch's AdamW format.
- Non-finite steps are skipped inside the graph: finite = isfinite(loss) and isfinite(grad norm before clipping);
  parameters and AdamW state are restored with torch.where when not finite. Device counters hold the number of
  skipped steps and the longest run of consecutive skips; `skip_counts()` reads them (one host sync, call it when
  logging) so a caller can stop on too many skips in a row, as the eager trainer does. With a `spike_guard`
  (guards.GradNormSpikeGuard), a step whose gradient norm is far above the running median is skipped the same way.

Precision modes (`precision`):
    fp32  strict fp32 (TF32 off for matmuls and cuDNN while recording): the same numbers as the eager fp32 step.
    tf32  TF32 tensor-core matmuls (and TF32 dot products in the fused attention kernels).
    bf16  bf16 autocast of the forward (and WRITE's inner backward); weights, gradients and AdamW state stay fp32.
          The matmuls autocast leaves in fp32 (the lean ops' backward computes in fp32) use TF32: with strict fp32
          they ran on FFMA, not tensor cores (the H200 profile in bench/README).

Use:
    step = CapturedTrainStep(model, optimizer, max_grad_norm=1.0, precision="fp32")
    for batch in batches:                 # dict of context_input_ids, query_input_ids, labels on the GPU
        scheduler.step() ... out = step(batch)   # out.loss, out.grad_norm, out.finite, out.stats (GPU tensors)
`fast_path_problem(...)` says why the fast path cannot be used (then train eagerly; the caller logs the reason).
The tensors of a StepOutput are a fresh copy after each step (one copy kernel), safe to keep.

Several processes (data parallel, `process_group`): after the backward, the gradients and the loss of every process
are averaged with one NCCL all-reduce of a flat buffer, recorded inside the graph (what DDP does, without its
hooks: the model is run unwrapped); clipping, the finite check and AdamW then see the same numbers on every process.
WRITE's inner gradients stay local to each process.

Measured on 2 H100s (bench/check_ddp.py): the captured step with its in-graph NCCL all-reduce, each GPU with half
the batch, equals the eager one-GPU step (gradient 2.1e-7, update 3.3e-5 relative error, the round-off of splitting
the batch).
A model that DDP has wrapped can be trained this way too (the step runs the unwrapped module, so DDP's hooks stay
idle), with one condition: DDP's reducer keeps every parameter's AccumulateGrad node alive, and that node remembers
the stream current when DDP was built. Recording on a different stream then fails (cudaErrorStreamCaptureImplicit).
So build the DDP wrapper and run the steps inside one `with torch.cuda.stream(s):` (s not the default stream):
CapturedTrainStep warms up and records on the caller's stream whenever that is not the default stream.
training_loop.GradMemTrainer does this under several processes.

In the trainer (training_loop.GradMemTrainer, `--fast_step auto`, the default) every training step goes through a
CapturedTrainStep on one CUDA device; the HF loop's own clipping and optimizer step are then skipped for that step,
the scheduler keeps setting the learning rate, and skipped steps are counted per step (one host read of the finite
flag) so `--max_consecutive_skipped_steps` still stops a diverging run. Under several processes (DDP) the step
averages over torch.distributed's WORLD group, and the trainer runs its training loop on a side stream (see above).
Without CUDA, with gradient accumulation, write LoRA or gradient checkpointing, the trainer logs why and runs the eager
step unchanged.
Measured (bench/results/step_h100.md, one H100, C=128, B=64): 31.5 ms per step in strict fp32 instead of ~116 ms,
gradients equal to the eager step to 1e-8; TF32 ~21-25 ms, bf16 18-23 ms (step_h100_long_context.md).
"""
import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from modeling_utils import FullContextStep

logger = logging.getLogger("gradmem")

PRECISIONS = ("fp32", "tf32", "bf16")
INPUT_NAMES = ("context_input_ids", "query_input_ids", "labels")


@dataclass
class StepOutput:
    loss: torch.Tensor  # [] fp32, the outer loss of this step (the mean over the processes under data parallel)
    grad_norm: torch.Tensor  # [] L2 norm of the gradients before clipping
    finite: torch.Tensor  # [] 1.0 if loss and gradients were finite, else 0.0 (the step was skipped)
    spike: torch.Tensor  # [] 1.0 if the step was skipped as a gradient-norm spike (guards.GradNormSpikeGuard)
    stats: dict  # name -> [] fp32, the model's stats of this step


@contextlib.contextmanager
def precision_flags(precision: str):
    """TF32 on for "tf32" and "bf16" (for the matmuls autocast leaves in fp32), off for "fp32" (matmuls and cuDNN);
    restores the previous flags."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    # torch's fp32_precision API: reading the legacy allow_tf32 flags raises once anything (e.g. the HF Trainer's
    # tf32=True) has used the new one.
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee" if precision == "fp32" else "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def autocast_for(precision: str, device_type: str = "cuda"):
    """bf16 autocast for "bf16" (cache off, as CUDA graphs need), nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def fast_path_problem(model: torch.nn.Module, optimizer=None, *, gradient_accumulation_steps: int = 1,
                      world_size: int = 1) -> Optional[str]:
    """Why the captured step cannot train this model (None if it can): the reason is for a log line."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not all(p.is_cuda for p in params):
        return "the model is not on a CUDA device"
    return _step_problem(model, optimizer, gradient_accumulation_steps, world_size)


def step_module(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module whose forward is the recorded step: a memory model itself (it has the captured_step_problem()
    hook), a full-context Llama or Mamba wrapped in modeling_utils.FullContextStep; None for any other model."""
    if hasattr(model, "captured_step_problem"):
        return model
    return FullContextStep(model) if FullContextStep.problem(model) is None else None


def _step_problem(model, optimizer, gradient_accumulation_steps: int = 1, world_size: int = 1) -> Optional[str]:
    """Why CapturedTrainStep's code (captured or eager) cannot run this training setup, on any device."""
    hook = getattr(model, "captured_step_problem", None)  # a memory model's; a full-context LM is checked as wrapped
    problem = hook() if hook is not None else FullContextStep.problem(model)
    if problem is not None:
        return problem
    if gradient_accumulation_steps != 1:
        return f"gradient accumulation ({gradient_accumulation_steps} micro-batches per step)"
    if world_size != 1:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return f"{world_size} processes but no initialised torch.distributed process group"
        if next(model.parameters()).is_cuda and dist.get_backend() != "nccl":
            return f"the process group's backend is {dist.get_backend()}, not nccl (needed inside a CUDA graph)"
    if optimizer is not None and not isinstance(optimizer, torch.optim.AdamW):
        return f"the optimizer is {type(optimizer).__name__}, not torch AdamW"
    if optimizer is not None and any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable")
                                      for g in optimizer.param_groups):
        return "AdamW with amsgrad/maximize/differentiable"
    return None


class CapturedTrainStep:
    """A full training step (forward, backward, clipping, AdamW step with non-finite skipping), recorded in a CUDA
    graph per input shape (`use_cuda_graph=True`, CUDA only) or run eagerly with the same sync-free code (False; on
    the CPU, where AdamW cannot be capturable, the optimiser keeps its plain settings).

    model:          a memory model with the captured_step_problem() hook (GradMemGPT, RMT2Segm), or a full-context
                    Llama or Mamba (run through modeling_utils.FullContextStep), on CUDA, in train mode.
    optimizer:      torch.optim.AdamW (or subclass) over the model's trainable parameters; switched to capturable
                    with GPU learning-rate tensors (its state_dict format is unchanged).
    max_grad_norm:  clip the global L2 norm of the gradients to this (<= 0: no clipping).
    precision:      "fp32" (strict), "tf32" or "bf16" (autocast, fp32 master weights); see the module docstring.
    max_graphs:     how many input shapes get a graph; further shapes run eagerly (logged once per shape).
    warmup:         eager iterations before recording (initialises kernels, autotuning, optimiser state, the
                    NCCL communicator); their effect on parameters and optimiser state is undone.
    spike_guard:    a guards.GradNormSpikeGuard on the model's device (checked inside the graph), or None; a step
                    it flags is skipped like a non-finite one.
    process_group:  data-parallel training: average the gradients and the loss over this torch.distributed group
                    after the backward (e.g. torch.distributed.group.WORLD); every process must hold the same
                    parameters and call the step with its own rows. None: one process.
    """

    def __init__(self, model, optimizer, max_grad_norm: float = 1.0, precision: str = "fp32",
                 use_cuda_graph: bool = True, max_graphs: int = 2, warmup: int = 2,
                 capture_error_mode: str = "thread_local", process_group=None, spike_guard=None):
        world_size = 1 if process_group is None else torch.distributed.get_world_size(process_group)
        problem = _step_problem(model, optimizer, world_size=world_size)
        if problem is None and use_cuda_graph:
            problem = fast_path_problem(model, optimizer, world_size=world_size)
        if problem is not None:
            raise ValueError(f"CapturedTrainStep cannot be used: {problem}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.model, self.optimizer = step_module(model), optimizer
        self.input_names = getattr(self.model, "step_input_names", INPUT_NAMES)
        self.max_grad_norm = float(max_grad_norm)
        self.precision = precision
        self.use_cuda_graph = use_cuda_graph
        self.max_graphs, self.warmup = max_graphs, warmup
        self.capture_error_mode = capture_error_mode
        self.process_group, self.world_size = process_group, world_size
        self.spike_guard = spike_guard
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if {id(p) for p in self.params} != trainable:
            raise ValueError("the optimizer must hold exactly the model's trainable parameters")
        self.model.use_static_causal_mask = True
        self._make_optimizer_capturable()
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        self._skipped, self._consecutive, self._longest_run = zero.clone(), zero.clone(), zero.clone()
        self._graphs = {}  # shape key -> (graph, static inputs, packed outputs, stat names)
        self._eager_shapes = set()

    # ------------------------------------------------------------------------------------------------------------
    # optimiser

    def _make_optimizer_capturable(self):
        """CUDA: capturable=True, step counters as GPU tensors, lr as a GPU tensor per group (kept in sync by
        _sync_lr). Every device: the AdamW state is created now (zero moments, step 0, as AdamW's first step would)."""
        capturable = self.device.type == "cuda"
        self._lr_tensors = []
        for group in self.optimizer.param_groups:
            if capturable:
                group["capturable"] = True
                if not group.get("fused"):
                    group["foreach"] = True
                lr = group["lr"]
                if not (isinstance(lr, torch.Tensor) and lr.device == self.device):
                    group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
                self._lr_tensors.append(group["lr"])
            step_device = self.device if capturable else "cpu"
            for p in group["params"]:
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(step_device)

    def _sync_lr(self):
        """A scheduler may have replaced a group's lr by a float: copy it into the GPU tensor the graph reads."""
        for group, lr_tensor in zip(self.optimizer.param_groups, self._lr_tensors):
            lr = group["lr"]
            if lr is not lr_tensor:
                lr_tensor.fill_(float(lr))
                group["lr"] = lr_tensor

    def _step_tensors(self) -> dict:
        """Everything an optimiser step changes (parameters, AdamW state), grouped by device and dtype."""
        tensors = [p.data for p in self.params]
        tensors += [t for p in self.params for t in self.optimizer.state[p].values() if isinstance(t, torch.Tensor)]
        groups = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        return groups

    def _snapshot(self) -> list:
        """[(live tensors, one flat copy of them)] per dtype: a few kernels however many tensors there are."""
        return [(live, torch.cat([t.detach().reshape(-1) for t in live])) for live in self._step_tensors().values()]

    @staticmethod
    def _restore(snapshot: list, keep: Optional[torch.Tensor] = None):
        """Copy the snapshot back; with `keep` (a bool tensor), only where keep is False (torch.where, no sync)."""
        with torch.no_grad():
            for live, saved in snapshot:
                if keep is not None:
                    saved = torch.where(keep, torch.cat([t.reshape(-1) for t in live]), saved)
                torch._foreach_copy_(live, [v.view_as(t) for v, t in zip(saved.split([t.numel() for t in live]), live)])

    # ------------------------------------------------------------------------------------------------------------
    # the step

    def _body(self, **inputs):
        """The whole step, without host synchronisation. Returns (packed scalar outputs [3 + n_stats], stat names)."""
        for p in self.params:
            p.grad = None
        with precision_flags(self.precision):
            with autocast_for(self.precision):
                out = self.model(**inputs)
            loss = out.loss.float()
            loss.backward()
            if self.process_group is not None:
                loss = self._average_over_processes(loss)
            grads = [p.grad for p in self.params if p.grad is not None]
            with torch.no_grad():
                if self.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                spike = torch.zeros_like(finite)
                if self.spike_guard is not None:
                    spike = self.spike_guard.check(grad_norm)
                before = self._snapshot()
                torch.optim.AdamW.step(self.optimizer)
                self._restore(before, keep=finite & ~spike)  # undo a non-finite or spike step
                skipped = (~finite).long()
                self._skipped.add_(skipped)
                self._consecutive.mul_(skipped).add_(skipped)
                torch.maximum(self._longest_run, self._consecutive, out=self._longest_run)
                stats = getattr(out, "stats", None) or {}  # a full-context LM has none
                names = sorted(stats)
                packed = torch.stack([loss.detach(), grad_norm.float(), finite.float(), spike.float()]
                                     + [stats[n].float() for n in names])
        return packed, names

    def _average_over_processes(self, loss: torch.Tensor) -> torch.Tensor:
        """Average every parameter's gradient (zeros where a process has none) and the loss over the process group
        with one all-reduce of a flat buffer (torch.cat promotes to the widest dtype), as DDP does. Returns the
        averaged loss."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        torch.distributed.all_reduce(flat.div_(self.world_size), group=self.process_group)
        values = flat.split([g.numel() for g in grads] + [1])
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(values, grads)])
        return values[-1].reshape(()).to(loss.dtype)

    def _shape_key(self, batch: dict) -> tuple:
        missing = [n for n in self.input_names if batch.get(n) is None]
        if missing:
            raise ValueError(f"the batch lacks {missing}; a training step needs {self.input_names}")
        return tuple((n, tuple(batch[n].shape), batch[n].dtype) for n in self.input_names)

    def _record(self, key: tuple, batch: dict):
        static = {n: batch[n].to(self.device, copy=True) for n in self.input_names}
        snapshot = self._snapshot()
        counters = [(t, t.clone()) for t in (self._skipped, self._consecutive, self._longest_run)]
        if self.spike_guard is not None:
            counters += [(t, t.clone()) for t in self.spike_guard.live_tensors()]
        current = torch.cuda.current_stream(self.device)
        # Warm up and record on a side stream, as CUDA graphs need. If the caller already runs on one (the trainer
        # under DDP does: see the module docstring), use it: autograd nodes that outlive a step, such as the
        # AccumulateGrad nodes DDP keeps, remember the stream they were made on, and a backward recorded on another
        # stream would make that stream wait on the capture (cudaErrorStreamCaptureImplicit).
        on_side_stream = current != torch.cuda.default_stream(self.device)
        side = current if on_side_stream else torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # also creates the AdamW state, so it is not created inside the graph
                self._body(**static)
        current.wait_stream(side)
        self._restore(snapshot)  # undo the warm-up's updates of parameters, AdamW state and skip counters
        with torch.no_grad():
            for live, saved in counters:
                live.copy_(saved)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side if on_side_stream else None,
                              capture_error_mode=self.capture_error_mode):
            packed, names = self._body(**static)
        self._graphs[key] = (graph, static, packed, names)
        logger.info("fast_step: recorded a CUDA graph for input shapes %s (%s)",
                    {n: tuple(static[n].shape) for n in self.input_names}, self.precision)

    def __call__(self, batch: dict) -> StepOutput:
        """One training step on `batch`: a memory model's context_input_ids [B, S], query_input_ids [B, Q] and labels
        [B, Q], or a full-context LM's input_ids and labels [B, T] (other keys are not read)."""
        key = self._shape_key(batch)
        self._sync_lr()
        if self.use_cuda_graph and key not in self._graphs and len(self._graphs) < self.max_graphs:
            self._record(key, batch)
        if self.use_cuda_graph and key in self._graphs:
            graph, static, packed, names = self._graphs[key]
            for n in self.input_names:
                static[n].copy_(batch[n], non_blocking=True)
            graph.replay()
            packed = packed.clone()
        else:
            if self.use_cuda_graph and key not in self._eager_shapes:
                self._eager_shapes.add(key)
                logger.warning("fast_step: input shapes %s have no CUDA graph (%d recorded, max_graphs=%d): this "
                               "shape runs eagerly", {n: s for n, s, _ in key}, len(self._graphs), self.max_graphs)
            packed, names = self._body(**{n: batch[n].to(self.device, non_blocking=True) for n in self.input_names})
        return StepOutput(loss=packed[0], grad_norm=packed[1], finite=packed[2], spike=packed[3],
                          stats={n: packed[4 + i] for i, n in enumerate(names)})

    def skip_counts(self) -> dict:
        """{'skipped_steps', 'consecutive_skipped', 'longest_skip_run'} so far (one host synchronisation)."""
        counters = {"skipped_steps": self._skipped, "consecutive_skipped": self._consecutive,
                    "longest_skip_run": self._longest_run}
        if self.spike_guard is not None:
            counters["spike_skipped_steps"] = self.spike_guard.spikes
        return dict(zip(counters, torch.stack(list(counters.values())).tolist()))

    @property
    def recorded_shapes(self) -> list:
        return [{n: s for n, s, _ in key} for key in self._graphs]
