"""A second-order WRITE step that keeps no graph: recomputed inside the outer backward.

A differentiated WRITE step normally keeps its whole double-backward graph (the inner forward's activations, the inner
backward's intermediates) until the outer backward reaches it, so second-order training holds K such graphs at once.
`recomputed_step` runs the step without a graph and saves only its inputs; when the outer backward arrives, it runs
the step again with create_graph=True and backpropagates the incoming gradients through it at once. At most one
step's graph is alive at a time (memory independent of K), for one more inner forward and backward per step.

The gradients are those of the stored-graph step (float32/float64; within rounding under bf16 autocast): the
recomputation replays the autocast state of the first run, as the backward runs on autograd's own thread, where
autocast is off, and, when the step draws random numbers (dropout; `replay_rng`), the random state. Without the random
state the node can be recorded in a CUDA graph (reading or setting a generator's state cannot be). The outer backward
cannot itself be differentiated (no third derivatives).
"""
from contextlib import ExitStack, nullcontext
from typing import Callable, List, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

# step(fast, state, context_embeds, create_graph) -> (new fast, new state, per-sample losses [B], inner grads)
Step = Callable[[List[torch.Tensor], List[torch.Tensor], torch.Tensor, bool],
                Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor, Sequence[torch.Tensor]]]


def recomputed_step(step: Step, fast: Sequence[torch.Tensor], state: Sequence[torch.Tensor],
                    context_embeds: torch.Tensor, params: Sequence[torch.Tensor], replay_rng: bool = True):
    """Run `step` once without a graph; the outputs are connected to fast, state, context_embeds and params (the
    trainable tensors the step uses through the model) by one node that recomputes the step in the backward.
    replay_rng: save the random state and recompute under it (needed when the step draws random numbers; False only
    for a step that draws none, whose node a CUDA graph can record). Returns (new fast, new state, losses [B], inner
    gradients detached)."""
    n_fast, n_state = len(fast), len(state)
    outputs = _RecomputedStep.apply(step, n_fast, n_state, replay_rng, *fast, *state, context_embeds, *params)
    new_fast, rest = list(outputs[:n_fast]), outputs[n_fast:]
    n_new_state = len(rest) - 1 - n_fast  # Adam creates its moments on the first step
    return new_fast, list(rest[:n_new_state]), rest[n_new_state], list(rest[n_new_state + 1:])


class _RecomputedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, n_fast, n_state, replay_rng, *inputs):
        ctx.step, ctx.n_fast, ctx.n_state, ctx.replay_rng = step, n_fast, n_state, replay_rng
        if replay_rng:
            ctx.devices = sorted({t.device for t in inputs if t.device.type == "cuda"}, key=str)
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in ("cpu", "cuda")]
        ctx.params = inputs[n_fast + n_state + 1:]  # the module's own parameters: the recomputation uses them
        ctx.save_for_backward(*inputs[:n_fast + n_state + 1])
        fast, state, embeds = _split(inputs, n_fast, n_state)
        with torch.enable_grad():
            new_fast, new_state, losses, grads = step([f.detach().requires_grad_() for f in fast],
                                                      [s.detach() for s in state], embeds.detach(), False)
        grads = [g.detach() for g in grads]
        ctx.mark_non_differentiable(*grads)
        return (*[t.detach() for t in new_fast], *[t.detach() for t in new_state], losses.detach(), *grads)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        needs = ctx.needs_input_grad[4:]
        # fresh leaves of the saved inputs; fast always requires grad (the inner gradient is taken w.r.t. it)
        leaves = [t.detach().requires_grad_(need or i < ctx.n_fast)
                  for i, (t, need) in enumerate(zip(ctx.saved_tensors, needs))]
        fast, state, embeds = _split(leaves, ctx.n_fast, ctx.n_state)
        inputs = leaves + list(ctx.params)
        rng = torch.random.fork_rng(devices=ctx.devices) if ctx.replay_rng else nullcontext()
        with rng, torch.enable_grad(), ExitStack() as autocast:
            for kind, enabled, dtype in ctx.autocast:  # as in the forward, whichever thread runs the backward
                autocast.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            if ctx.replay_rng:
                torch.set_rng_state(ctx.cpu_rng)
                for device, rng_state in zip(ctx.devices, ctx.cuda_rng):
                    torch.cuda.set_rng_state(rng_state, device)
            new_fast, new_state, losses, _ = ctx.step(fast, state, embeds, True)
            outputs = [*new_fast, *new_state, losses]
            pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None and out.requires_grad]
            wrt = [t for t, need in zip(inputs, needs) if need]
            found = torch.autograd.grad([out for out, _ in pairs], wrt, [grad for _, grad in pairs],
                                        allow_unused=True) if pairs and wrt else [None] * len(wrt)
        found = iter(found)
        input_grads = [next(found) if need else None for need in needs]
        return (None, None, None, None, *input_grads)


def _split(inputs, n_fast, n_state):
    return list(inputs[:n_fast]), list(inputs[n_fast:n_fast + n_state]), inputs[n_fast + n_state]
