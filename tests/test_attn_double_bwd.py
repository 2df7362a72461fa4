"""attn_double_bwd: the exact PyTorch attention (gradcheck / gradgradcheck), its transformers registration, the
implementation resolver, and the Triton kernels under TRITON_INTERPRET=1 (subprocess) and on CUDA (gpu marker)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attn_double_bwd
from attn_double_bwd import exact_attention, resolve_attn_implementation
from attn_double_bwd.reference import naive_attention

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype).requires_grad_(True)
    return q, k, v


# (B, Hq, Hkv, Lq, Lk, D, mask kwargs builder)
CASES = {
    "causal": (1, 2, 2, 5, 5, 3, lambda B, Hq, Lq, Lk: dict(is_causal=True)),
    "causal_gqa_lq_lt_lk": (1, 4, 2, 3, 6, 4, lambda B, Hq, Lq, Lk: dict(is_causal=True)),
    "causal_lq_gt_lk_empty_rows": (1, 2, 1, 6, 4, 3, lambda B, Hq, Lq, Lk: dict(is_causal=True)),
    "key_padding_gqa": (
        2, 2, 1, 4, 4, 3,
        lambda B, Hq, Lq, Lk: dict(key_padding_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)),
    ),
    "bool_4d_mask_per_head": (
        1, 2, 1, 4, 5, 3,
        lambda B, Hq, Lq, Lk: dict(attn_mask=torch.rand(B, Hq, Lq, Lk, generator=torch.Generator().manual_seed(1)) > 0.4),
    ),
    "additive_mask_and_causal": (
        2, 2, 2, 4, 4, 3,
        lambda B, Hq, Lq, Lk: dict(is_causal=True, attn_mask=torch.randn(B, 1, Lq, Lk, dtype=F64)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_attention_forward_matches_naive(case):
    B, Hq, Hkv, Lq, Lk, D, masks = CASES[case]
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D)
    kw = masks(B, Hq, Lq, Lk)
    out = exact_attention(q, k, v, scale=0.7, **kw)
    ref = naive_attention(q, k, v, scale=0.7, **kw)
    assert out.shape == (B, Hq, Lq, D)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # First-order grads agree with autograd through the naive formula.
    cot = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), cot)
    g2 = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_attention_gradcheck_and_gradgradcheck(case):
    B, Hq, Hkv, Lq, Lk, D, masks = CASES[case]
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D)
    kw = masks(B, Hq, Lq, Lk)
    fn = lambda q, k, v: exact_attention(q, k, v, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_second_order_matches_naive_autograd():
    # Hessian-vector products through the closed form equal autograd's double backward of the naive formula.
    q, k, v = _qkv(2, 4, 2, 5, 7, 4)
    kw = dict(is_causal=True)
    cot = torch.randn(2, 4, 5, 4, dtype=F64)
    results = []
    for fn in (exact_attention, naive_attention):
        out = fn(q, k, v, **kw)
        grads = torch.autograd.grad((out * cot).sum(), (q, k, v), create_graph=True)
        phi = sum((g * g.detach().sin()).sum() for g in grads)
        results.append(torch.autograd.grad(phi, (q, k, v)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_mask_is_shared_by_all_three_levels():
    q, k, v = _qkv(1, 2, 1, 4, 4, 3)

    def fn(q, k, v):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return exact_attention(q, k, v, is_causal=True, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    assert not torch.allclose(fn(q, k, v), exact_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    q, k, v = _qkv(1, 2, 1, 6, 6, 8)
    out = exact_attention(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), is_causal=True)
    ref = exact_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)


def test_input_errors_are_clear():
    q, k, v = _qkv(1, 3, 2, 4, 4, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        exact_attention(q, k, v)
    q, k, v = _qkv(1, 2, 1, 4, 4, 3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        exact_attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        exact_attention(q, k, v, attn_mask=torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        exact_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="requires grad"):
        exact_attention(q, k, v, attn_mask=torch.zeros(1, 1, 4, 4, dtype=F64, requires_grad=True))


def test_third_derivative_raises():
    q, k, v = _qkv(1, 1, 1, 3, 3, 2)
    out = exact_attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    (ggq,) = torch.autograd.grad((gq**2).sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ggq.sum(), (q,))


# --------------------------------------------------------------------------------------------------------------
# transformers integration


def _tiny_model(kind, impl):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl,
        )
        return LlamaForCausalLM(cfg).double()
    cfg = GPT2Config(
        vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl,
    )
    return GPT2LMHeadModel(cfg).double()


def _first_and_second_order(model, padded):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, 6:] = 0  # right padding
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=mask if padded else None).logits
    logits = logits * mask[..., None]  # padded positions are not compared (eager attends uniformly there)
    loss = (logits * torch.randn(logits.shape, generator=g, dtype=F64)).sum()
    (g_emb,) = torch.autograd.grad(loss, emb, create_graph=True)  # the "inner step" gradient
    params = [p for n, p in model.named_parameters() if "wte" not in n and "embed" not in n]
    second = torch.autograd.grad((g_emb**2).sum(), [emb, *params], allow_unused=True)
    return logits.detach(), g_emb.detach(), [torch.zeros(()) if x is None else x for x in second]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("impl", ["exact_eager", "hvp_manual", "hvp_semi_manual"])
def test_registered_names_match_eager_in_models(kind, padded, impl):
    ref = _first_and_second_order(_tiny_model(kind, "eager"), padded)
    model = _tiny_model(kind, impl)
    assert model.config._attn_implementation == impl
    got = _first_and_second_order(model, padded)
    # Llama's eager softmax runs in float32 even for float64 models; GPT-2's eager is float64 throughout.
    tol = 1e-6 if kind == "llama" else 1e-12
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert _rel_err(a, b) <= tol


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_fused_name_rejects_dropout_before_any_work():
    from attn_double_bwd.hf_integration import fused_attention_forward

    q, k, v = _qkv(1, 2, 2, 4, 4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="no dropout"):
        fused_attention_forward(torch.nn.Module(), q, k, v, None, dropout=0.1)


def test_resolver():
    assert resolve_attn_implementation("auto", device_type="cpu", second_order=False) == "sdpa"
    assert resolve_attn_implementation("auto", device_type="cpu", second_order=True) == "exact_eager"
    expected_cuda = "fused_double_bwd" if attn_double_bwd.triton_available() else "exact_eager"
    assert resolve_attn_implementation("auto", device_type="cuda", second_order=True) == expected_cuda
    assert resolve_attn_implementation("hvp_manual", second_order=True) == "exact_eager"
    assert resolve_attn_implementation("jvp_flash", device_type="cpu", second_order=True) == "exact_eager"
    assert resolve_attn_implementation("hvp_semi_manual", device_type="cuda", second_order=True) == expected_cuda
    assert resolve_attn_implementation("eager", second_order=True) == "eager"
    assert resolve_attn_implementation("sdpa", second_order=False) == "sdpa"
    with pytest.raises(ValueError, match="no double backward"):
        resolve_attn_implementation("sdpa", second_order=True)
    with pytest.raises(ValueError, match="unknown"):
        resolve_attn_implementation("nope")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            resolve_attn_implementation("fused_double_bwd", device_type="cpu", second_order=True)


def test_head_dims_outside_the_fused_kernels(monkeypatch, caplog):
    """Head dims other than 16/32/64/128: 'auto' and the legacy names fall back to exact_eager with one log line, an
    explicit fused_double_bwd fails before any work, naming the limit and the fallbacks (CPU: the CUDA check is
    faked)."""
    monkeypatch.setattr(attn_double_bwd, "_fused_runs_on", lambda device_type: True)
    resolve = resolve_attn_implementation
    assert resolve("auto", device_type="cuda", second_order=True, head_dim=128) == "fused_double_bwd"
    with caplog.at_level("WARNING", logger="gradmem"):
        assert resolve("auto", device_type="cuda", second_order=True, head_dim=256) == "exact_eager"
    assert [r.getMessage() for r in caplog.records] == [
        "attention head dim 256 is outside the fused kernels' 16/32/64/128: using 'exact_eager' (exact, slower)"]
    assert resolve("hvp_semi_manual", device_type="cuda", second_order=True, head_dim=256) == "exact_eager"
    assert resolve("auto", device_type="cuda", second_order=False, head_dim=256) == "sdpa"
    with pytest.raises(ValueError, match=r"16 to 128.*head dim is 256.*exact_eager .*or eager"):
        resolve("fused_double_bwd", device_type="cuda", second_order=True, head_dim=256)
    with pytest.raises(ValueError, match="head dim is 48"):
        resolve("fused_double_bwd", device_type="cuda", second_order=True, head_dim=48)


def test_head_dim_of_backbone_configs():
    from transformers import GPT2Config, LlamaConfig, MambaConfig

    assert attn_double_bwd.head_dim_of(LlamaConfig(hidden_size=512, num_attention_heads=2, head_dim=256)) == 256
    assert attn_double_bwd.head_dim_of(GPT2Config(n_embd=64, n_head=4).to_dict()) == 16
    assert attn_double_bwd.head_dim_of(MambaConfig(hidden_size=32)) is None


def test_grad_memgpt_with_head_dim_256_falls_back_or_fails_before_any_work(monkeypatch):
    from transformers import LlamaConfig

    from grad_memgpt import GradMemGPT, GradMemGPTConfig

    monkeypatch.setattr(attn_double_bwd, "_fused_runs_on", lambda device_type: True)
    backbone = LlamaConfig(vocab_size=16, hidden_size=256, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=256)
    model = GradMemGPT(GradMemGPTConfig(base_config=backbone, n_mem_tokens=2, attn_implementation="auto"))
    assert model.model.config._attn_implementation == "exact_eager"
    with pytest.raises(ValueError, match="16 to 128"):
        GradMemGPT(GradMemGPTConfig(base_config=backbone, n_mem_tokens=2, attn_implementation="fused_double_bwd"))


def test_import_and_exact_path_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, attn_double_bwd\n"
        "from transformers import AttentionInterface\n"
        "assert 'fused_double_bwd' in AttentionInterface._global_mapping\n"
        "assert not attn_double_bwd.triton_available()\n"
        "assert attn_double_bwd.resolve_attn_implementation('auto', device_type='cuda', second_order=True) == 'exact_eager'\n"
        "q = torch.randn(1, 2, 3, 4, requires_grad=True)\n"
        "attn_double_bwd.exact_attention(q, q, q, is_causal=True).sum().backward()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


def _parse_cases(stdout):
    import json

    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not attn_double_bwd.triton_available(), reason="triton is not installed")
def test_triton_kernels_under_interpreter_match_float64_reference():
    # A fresh interpreter: TRITON_INTERPRET must be set before triton compiles anything.
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "attn_double_bwd.verify", "--suite", "interpret"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    cases = _parse_cases(res.stdout)
    assert cases, res.stderr
    bad = [c for c in cases if not c["ok"]]
    assert res.returncode == 0 and not bad, bad or res.stderr
    # Every double-backward output was compared.
    assert all({"d_dout", "d2q", "d2k", "d2v"} <= c.keys() for c in cases)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_triton_kernels_on_gpu_match_float64_reference(tf32):
    from attn_double_bwd.verify import main

    before = torch.backends.cuda.matmul.fp32_precision
    assert main(["--suite", "gpu"] + (["--tf32"] if tf32 else [])) == 0
    assert torch.backends.cuda.matmul.fp32_precision == before  # later tests run in the precision they expect


@pytest.mark.gpu
def test_fused_registered_name_matches_exact_in_model_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    results = {}
    for impl in ("exact_eager", "fused_double_bwd"):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=40, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, attn_implementation=impl,
        )
        model = LlamaForCausalLM(cfg).cuda()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 40, (2, 300), generator=g).cuda()
        mask = torch.ones_like(ids)
        mask[1, 250:] = 0
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits * mask[..., None]
        (g_emb,) = torch.autograd.grad(logits.square().mean(), emb, create_graph=True)
        second = torch.autograd.grad(g_emb.square().sum(), [emb, *model.parameters()], allow_unused=True)
        results[impl] = [logits.detach(), g_emb.detach(), *[x for x in second if x is not None]]
    for a, b in zip(results["fused_double_bwd"], results["exact_eager"]):
        assert _rel_err(a, b) <= 1e-4


def test_plain_causal_mask_is_recognised_once_and_passed_as_is_causal(monkeypatch):
    from attn_double_bwd import hf_integration, triton_attention

    calls = []
    monkeypatch.setattr(triton_attention, "fused_attention", lambda q, k, v, **kw: calls.append(kw) or q)
    q, k, v = _qkv(1, 2, 2, 5, 5, 16, dtype=torch.float32)
    static = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]  # what a model passes for CUDA graphs
    for _ in range(2):  # second call: answered from the cache
        hf_integration.fused_attention_forward(torch.nn.Module(), q, k, v, static)
    assert [(c["is_causal"], c["attn_mask"]) for c in calls] == [(True, None), (True, None)]
    assert hf_integration.is_plain_causal_mask(static, 5, 5)
    static[0, 0, 4, 0] = False  # in-place change: checked again
    assert not hf_integration.is_plain_causal_mask(static, 5, 5)
    padded = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert not hf_integration.is_plain_causal_mask(padded, 5, 5)  # batched masks are passed on as masks
    hf_integration.fused_attention_forward(torch.nn.Module(), q, k, v, padded[:1] & False)
    assert calls[-1]["is_causal"] is False and calls[-1]["attn_mask"] is not None
    shifted = torch.ones(3, 5, dtype=torch.bool).tril(2)[None, None]  # Lq < Lk: bottom-right aligned
    assert hf_integration.is_plain_causal_mask(shifted, 3, 5)
    seen = []
    monkeypatch.setattr(triton_attention, "fused_attention", lambda q, k, v, **kw: seen.append((k.shape[2], kw)) or q)
    hf_integration.fused_attention_forward(torch.nn.Module(), q[:, :, :3], k, v, shifted)
    assert seen[-1][0] == 5 and seen[-1][1]["is_causal"] is True  # keys kept: the kernels align bottom-right


def test_attention_under_bf16_autocast_runs_in_the_autocast_dtype(monkeypatch):
    """Llama's RoPE returns fp32 q/k beside a bf16 v under autocast; like sdpa, the attention gets one dtype, the
    autocast one (the Triton kernels take a single dtype), and stays close to eager attention (second order too)."""
    from attn_double_bwd import hf_integration

    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return exact_attention(q, k, v, **kwargs)

    monkeypatch.setattr(hf_integration, "exact_attention", spy)
    results = {}
    for impl in ("eager", "exact_eager"):
        model = _tiny_model("llama", impl).float()
        ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs_embeds=emb).logits
            (g_emb,) = torch.autograd.grad(logits.float().square().mean(), emb, create_graph=True)
            (gg,) = torch.autograd.grad(g_emb.square().sum(), emb)
        results[impl] = (logits.float(), gg)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    for ours, eager in zip(results["exact_eager"], results["eager"]):
        assert torch.isfinite(ours).all()
        assert (ours - eager).norm() / eager.norm() < 5e-2  # bf16 operands in both
