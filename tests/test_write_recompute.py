"""write_recompute: a second-order WRITE step recomputed in the outer backward gives the stored-graph gradients
(float64), holds one step's graph at a time (memory independent of K), and replays dropout."""
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from grad_memgpt import GradMemGPTConfig
from modeling_utils import get_backbone
from write_recompute import recomputed_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from saved_memory import peak_saved_bytes  # noqa: E402
from test_grad_memgpt import BATCH, exact_float64_llama_patches  # noqa: E402
from test_lean_ops import SECOND_ORDER_OPTIONS, loss_and_grads, tiny_gradmem, tiny_llama  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def exact_float64_llama(monkeypatch):
    for target, name, value in exact_float64_llama_patches():
        monkeypatch.setattr(target, name, value)


def assert_same_loss_and_grads(stored, recomputed):
    loss, grads = loss_and_grads(stored)
    loss_r, grads_r = loss_and_grads(recomputed)
    torch.testing.assert_close(loss_r, loss, rtol=1e-12, atol=0)
    assert grads_r.keys() == grads.keys() and any(name.startswith("mem") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-10, atol=1e-10 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("options", SECOND_ORDER_OPTIONS, ids=["write_head", "adam_per_sample", "mlp_bias_last2",
                                                               "write_lora", "exact_eager", "checkpointing"])
def test_recomputed_write_gives_the_stored_graph_gradients(options):
    assert_same_loss_and_grads(tiny_gradmem(False, **options), tiny_gradmem(False, recompute_write=True, **options))


def test_recomputed_write_with_lean_ops_and_five_steps():
    options = dict(K=5, lr=0.5, use_write_head=True, add_inner_loss_to_outer=True, inner_loss_weight=0.5)
    assert_same_loss_and_grads(tiny_gradmem(True, **options), tiny_gradmem(True, recompute_write=True, **options))


def test_recomputation_replays_dropout():
    backbone = tiny_llama(attention_dropout=0.3)
    stored, recomputed = (tiny_gradmem(False, backbone=backbone, recompute_write=r, use_write_head=True)
                          for r in (False, True))
    torch.manual_seed(5)
    loss, grads = loss_and_grads(stored)
    torch.manual_seed(5)
    loss_r, grads_r = loss_and_grads(recomputed)
    torch.manual_seed(6)
    other_loss, _ = loss_and_grads(stored)
    assert other_loss != loss  # dropout is on: another seed, another loss
    torch.testing.assert_close(loss_r, loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-10, atol=1e-10 * grad.abs().max().item(), msg=name)


def test_recomputation_keeps_the_autocast_of_the_forward():
    """bf16 autocast (CPU): the steps recomputed in the backward run in bf16 as the first run did, neither in fp32
    (autocast is off where autograd runs the backward) nor under another autocast around the backward call."""
    model = tiny_gradmem(False, recompute_write=True, use_write_head=True).float()
    dtypes = []
    get_backbone(model.model).layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**BATCH).loss
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.float16):
        loss.backward()
    assert len(dtypes) == model.config.K and set(dtypes) == {torch.bfloat16}  # one recomputed forward per step


def test_the_recomputed_step_matches_finite_differences():
    """gradcheck on the node itself: a two-variable SGD step with Adam-like state, a context input and a parameter
    the step reads from outside (as the model's weights)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)

    def step(fast, state, embeds, create_graph):
        losses = ((embeds @ weight) * fast[0]).tanh().pow(2).sum(dim=1) + (fast[1] * fast[0]).sin().sum(dim=1)
        grads = torch.autograd.grad(losses.sum(), fast, create_graph=create_graph)
        moment = 0.5 * state[0] + grads[0] if state else grads[0]
        return [fast[0] - 0.3 * moment, fast[1] - 0.2 * grads[1]], [moment], losses, grads

    def run(f0, f1, m, embeds, w):
        new_fast, new_state, losses, _ = recomputed_step(step, [f0, f1], [m], embeds, [w])
        return (*new_fast, *new_state, losses)

    inputs = [torch.randn(2, 4, dtype=F64, generator=g, requires_grad=True) for _ in range(3)]
    embeds = torch.randn(2, 3, dtype=F64, generator=g, requires_grad=True)
    assert gradcheck(run, (*inputs, embeds, weight))


def test_peak_memory_does_not_grow_with_k():
    options = dict(use_write_head=True, add_inner_loss_to_outer=True, inner_loss_weight=0.5, lr=0.3)
    peak = {(K, r): peak_saved_bytes(tiny_gradmem(False, K=K, recompute_write=r, **options), BATCH)
            for K in (2, 5) for r in (False, True)}
    assert peak[5, False] > 2 * peak[2, False] * 0.9  # stored graphs: about K of them
    assert peak[2, True] < 0.6 * peak[2, False] and peak[5, True] < 0.25 * peak[5, False]
    assert peak[5, True] < 1.1 * peak[2, True]  # one step's graph at a time


def test_recompute_write_needs_second_order_steps():
    for options in (dict(grad_mode="first"), dict(last_K_second_order=0)):
        with pytest.raises(ValueError, match="recompute_write recomputes second-order WRITE steps"):
            GradMemGPTConfig(base_config=tiny_llama(), recompute_write=True, **options).validate()


def test_without_dropout_the_random_state_is_left_alone_and_the_step_can_be_captured(monkeypatch):
    """No dropout: the recomputation neither reads nor sets a generator's state (which a CUDA graph cannot record),
    so fast_step may record the step; with dropout it replays the state and fast_step is told why it cannot."""
    model = tiny_gradmem(False, recompute_write=True, use_write_head=True)
    assert model.dropout_in_training() is None and model.captured_step_problem() is None

    def touched(*args, **kwargs):
        raise AssertionError("the random state was read or set")

    with monkeypatch.context() as patched:
        for name in ("get_rng_state", "set_rng_state"):
            patched.setattr(torch, name, touched)
            patched.setattr(torch.cuda, name, touched)
        loss_and_grads(model)  # forward and the recomputing backward
    dropped = tiny_gradmem(False, backbone=tiny_llama(attention_dropout=0.3), recompute_write=True)
    assert dropped.dropout_in_training() == "model.model.layers.0.self_attn.attention_dropout=0.3"
    assert "recompute_write with dropout (model.model.layers.0" in dropped.captured_step_problem()
    assert tiny_gradmem(False, backbone=tiny_llama(attention_dropout=0.3)).captured_step_problem() is None


@pytest.mark.gpu
@pytest.mark.parametrize("lean_ops", [False, True])
@pytest.mark.parametrize("attn, dropout", [("fused_double_bwd", 0.0), ("exact_eager", 0.2)])
def test_recomputed_write_on_cuda(lean_ops, attn, dropout):
    """On CUDA (Triton lean ops when on; the fused double-backward attention, which has no dropout, or the exact eager
    attention with dropout, whose CUDA random state is replayed): the same loss and gradients as the stored graph,
    within fp32 rounding."""
    backbone = tiny_llama(attention_dropout=dropout, hidden_size=64, intermediate_size=128)  # head dim 32
    models = [tiny_gradmem(lean_ops, backbone=backbone, recompute_write=r, use_write_head=True,
                           attn_implementation=attn).float().cuda() for r in (False, True)]
    batch = {name: tensor.cuda() for name, tensor in BATCH.items()}
    results = []
    for model in models:
        torch.manual_seed(3)
        results.append(loss_and_grads(model, batch))
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0)
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_r = torch.cat([grads_r[name].flatten() for name in grads])
    assert ((flat_r - flat).norm() / flat.norm()).item() <= 1e-5
