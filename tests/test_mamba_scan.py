"""mamba_scan: the doubling scan equals the sequential recurrence (values and gradients, float64), and a Mamba whose
mixers use it computes what transformers' own torch path computes: hidden states, logits, loss, every parameter's
gradient, generated tokens, with and without padding; weights and state dict untouched; the full-context builder
switches mamba and only mamba, and so does the evaluation loader."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import mamba_scan
from evaluate_model import load_trained_model
from full_context_lm import FullContextArgs, build_full_context_lm
from mamba_scan import linear_scan, use_parallel_scan
from training_args import BackboneArgs
from training_backbone import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None,
                                reason="mamba_ssm installed: use_parallel_scan leaves models to its kernels")


def sequential_scan(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1, one position at a time."""
    h, states = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, 1)


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 33])
def test_linear_scan_is_the_recurrence(length):
    generator = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 3, 4, dtype=torch.float64, generator=generator)  # decays in (0, 1)
    b = torch.randn(2, length, 3, 4, dtype=torch.float64, generator=generator)
    expected = sequential_scan(a, b)
    torch.testing.assert_close(linear_scan(a, b), expected, rtol=1e-12, atol=1e-12)
    # along another dimension: the same numbers
    moved = linear_scan(a.movedim(1, 3), b.movedim(1, 3), dim=3).movedim(3, 1)
    torch.testing.assert_close(moved, expected, rtol=1e-12, atol=1e-12)
    # and its gradients are the loop's (a weighted sum of all states, so every g_t and a_t enters)
    weights = torch.randn_like(b)
    grads = []
    for scan in (linear_scan, sequential_scan):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        grads.append(torch.autograd.grad((scan(a_, b_) * weights).sum(), (a_, b_)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 6])
def test_linear_scan_gradcheck(length):
    a = torch.rand(2, length, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))
    assert torch.autograd.gradcheck(lambda a, b: linear_scan(a.transpose(0, 1), b.transpose(0, 1), 0), (a, b))


def test_linear_scan_is_first_order_only():
    a = torch.rand(1, 4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    grad_a, grad_b = torch.autograd.grad(linear_scan(a, b).pow(2).sum(), (a, b), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        (grad_a.sum() + grad_b.sum()).backward()
    with pytest.raises(ValueError, match="one shape"):
        linear_scan(a, b[:, :3])


def tiny_mamba(seed=0, use_bias=False) -> MambaForCausalLM:
    """2 layers, width 16, d_inner 32, state 4, float64; every parameter nudged off its structured initialisation
    (A_log's identical rows, D = 1) so that a transposed or misplaced term changes the numbers."""
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=13, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2,
                         intermediate_size=32, conv_kernel=4, time_step_rank=2, use_bias=use_bias, use_conv_bias=True,
                         hidden_act="silu", residual_in_fp32=True, use_cache=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1)
    model = MambaForCausalLM(config).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def reference_and_switched(**kwargs):
    reference = tiny_mamba(**kwargs)
    switched = copy.deepcopy(reference)
    assert use_parallel_scan(switched) == 2
    return reference, switched


@pytest.mark.parametrize("padded", [False, True])
def test_switched_model_matches_transformers(padded):
    """Same last hidden states (float64), logits, loss and gradient of every parameter, in train and eval mode."""
    reference, switched = reference_and_switched()
    ids = torch.randint(2, 13, (3, 11))
    mask = None
    if padded:  # right padding, as the collator pads
        mask = torch.ones_like(ids)
        mask[1, 7:], mask[2, 4:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100) if padded else ids
    outputs = []
    for model in (reference, switched):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        out.loss.backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1].hidden_states[-1], outputs[0].hidden_states[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-6, atol=1e-6)  # transformers' .float()
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=1e-6, atol=1e-6)
    for (name, p_ref), p_new in zip(reference.named_parameters(), switched.parameters()):
        assert p_ref.grad.abs().max() > 0, name
        torch.testing.assert_close(p_new.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
    reference.eval(), switched.eval()
    with torch.no_grad():
        states = [model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                  for model in (reference, switched)]
    torch.testing.assert_close(states[1], states[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_bias", [False, True])
def test_padding_invariance_as_in_transformers(use_bias):
    """Right padding never changes the real positions (causal); left padding does not either when in_proj has no
    bias (transformers zeroes the padded states, so the conv and the state see zeros) - in both implementations."""
    reference, switched = reference_and_switched(use_bias=use_bias)
    ids = torch.randint(2, 13, (1, 6))
    pad = torch.zeros(1, 3, dtype=torch.long)
    right, left = torch.cat([ids, pad], 1), torch.cat([pad, ids], 1)
    mask_right, mask_left = torch.cat([torch.ones_like(ids), pad], 1), torch.cat([pad, torch.ones_like(ids)], 1)
    left_of_models = []
    with torch.no_grad():
        for model in (reference, switched):
            plain = model.backbone(input_ids=ids).last_hidden_state
            right_states = model.backbone(input_ids=right, attention_mask=mask_right).last_hidden_state[:, :6]
            left_states = model.backbone(input_ids=left, attention_mask=mask_left).last_hidden_state[:, 3:]
            torch.testing.assert_close(right_states, plain, rtol=1e-12, atol=1e-12)
            if use_bias:  # in_proj's bias at the padding leaks into the conv and the state, in both
                assert (left_states - plain).abs().max() > 1e-6
            else:
                torch.testing.assert_close(left_states, plain, rtol=1e-12, atol=1e-12)
            left_of_models.append(left_states)
    torch.testing.assert_close(left_of_models[1], left_of_models[0], rtol=1e-12, atol=1e-12)


def test_generation_and_which_path_runs(monkeypatch):
    """Greedy tokens are the same with and without a cache; cache-less calls take the parallel scan, cached calls
    (prefill and decode) transformers' forward."""
    reference, switched = reference_and_switched()
    reference.eval(), switched.eval()
    calls = []
    scan = mamba_scan.selective_scan_forward
    monkeypatch.setattr(mamba_scan, "selective_scan_forward", lambda *args: calls.append(1) or scan(*args))
    prompt = torch.randint(2, 13, (2, 5))
    for use_cache in (False, True):
        kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)
        expected = reference.generate(prompt, **kwargs)
        calls.clear()
        assert torch.equal(switched.generate(prompt, **kwargs), expected)
        assert len(calls) == (0 if use_cache else 2 * 6)  # 2 mixers x 6 full-sequence calls


def test_state_dict_and_save_load_unchanged(tmp_path):
    reference, switched = reference_and_switched()
    state = switched.state_dict()
    assert list(state) == list(reference.state_dict())
    assert all(torch.equal(state[key], value) for key, value in reference.state_dict().items())
    assert use_parallel_scan(switched) == 2  # idempotent
    switched.save_pretrained(tmp_path)
    loaded = MambaForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())


def test_builder_and_evaluation_loader_switch_mamba_only(tmp_path):
    def switched_mixers(model):
        return [m for m in model.modules() if type(m).__name__ == "MambaMixer" and "forward" in vars(m)]

    tokenizer = load_tokenizer(BackboneArgs())
    tiny = dict(n_layer=2, n_embd=32, tokenizer_path=str(REPO / "tokenizers" / "kv_alphabet_62"))
    mamba = build_full_context_lm(BackboneArgs(base_model="mamba", **tiny), FullContextArgs(), tokenizer)
    assert len(switched_mixers(mamba)) == 2
    llama = build_full_context_lm(BackboneArgs(base_model="llama", n_head=2, **tiny), FullContextArgs(), tokenizer)
    assert not any("forward" in vars(m) for m in llama.modules())
    mamba.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert len(switched_mixers(AutoModelForCausalLM.from_pretrained(tmp_path))) == 0  # a plain transformers model
    pretrained = build_full_context_lm(BackboneArgs(pretrained_model=str(tmp_path)), FullContextArgs(), tokenizer)
    assert len(switched_mixers(pretrained)) == 2
    evaluated, _ = load_trained_model(str(tmp_path), device="cpu")  # evaluate_model.py's loader switches it too
    assert len(switched_mixers(evaluated)) == 2


def test_bench_smoke(capsys):
    """bench/bench_mamba_scan.py on a tiny shape on the CPU: a table with both rows' times and a loss difference."""
    spec = importlib.util.spec_from_file_location("bench_mamba_scan", REPO / "bench" / "bench_mamba_scan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--batch", "2", "--lengths", "5", "--width", "16", "--layers", "1", "--steps", "1", "--warmup", "0",
                "--device", "cpu"])
    table = capsys.readouterr().out
    assert "| 2 | 5 | 16 | 1 |" in table and "speedup" in table
