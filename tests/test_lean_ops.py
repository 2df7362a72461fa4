"""lean_ops: gradcheck and gradgradcheck of SwiGLU (alone and fused with the down projection) and RMSNorm in float64;
the same forward as transformers; GradMem with lean ops gives the same loss and second-order gradients as without,
keeps samples independent and saves strictly less for the backward; only llama-family instances are patched."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import grad_memgpt
import lean_ops
from grad_memgpt import GradMemGPT, GradMemGPTConfig
from lean_ops import rms_norm, swiglu, swiglu_linear
from modeling_utils import get_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from saved_memory import saved_bytes  # noqa: E402
from test_grad_memgpt import BATCH, CONTEXT, PAD, QUERY, exact_float64_llama_patches  # noqa: E402

F64 = torch.float64
TRANSFORMERS_RMS_NORM = LlamaRMSNorm.forward  # transformers' own (the fixture below patches the class per test)


@pytest.fixture(autouse=True)
def exact_float64_llama(monkeypatch):
    """transformers' llama RMSNorm and eager softmax run float64 inputs in float32; the eager side of every
    comparison gets the same math in float64 (the lean RMSNorm keeps float64 itself)."""
    for target, name, value in exact_float64_llama_patches():
        monkeypatch.setattr(target, name, value)


def leaf(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_()


# ----------------------------------------------------------------------------------------------------------------
# the ops


@pytest.mark.parametrize("u_shape", [(2, 3, 5), (1, 3, 5), (5,)], ids=["same", "broadcast_batch", "broadcast_row"])
def test_swiglu_gradcheck_and_gradgradcheck(u_shape):
    g, u = leaf(2, 3, 5, scale=2.0, seed=0), leaf(*u_shape, seed=1)
    assert gradcheck(swiglu, (g, u))
    assert gradgradcheck(swiglu, (g, u))
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u, rtol=0, atol=0)


def test_swiglu_linear_gradcheck_and_gradgradcheck_with_the_weight():
    g, u, weight = leaf(2, 3, 5, scale=2.0, seed=0), leaf(2, 3, 5, seed=1), leaf(4, 5, seed=2)
    assert gradcheck(swiglu_linear, (g, u, weight))
    assert gradgradcheck(swiglu_linear, (g, u, weight))
    torch.testing.assert_close(swiglu_linear(g, u, weight), F.linear(F.silu(g) * u, weight), rtol=1e-14, atol=1e-14)
    # a frozen weight: no weight gradient is computed, the input gradients are unchanged
    frozen = weight.detach()
    assert gradgradcheck(swiglu_linear, (g, u, frozen))


@pytest.mark.parametrize("shape", [(2, 3, 6), (4, 6)])
def test_rms_norm_gradcheck_and_gradgradcheck_with_the_weight(shape):
    x, weight = leaf(*shape, seed=0), leaf(shape[-1], seed=1)

    def norm(x, weight):
        return rms_norm(x, weight, 1e-5)

    assert gradcheck(norm, (x, weight))
    assert gradgradcheck(norm, (x, weight))
    eager = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x, weight), eager, rtol=1e-14, atol=1e-14)


def test_a_third_derivative_raises():
    g, u = leaf(3, 4, seed=0), leaf(3, 4, seed=1)
    (dg,) = torch.autograd.grad(swiglu(g, u).sum(), g, create_graph=True)
    (ddg,) = torch.autograd.grad(dg.sum(), g, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ddg.sum(), g)


def test_float32_rms_norm_is_transformers_bitwise_and_half_inputs_keep_eager_dtypes():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()

    def eager(x):
        return TRANSFORMERS_RMS_NORM(norm, x)

    x = torch.randn(3, 5, 8)
    assert torch.equal(rms_norm(x, norm.weight, 1e-5), eager(x))
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype).requires_grad_()
        y = rms_norm(xh, norm.weight, 1e-5)
        assert y.dtype == eager(xh).dtype == torch.float32  # float32 weight times the normalised half input
        assert torch.equal(y, eager(xh))
        (dx,) = torch.autograd.grad(y.square().sum(), xh)
        (dx_eager,) = torch.autograd.grad(eager(xh).square().sum(), xh)
        x64 = xh.detach().double().requires_grad_()
        (dx64,) = torch.autograd.grad(rms_norm(x64, norm.weight.double(), 1e-5).square().sum(), x64)
        assert dx.dtype == dtype
        error, eager_error = ((d.double() - dx64).norm() / dx64.norm() for d in (dx, dx_eager))
        assert error <= max(eager_error, 1e-2)  # computed in float32, cast once: no worse than eager
        g, u = torch.randn(4, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)
        assert torch.equal(swiglu(g, u), F.silu(g) * u)


# ----------------------------------------------------------------------------------------------------------------
# GradMem with lean ops


def tiny_llama(**overrides) -> LlamaConfig:
    """2 layers, width 16, MLP width 48 (no other tensor of the model is 48 wide)."""
    settings = dict(vocab_size=20, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=1,
                    bos_token_id=2, tie_word_embeddings=False)
    # through the constructor, so derived fields (head_dim = hidden_size / heads) follow the overrides
    return LlamaConfig(**{**settings, **overrides})


def tiny_gradmem(lean_ops: bool, backbone=None, seed=0, **options) -> GradMemGPT:
    torch.manual_seed(seed)
    options = {"n_mem_tokens": 3, "K": 2, "lr": 3.0, "attn_implementation": "eager", **options}
    if options.get("mem_proj_mode", "none") != "none":
        options["use_mem_proj"] = True
    model = GradMemGPT(GradMemGPTConfig(base_config=backbone or tiny_llama(), lean_ops=lean_ops, **options))
    model = model.to(F64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters do something
                param.normal_(0.0, 0.3)
    return model


def loss_and_grads(model, batch=BATCH):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


SECOND_ORDER_OPTIONS = [
    dict(use_write_head=True, n_ctrl_tokens=1, add_inner_loss_to_outer=True, inner_loss_weight=0.5),
    dict(lr=0.05, use_adam=True, mem_proj_mode="per_sample", inner_clip_norm=0.05),
    dict(K=3, last_K_second_order=2, use_write_head=True, backbone=tiny_llama(mlp_bias=True)),
    dict(use_write_head=True, add_inner_loss_to_outer=True, use_write_lora=True, write_lora_r=2,
         write_lora_target_modules="gate_proj,down_proj"),  # a LoRA-wrapped down projection is not fused
    dict(attn_implementation="exact_eager", use_write_head=True),
    dict(use_write_head=True, add_inner_loss_to_outer=True, use_gradient_checkpointing=True),
]


@pytest.mark.parametrize("options", SECOND_ORDER_OPTIONS, ids=["write_head", "adam_per_sample", "mlp_bias_last2",
                                                               "write_lora", "exact_eager", "checkpointing"])
def test_lean_ops_give_the_same_loss_and_second_order_gradients(options):
    eager, lean = tiny_gradmem(False, **options), tiny_gradmem(True, **options)
    loss, grads = loss_and_grads(eager)
    lean_loss, lean_grads = loss_and_grads(lean)
    torch.testing.assert_close(lean_loss, loss, rtol=1e-10, atol=0)
    assert lean_grads.keys() == grads.keys()
    assert any("mlp" in name for name in grads) and any("layernorm" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-10 * grad.abs().max().item(),
                                   msg=name)


def test_lean_ops_keep_samples_independent():
    model = tiny_gradmem(True, lr=0.05, use_adam=True, inner_clip_norm=0.05, mem_proj_mode="proj")
    with torch.no_grad():
        memory, _ = model.write(CONTEXT)
        logits = model.read(memory, QUERY)
        for i in range(CONTEXT.shape[0]):
            alone, _ = model.write(CONTEXT[i : i + 1, : int((CONTEXT[i] != PAD).sum())])
            torch.testing.assert_close(memory[i : i + 1], alone, rtol=1e-10, atol=1e-12)
            q_length = int((QUERY[i] != PAD).sum())
            torch.testing.assert_close(logits[i : i + 1, :q_length], model.read(alone, QUERY[i : i + 1, :q_length]),
                                       rtol=1e-10, atol=1e-12)


def test_lean_ops_save_less_for_the_backward():
    """bench/saved_memory.py's count on one second-order training forward: the MLP-wide tensors (last dim 48) drop
    from 12 per layer and inner step (eager: silu's differentiable backward, products, h, dh, ...) to 4 (g, u, dg,
    du) and from 4 to 2 in READ, the hidden-wide ones (16) drop too (RMSNorm keeps x and a per-row scalar); the
    total is strictly lower."""
    options = dict(use_write_head=True, add_inner_loss_to_outer=True, inner_loss_weight=0.5)
    eager_total, eager_by_dim = saved_bytes(tiny_gradmem(False, **options), BATCH)
    lean_total, lean_by_dim = saved_bytes(tiny_gradmem(True, **options), BATCH)
    assert lean_by_dim[48] * 2 <= eager_by_dim[48]
    assert lean_by_dim[16] < eager_by_dim[16]
    assert lean_total < eager_total


def test_lean_ops_survive_save_and_load(tmp_path):
    model = tiny_gradmem(True, use_write_head=True)
    model.save_pretrained(tmp_path)
    loaded = GradMemGPT.from_pretrained(tmp_path).to(F64)
    assert loaded.config.lean_ops
    assert all("forward" in vars(m) for m in loaded.modules() if type(m).__name__ in ("LlamaMLP", "LlamaRMSNorm"))
    torch.testing.assert_close(loss_and_grads(loaded)[0], loss_and_grads(model)[0], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# use_lean_ops on transformers models


@pytest.mark.parametrize("config_type", [LlamaConfig, MistralConfig, Qwen2Config])
def test_use_lean_ops_patches_this_models_instances_only_with_the_same_second_order_gradients(config_type):
    config = config_type(vocab_size=20, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    torch.manual_seed(0)
    # float32: other families run float64 RMSNorm in float32
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lean = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lean.load_state_dict(eager.state_dict())
    assert lean_ops.use_lean_ops(lean) == 2 * 2 + 2 * 1 + 1  # MLPs; two norms per layer; the final norm
    assert not any("forward" in vars(m) for m in eager.modules())  # the other model and the classes are untouched
    ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))

    def second_order(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        (d_embeds,) = torch.autograd.grad(loss, embeds, create_graph=True)
        params = [p for name, p in model.named_parameters() if "embed_tokens" not in name]  # inputs_embeds given
        return torch.autograd.grad(loss + d_embeds.square().sum(), params)

    for a, b in zip(second_order(lean), second_order(eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lean_ops_fail_loudly_on_other_backbones():
    gpt2 = GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=PAD)
    with pytest.raises(ValueError, match="lean_ops: lean ops replace .* this backbone is 'gpt2'"):
        GradMemGPT(GradMemGPTConfig(base_config=gpt2, lean_ops=True, attn_implementation="eager"))
    with pytest.raises(ValueError, match="activation is 'gelu'"):
        tiny_gradmem(True, backbone=tiny_llama(hidden_act="gelu"))


def test_lean_ops_default_on_for_second_order_training_on_cuda(monkeypatch):
    """Unset, lean_ops follows the device and the backbone: on for second-order training on CUDA with a SwiGLU /
    RMSNorm backbone, off on the CPU, for first-order training and for other backbones (which it never refuses)."""
    def built(cuda, **options):
        monkeypatch.setattr(grad_memgpt.torch.cuda, "is_available", lambda: cuda)
        options = {"n_mem_tokens": 3, "K": 2, "attn_implementation": "exact_eager", **options}
        options.setdefault("base_config", tiny_llama())
        model = GradMemGPT(GradMemGPTConfig(**options))
        swapped = "forward" in vars(get_backbone(model.model).norm)  # use_lean_ops sets the instances' forward
        assert swapped == model.uses_lean_ops
        return swapped

    assert built(True) and not built(False)
    assert not built(True, grad_mode="first") and not built(True, base_config=tiny_llama(hidden_act="gelu"))
    assert not built(True, lean_ops=False) and built(False, lean_ops=True)
