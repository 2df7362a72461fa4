"""fast_step: the sync-free training step equals the plain eager step (CPU, float64), non-finite steps are skipped
without a trace, the fallback reasons are clear; on a GPU (marked `gpu`), the CUDA-graph replay equals the eager step."""
import contextlib
import functools
import importlib.util
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

import fast_step
from fast_step import CapturedTrainStep, fast_path_problem
from grad_memgpt import GradMemGPT, GradMemGPTConfig
from mamba_scan import use_parallel_scan
from modeling_utils import FullContextStep
from rmt import RMT2Segm, RMT2SegmConfig

VOCAB, PAD = 20, 0


def tiny_llama(width: int) -> LlamaConfig:
    """2 layers, 4 heads; width 64 (head dim 16) for the fused kernels, which take head dims 16-128."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=width // 4, pad_token_id=PAD,
                       tie_word_embeddings=True)


def tiny_model(attn="eager", dtype=torch.float64, seed=0, width=32, **options):
    torch.manual_seed(seed)
    base = tiny_llama(width)
    defaults = dict(n_mem_tokens=2, K=2, lr=0.1, grad_mode="second", use_write_head=True,
                    add_inner_loss_to_outer=True, inner_loss_weight=0.5, attn_implementation=attn)
    defaults.update(options)
    return GradMemGPT(GradMemGPTConfig(base_config=base, **defaults)).to(dtype).train()


def tiny_rmt(attn="sdpa", dtype=torch.float64, seed=0, width=32, **options):
    """The comparison matrix's RMT (memory projection, reconstruction loss with its write head), K=2 writes."""
    torch.manual_seed(seed)
    base = tiny_llama(width)
    defaults = dict(n_mem_tokens=2, K=2, mem_proj_mode="proj", use_mem_proj=True, use_reconstruction_loss=True,
                    reconstruction_loss_weight=0.5, use_write_head=True, attn_implementation=attn)
    defaults.update(options)
    return RMT2Segm(RMT2SegmConfig(base_config=base, **defaults)).to(dtype).train()


def batch(B=3, S=8, Q=6, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(1, VOCAB, (B, S), generator=g)
    context[0, S - 3:] = PAD  # a padded row
    query = torch.randint(1, VOCAB, (B, Q), generator=g)
    labels = torch.full_like(query, -100)
    labels[:, Q // 2:] = query[:, Q // 2:]
    return {"context_input_ids": context.to(device), "query_input_ids": query.to(device), "labels": labels.to(device)}


def adamw(model, lr=1e-2, weight_decay=0.0):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def eager_step(model, optimizer, data, max_grad_norm=1.0):
    """The trainer's eager step: forward, backward, clip, AdamW (as the HF Trainer runs it)."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    return loss.detach(), norm


def params_of(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def rel_err(a, b):
    a = torch.cat([x.flatten().double() for x in a])
    b = torch.cat([x.flatten().double() for x in b])
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("build,attn", [(tiny_model, "eager"), (tiny_model, "exact_eager"), (tiny_rmt, "eager"),
                                        (tiny_rmt, "sdpa")])
def test_static_causal_mask_gives_the_same_loss_and_gradients(build, attn):
    """Every pass of GradMem and of RMT (its permuted write-out slots too) with the static mask: the same numbers as
    with the mask transformers builds (sdpa: its causal kernel against an explicit mask, so to rounding)."""
    model = build(attn)
    data = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**data).loss
    grads = torch.autograd.grad(loss, params)
    model.use_static_causal_mask = True
    loss_static = model(**data).loss
    grads_static = torch.autograd.grad(loss_static, params)
    tolerance = 1e-13 if attn == "sdpa" else 0.0
    torch.testing.assert_close(loss_static, loss, rtol=tolerance, atol=0)
    assert rel_err(grads_static, grads) <= tolerance
    if build is tiny_rmt:  # the static masks were used, one per length: WRITE P+S+C+M, reconstruction P+S, READ P+Q
        assert sorted(key[0] for key in model._causal_mask_cache) == [2 + 6, 2 + 8, 2 + 8 + 2]


def test_eager_sync_free_step_equals_the_plain_step():
    reference, fast = tiny_model(), tiny_model()
    opt_ref, opt_fast = adamw(reference, weight_decay=0.01), adamw(fast, weight_decay=0.01)
    step = CapturedTrainStep(fast, opt_fast, max_grad_norm=0.5, use_cuda_graph=False)
    for i, lr in enumerate([1e-2, 3e-3, 1e-3]):  # a changing learning rate, as a scheduler sets it
        for opt in (opt_ref, opt_fast):
            opt.param_groups[0]["lr"] = lr
        data = batch(seed=i)
        loss_ref, norm_ref = eager_step(reference, opt_ref, data, max_grad_norm=0.5)
        out = step(data)
        assert torch.allclose(out.loss, loss_ref.to(out.loss.dtype), rtol=1e-12, atol=0)
        assert torch.allclose(out.grad_norm.double(), norm_ref, rtol=1e-6)
        assert out.finite.item() == 1.0
        assert rel_err(params_of(fast), params_of(reference)) < 1e-12
    assert set(out.stats) >= {"target_loss", "inner_loss", "inner_loss_outer", "written_frac"}
    assert step.skip_counts() == {"skipped_steps": 0, "consecutive_skipped": 0, "longest_skip_run": 0}
    state_ref, state_fast = opt_ref.state_dict()["state"], opt_fast.state_dict()["state"]
    for k in state_ref:
        assert float(state_fast[k]["step"]) == float(state_ref[k]["step"]) == 3.0
        assert torch.allclose(state_fast[k]["exp_avg_sq"], state_ref[k]["exp_avg_sq"], rtol=1e-10, atol=1e-30)


def assert_sync_free_steps_equal_plain_steps(reference, fast, params_rtol):
    """Two steps: the sync-free step of `fast` against the plain eager step of `reference` (equal weights)."""
    opt_ref, opt_fast = adamw(reference), adamw(fast)
    step = CapturedTrainStep(fast, opt_fast, max_grad_norm=0.5, use_cuda_graph=False)
    for i in range(2):
        data = batch(seed=i)
        loss_ref, _ = eager_step(reference, opt_ref, data, max_grad_norm=0.5)
        out = step(data)
        assert torch.allclose(out.loss, loss_ref.to(out.loss.dtype), rtol=1e-12, atol=0)
        assert rel_err(params_of(fast), params_of(reference)) < params_rtol


@pytest.mark.parametrize("K", [1, 5])
def test_sync_free_step_equals_the_plain_step_at_other_K(K):
    """One WRITE step (the comparison matrix's K=1 cell) and five, besides the default two."""
    assert_sync_free_steps_equal_plain_steps(tiny_model(K=K), tiny_model(K=K), params_rtol=1e-12)


def test_sync_free_step_with_lean_ops_equals_the_plain_step():
    """(lean against eager ops in float64: tests/test_lean_ops.py; transformers runs float64 RMSNorm in float32)"""
    assert_sync_free_steps_equal_plain_steps(tiny_model(lean_ops=True), tiny_model(lean_ops=True), params_rtol=1e-12)


def test_sync_free_step_with_the_recomputed_write_equals_the_plain_step():
    """recompute_write without dropout: fast_step takes it (the recomputation leaves the random state alone), and its
    steps equal the plain steps of the stored-graph model (float64)."""
    assert_sync_free_steps_equal_plain_steps(tiny_model(), tiny_model(recompute_write=True), params_rtol=1e-10)


def test_sync_free_rmt_step_equals_the_plain_step():
    """The forward-only baseline through the same step: K=2 writes, memory projection, reconstruction loss."""
    assert fast_step._step_problem(tiny_rmt(), None) is None
    assert "gradient checkpointing" in tiny_rmt(use_gradient_checkpointing=True).captured_step_problem()
    assert_sync_free_steps_equal_plain_steps(tiny_rmt(), tiny_rmt(), params_rtol=1e-12)


def test_non_finite_step_is_skipped_without_a_trace():
    model = tiny_model()
    opt = adamw(model)
    step = CapturedTrainStep(model, opt, use_cuda_graph=False)
    step(batch(seed=0))
    before = params_of(model)
    state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    hook = model.mem.register_hook(lambda g: g * float("inf"))
    for _ in range(2):
        out = step(batch(seed=1))
        assert out.finite.item() == 0.0 and not torch.isfinite(out.grad_norm)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state_before[k][n]) for n, v in s.items())
    assert step.skip_counts() == {"skipped_steps": 2, "consecutive_skipped": 2, "longest_skip_run": 2}
    out = step(batch(seed=2))
    assert out.finite.item() == 1.0
    assert step.skip_counts() == {"skipped_steps": 2, "consecutive_skipped": 0, "longest_skip_run": 2}
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0  # skipped steps do not count


def test_precision_flags_coexist_with_the_fp32_precision_api():
    """The HF Trainer's tf32=True sets torch's new fp32_precision API, after which reading the legacy allow_tf32
    raises: precision_flags must work through the new API and restore what it found."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with fast_step.precision_flags("fp32"):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with fast_step.precision_flags("tf32"):
            assert matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
        matmul.fp32_precision = "ieee"
        with fast_step.precision_flags("bf16"):  # the fp32 matmuls autocast leaves (lean ops' backward) on TF32
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = saved


def test_fallback_reasons_and_errors():
    model = tiny_model()
    if not torch.cuda.is_available():
        assert fast_path_problem(model, adamw(model)) == "CUDA is not available"
        with pytest.raises(ValueError, match="CUDA is not available"):
            CapturedTrainStep(model, adamw(model))  # use_cuda_graph=True needs CUDA
    assert "gradient accumulation" in fast_step._step_problem(model, adamw(model), gradient_accumulation_steps=2)
    assert "distributed" in fast_step._step_problem(model, adamw(model), world_size=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert "not torch AdamW" in fast_step._step_problem(model, sgd)
    with pytest.raises(ValueError, match="not torch AdamW"):
        CapturedTrainStep(model, sgd, use_cuda_graph=False)
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        CapturedTrainStep(model, torch.optim.AdamW([model.mem]), use_cuda_graph=False)
    with pytest.raises(ValueError, match="unknown precision"):
        CapturedTrainStep(model, adamw(model), precision="fp16", use_cuda_graph=False)
    step = CapturedTrainStep(model, adamw(model), use_cuda_graph=False)
    with pytest.raises(ValueError, match="lacks"):
        step({"context_input_ids": batch()["context_input_ids"]})


def tiny_lm(kind="llama", attn="sdpa", dtype=torch.float64, seed=0, width=32):
    """The matrix's full-context baselines, tiny: Llama (attention `attn`) or Mamba with the parallel scan."""
    torch.manual_seed(seed)
    if kind == "llama":
        lm = LlamaForCausalLM(LlamaConfig(**{**tiny_llama(width).to_dict(), "tie_word_embeddings": False},
                                          attn_implementation=attn))
    else:
        lm = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=width, state_size=4, num_hidden_layers=2,
                                          expand=2, conv_kernel=4, pad_token_id=PAD))
        assert use_parallel_scan(lm) == 2 or importlib.util.find_spec("mamba_ssm") is not None
    lm.config.use_cache = False
    return lm.to(dtype).train()


def lm_batch(B=3, T=16, seed=1, device="cpu"):
    """CausalLMCollator's layout: right-padded input_ids, attention_mask, labels on the target tokens only."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, T - 5:], attention_mask[0, T - 5:] = PAD, 0  # a shorter row, padded on the right
    labels = torch.full_like(input_ids, -100)
    labels[:, T - 9:T - 5] = input_ids[:, T - 9:T - 5]
    return {name: t.to(device) for name, t in
            (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))}


@contextlib.contextmanager
def no_host_reads():
    """Any read of a tensor's value into Python (what a CUDA graph cannot record) raises."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("kind,attn", [("llama", "eager"), ("llama", "sdpa"), ("mamba", None)])
def test_full_context_step_has_the_loss_and_gradients_of_the_padded_lm(kind, attn):
    """The causal mask alone on a right-padded batch: the LM's loss and gradients with its 2D padding mask; and the
    forward and backward read nothing back to the host (with its 2D mask, the sdpa Llama does)."""
    lm = tiny_lm(kind, attn)
    data = lm_batch()
    params = [p for p in lm.parameters() if p.requires_grad]
    loss = lm(**data).loss
    grads = torch.autograd.grad(loss, params)
    with no_host_reads():
        loss_step = FullContextStep(lm)(data["input_ids"], data["labels"]).loss
        grads_step = torch.autograd.grad(loss_step, params)
    torch.testing.assert_close(loss_step, loss, rtol=1e-12, atol=0)
    assert rel_err(grads_step, grads) <= 1e-12
    if attn == "sdpa":
        with pytest.raises(AssertionError, match="host read"), no_host_reads():
            lm(**data)


@pytest.mark.parametrize("kind", ["llama", "mamba"])
def test_sync_free_lm_step_equals_the_plain_step(kind):
    """The full-context LM through CapturedTrainStep (eager, float64) against the HF Trainer's step with the padding
    mask: the same loss and parameters over two steps; the batch's attention_mask is not read."""
    reference, fast = tiny_lm(kind), tiny_lm(kind)
    opt_ref, opt_fast = adamw(reference), adamw(fast)
    step = CapturedTrainStep(fast, opt_fast, max_grad_norm=0.5, use_cuda_graph=False)
    assert step.input_names == ("input_ids", "labels")
    for i in range(2):
        data = lm_batch(seed=i)
        loss_ref, norm_ref = eager_step(reference, opt_ref, data, max_grad_norm=0.5)
        out = step(data)
        assert torch.allclose(out.loss, loss_ref.to(out.loss.dtype), rtol=1e-12, atol=0)
        assert torch.allclose(out.grad_norm.double(), norm_ref, rtol=1e-6)  # packed as fp32
        assert rel_err(params_of(fast), params_of(reference)) < 1e-12 and out.stats == {}
    with pytest.raises(ValueError, match="lacks"):
        step({"input_ids": lm_batch()["input_ids"]})


def test_other_lms_have_no_captured_step():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert fast_step.step_module(gpt2) is None
    assert "not GPT2LMHeadModel" in fast_step._step_problem(gpt2, adamw(gpt2))
    assert "not LlamaModel" in fast_step._step_problem(tiny_lm().model, None)  # no LM head, no loss
    lm = tiny_lm()
    lm.config._attn_implementation = "flex_attention"  # its mask is a BlockMask, not a 4D tensor
    assert "'flex_attention' takes no ready 4D causal mask" in fast_step._step_problem(lm, adamw(lm))
    lm = tiny_lm()
    (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    assert "gradient checkpointing" in fast_step._step_problem(lm, adamw(lm))
    assert fast_step._step_problem(tiny_lm("mamba"), None) is None


# ------------------------------------------------------------------------------------------------------------------
# GPU: the recorded graph replays the eager step


def _cuda_pair(attn, precision="fp32", seed=0, lean_ops=False):
    """(eager reference, model for the captured step: with lean_ops if asked), equal weights."""
    models = [tiny_model(attn, dtype=torch.float32, seed=seed, width=64, lean_ops=lean).cuda()
              for lean in (False, lean_ops)]
    return models, [adamw(m, weight_decay=0.01) for m in models]


tiny_llama_lm, tiny_mamba_lm = functools.partial(tiny_lm, "llama"), functools.partial(tiny_lm, "mamba")


@pytest.mark.gpu
@pytest.mark.parametrize("build,attn,lean_ops", [
    (tiny_model, "eager", False), (tiny_model, "exact_eager", False), (tiny_model, "fused_double_bwd", False),
    (tiny_model, "fused_double_bwd", True), (tiny_rmt, "eager", False), (tiny_rmt, "sdpa", False),
    pytest.param(tiny_llama_lm, "sdpa", False, id="llama_lm-sdpa"),
    pytest.param(tiny_llama_lm, "eager", False, id="llama_lm-eager"),
    pytest.param(tiny_mamba_lm, None, False, id="mamba_lm")])
def test_captured_step_equals_eager_step(build, attn, lean_ops):
    """GradMem, RMT and the full-context LMs (eager reference: with the padding mask). First step from equal
    weights: loss, gradient norm and clipped gradients within 1e-5 (strict fp32). Later steps (learning rate changed
    between them, as a scheduler does): parameters still agree to 1e-4; AdamW and the meta-gradient amplify fp32
    rounding from step to step, so later steps are not held to 1e-5. With lean_ops the captured step runs the lean
    SwiGLU and RMSNorm and the eager reference does not."""
    if build is tiny_model:
        (reference, fast), (opt_ref, opt_fast) = _cuda_pair(attn, lean_ops=lean_ops)
    else:
        (reference, fast) = [build(attn, dtype=torch.float32, width=64).cuda() for _ in range(2)]
        opt_ref, opt_fast = adamw(reference, weight_decay=0.01), adamw(fast, weight_decay=0.01)
    step = CapturedTrainStep(fast, opt_fast, max_grad_norm=0.5, precision="fp32")
    with fast_step.precision_flags("fp32"):
        for i, lr in enumerate([1e-3, 3e-4, 1e-4]):
            for opt in (opt_ref, opt_fast):
                opt.param_groups[0]["lr"] = lr  # a float replaces the lr tensor, as a plain scheduler would
            data = (lm_batch if build in (tiny_llama_lm, tiny_mamba_lm) else batch)(seed=i, device="cuda")
            loss_ref, norm_ref = eager_step(reference, opt_ref, data, max_grad_norm=0.5)
            out = step(data)
            if i == 0:
                assert abs(out.loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
                assert abs(out.grad_norm.item() - norm_ref.item()) <= 1e-5 * norm_ref.item()
                grads_ref = [p.grad for p in reference.parameters() if p.requires_grad]
                grads = [p.grad for p in fast.parameters() if p.requires_grad]
                assert rel_err(grads, grads_ref) <= 1e-5
            assert rel_err(params_of(fast), params_of(reference)) < 1e-4
    assert len(step.recorded_shapes) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_step_with_the_recomputed_write(precision):
    """The recomputed WRITE recorded in a CUDA graph (no dropout: no random state to replay), lean ops and the fused
    attention on: the first step's loss and clipped gradients as the stored-graph model's eager step (strict fp32:
    1e-5; bf16: both under autocast, 5e-2), and the graph replays."""
    (reference, fast), (opt_ref, opt_fast) = _cuda_pair("fused_double_bwd", lean_ops=True)
    fast.config.recompute_write = True
    step = CapturedTrainStep(fast, opt_fast, max_grad_norm=0.5, precision=precision)
    data = batch(seed=0, device="cuda")
    with fast_step.precision_flags(precision):
        with fast_step.autocast_for(precision):
            loss_ref = reference(**data).loss
        loss_ref.backward()
    torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 0.5)
    out = step(data)
    tol = 1e-5 if precision == "fp32" else 5e-2
    assert abs(out.loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    grads_ref = [p.grad for p in reference.parameters() if p.requires_grad]
    grads = [p.grad for p in fast.parameters() if p.requires_grad]
    assert rel_err(grads, grads_ref) <= tol
    assert len(step.recorded_shapes) == 1
    assert all(torch.isfinite(step(batch(seed=i, device="cuda")).loss) for i in (1, 2))


@pytest.mark.gpu
def test_captured_step_skips_non_finite_steps_and_handles_new_shapes(caplog):
    model = tiny_model("eager", dtype=torch.float32).cuda()
    opt = adamw(model)
    step = CapturedTrainStep(model, opt, max_graphs=1)
    step(batch(device="cuda"))
    before = params_of(model)
    hook = model.mem.register_hook(lambda g: g * float("inf"))
    bad = CapturedTrainStep(model, opt, max_graphs=1)  # a second step object records the hook into its graph
    for _ in range(3):
        assert bad(batch(seed=5, device="cuda")).finite.item() == 0.0
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert bad.skip_counts() == {"skipped_steps": 3, "consecutive_skipped": 3, "longest_skip_run": 3}
    with caplog.at_level(logging.WARNING, logger="gradmem"):
        out = step(batch(S=16, device="cuda"))  # a second shape with max_graphs=1: eager, logged
    assert out.finite.item() == 1.0 and "runs eagerly" in caplog.text
    assert len(step.recorded_shapes) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("lean_ops", [False, True])
def test_captured_lower_precision_modes_run(precision, lean_ops):
    model = tiny_model("eager", dtype=torch.float32, lean_ops=lean_ops).cuda()
    step = CapturedTrainStep(model, adamw(model), precision=precision)
    losses = [step(batch(seed=0, device="cuda")).loss.item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# the trainer: fast step by default on CUDA, eager with a log line elsewhere


def _kv_run(tmp_path, name, fast_step="auto", use_cpu=True, max_steps=3):
    import kv_dataset_utils
    from datasets import Dataset, DatasetDict

    from training_args import TrainArgs
    from training_backbone import build_backbone_config
    from training_collators import MemoryModelCollator, make_compute_metrics
    from training_experiment import run_experiment

    tok = kv_dataset_utils.load_kv_tokenizer(62)
    spec = kv_dataset_utils.parse_dataset_name("N2-K2V2-V62")
    splits = DatasetDict({split: Dataset.from_dict(kv_dataset_utils.generate_kv_samples(spec, n, 0, stream))
                          for split, n, stream in (("train", 48, 0), ("valid", 16, 1))})
    torch.manual_seed(0)
    config = GradMemGPTConfig(base_config=build_backbone_config("llama", 2, 2, 32, tok), n_mem_tokens=2, K=2,
                              lr=0.04, use_write_head=True, add_inner_loss_to_outer=True, inner_loss_weight=0.5,
                              attn_implementation="eager")
    model = GradMemGPT(config)
    args = TrainArgs(exp_path=str(tmp_path / name), per_device_batch_size=8, max_steps=max_steps, eval_steps=max_steps,
                     logging_steps=1, warmup_steps=0, learning_rate=3e-3, report_to="none", dataloader_num_workers=0,
                     stop_metric_value=None, use_cpu=use_cpu, fast_step=fast_step, fp32=True)
    metrics = run_experiment(args, model, tok, splits, MemoryModelCollator(tok), make_compute_metrics(tok),
                             data_name="kv_test")
    return model, metrics


def test_trainer_falls_back_to_eager_steps_with_a_log_line(tmp_path, caplog):
    from training_args import TrainArgs

    with pytest.raises(ValueError, match="--fast_step must be auto or off"):
        TrainArgs(fast_step="on").validate()
    with caplog.at_level(logging.INFO, logger="gradmem"):
        _, metrics = _kv_run(tmp_path, "cpu", max_steps=2)
    assert "device cpu" in caplog.text and "precision fp32 | attention eager | fast step off (not on CUDA) | lean " \
        "ops off" in caplog.text  # one setup line at the start, the fast-step and lean-ops decisions included
    assert metrics["global_step"] == 2 and metrics["skipped_steps"] == 0


@pytest.mark.gpu
def test_trainer_fast_step_matches_eager_steps(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gradmem"):
        fast_model, fast_metrics = _kv_run(tmp_path, "fast", use_cpu=False)
    assert "fast step on" in caplog.text
    eager_model, eager_metrics = _kv_run(tmp_path, "eager", fast_step="off", use_cpu=False)
    assert fast_metrics["global_step"] == eager_metrics["global_step"] == 3
    assert fast_metrics["skipped_steps"] == 0
    assert rel_err(params_of(fast_model), params_of(eager_model)) < 1e-4
