"""GradMem model tests: gradient identities in float64 on tiny llama / gpt2 backbones, plus the model contracts."""
import json
import re
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GPT2Config, LlamaConfig, MistralConfig

from grad_memgpt import GradMemGPT, GradMemGPTConfig, check_right_padding
from modeling_utils import get_backbone

PAD = 0


def exact_float64_llama_patches():
    """transformers' llama computes RMSNorm and the attention softmax in float32 even for float64 inputs, which
    limits finite differences to ~1e-3 relative. For the gradient identities, patch in the same math without the
    downcast (gpt2 needs nothing: it stays in the input dtype)."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    return [(modeling_llama.LlamaRMSNorm, "forward", rms_norm),
            (modeling_llama, "eager_attention_forward", eager_attention)]


@pytest.fixture(autouse=True)
def exact_float64_llama(monkeypatch):
    for target, name, value in exact_float64_llama_patches():
        monkeypatch.setattr(target, name, value)


def tiny_backbone(arch: str, **overrides):
    if arch == "llama":
        config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=PAD, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    else:
        raise ValueError(arch)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def tiny_model(arch="llama", seed=0, dtype=torch.float64, backbone_overrides=None, **options):
    torch.manual_seed(seed)
    options.setdefault("n_mem_tokens", 3)
    options.setdefault("attn_implementation", "eager")  # the float64 patches above are transformers' eager attention
    if options.get("mem_proj_mode", "none") != "none":
        options["use_mem_proj"] = True
    config = GradMemGPTConfig(base_config=tiny_backbone(arch, **(backbone_overrides or {})), **options)
    model = GradMemGPT(config).to(dtype)
    with torch.no_grad():  # move off the identity init so that mem_proj terms are generic
        if model.mem_proj is not None:
            model.mem_proj.weight.add_(0.1 * torch.randn_like(model.mem_proj.weight))
            model.mem_proj.bias.add_(0.05 * torch.randn_like(model.mem_proj.bias))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters do something
                param.normal_(0.0, 0.3)
    return model


# right-padded batch: context lengths 5, 7, 2; one query row shorter than the others
CONTEXT = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [8, 9, 10, 11, 12, 13, 14], [15, 16, 0, 0, 0, 0, 0]])
QUERY = torch.tensor([[3, 4, 5, 6, 0], [17, 18, 9, 10, 11], [5, 6, 7, 8, 9]])
LABELS = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 10, 11], [-100, 6, 7, 8, 9]])
BATCH = dict(context_input_ids=CONTEXT, query_input_ids=QUERY, labels=LABELS)


def loss_of(model, batch=BATCH):
    return model(**batch).loss


def grads_of(model, batch=BATCH):
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def directional_fd(model, name, direction, eps=1e-6, batch=BATCH):
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        param.add_(eps * direction)
        plus = loss_of(model, batch)
        param.sub_(2 * eps * direction)
        minus = loss_of(model, batch)
        param.add_(eps * direction)
    return ((plus - minus) / (2 * eps)).item()


def check_meta_gradient(model, names, eps=1e-6, rel=1e-6):
    """Analytic directional derivatives of the outer loss vs float64 central finite differences; returns both."""
    grads = grads_of(model)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    results = {}
    for name in names:
        direction = torch.randn(params[name].shape, generator=generator, dtype=params[name].dtype)
        analytic = (grads[name] * direction).sum().item()
        numeric = directional_fd(model, name, direction, eps=eps)
        assert analytic == pytest.approx(numeric, rel=rel, abs=1e-9), name
        results[name] = (analytic, direction)
    return results


LLAMA_WEIGHT = "model.model.layers.0.self_attn.v_proj.weight"
GPT2_WEIGHT = "model.transformer.h.0.attn.c_attn.weight"

SECOND_ORDER_CASES = [
    ("llama", dict(lr=3.0, use_write_head=True, n_ctrl_tokens=1)),
    ("llama", dict(lr=0.05, use_adam=True, use_write_head=True, n_ctrl_tokens=1)),
    ("llama", dict(lr=3.0, mem_proj_mode="proj", n_ctrl_tokens=1)),
    ("llama", dict(lr=3.0, mem_proj_mode="per_sample", use_write_head=True)),
    ("llama", dict(lr=0.05, use_adam=True, mem_proj_mode="per_sample", n_ctrl_tokens=1)),
    ("llama", dict(lr=3.0, K=1, use_write_head=True, add_inner_loss_to_outer=True, inner_loss_weight=0.5)),  # K=1
    ("llama", dict(lr=3.0, K=3, inner_clip_norm=0.05, inner_clip_value=0.02, add_inner_loss_to_outer=True,
                   inner_loss_weight=0.5, use_write_head=True, n_ctrl_tokens=1, use_write_lora=True,
                   write_lora_r=2, write_lora_target_modules="q_proj,v_proj")),
    ("gpt2", dict(lr=3.0, use_write_head=True, n_ctrl_tokens=1, mem_proj_mode="proj")),
    ("gpt2", dict(lr=0.05, use_adam=True, mem_proj_mode="per_sample", n_ctrl_tokens=1, use_write_head=True)),
]


@pytest.mark.parametrize("arch,options", SECOND_ORDER_CASES)
def test_second_order_meta_gradient_matches_finite_differences(arch, options):
    model = tiny_model(arch, **options)
    names = ["mem", LLAMA_WEIGHT if arch == "llama" else GPT2_WEIGHT]
    if model.write_head is not None:
        names.append("write_head.weight")
    if model.write_start is not None:
        names += ["write_start", "write_end"]
    if model.mem_proj is not None:
        names.append("mem_proj.weight")
    if model.config.use_write_lora:
        names += ["model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                  "model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
        names[1] = "model.model.layers.0.mlp.up_proj.weight"
    # Adam's first step is nearly lr * sign(g): around tiny gradient entries the loss is strongly curved, so the
    # finite difference needs a smaller step and a looser tolerance (still far tighter than the first-order gap).
    rel = 1e-4 if model.config.use_adam else 1e-6
    results = check_meta_gradient(model, names, eps=1e-7 if model.config.use_adam else 1e-6, rel=rel)
    # The check can fail: first-order MAML (for Adam: moments as constants) gives a clearly different meta-gradient.
    model.config.grad_mode = "first"
    first_order = grads_of(model)
    for name in ("mem", names[1]):
        analytic, direction = results[name]
        gap = abs((first_order[name] * direction).sum().item() - analytic)
        assert gap > 100 * rel * abs(analytic), name


def reference_write(model, context, second_order_steps):
    """An independent, deliberately naive WRITE: one sample at a time, no padding, plain SGD on the memory
    (no mem_proj). Returns the final memories [B, M, d] and the per-sample losses at them."""
    config = model.config
    decoder = get_backbone(model.model)
    embed = model.model.get_input_embeddings()
    head = model.write_head if model.write_head is not None else model.model.get_output_embeddings()
    offset = model.mem_offset

    def loss_at(memory, tokens):
        parts = [memory]
        if model.write_start is not None:
            parts = [model.write_start[None], memory, model.write_end[None]]
        x = torch.cat(parts + [embed(tokens)[None]], dim=1)
        h = decoder(inputs_embeds=x).last_hidden_state[0]
        return F.cross_entropy(head(h[offset - 1 : -1]), tokens)

    memories, final_losses = [], []
    for row in context:
        tokens = row[row != PAD]
        memory = model.mem[None]
        for k in range(config.K if len(tokens) else 0):
            grad, = torch.autograd.grad(loss_at(memory, tokens), memory,
                                        create_graph=k >= config.K - second_order_steps)
            memory = memory - config.lr * grad
        memories.append(memory)
        if len(tokens):
            final_losses.append(loss_at(memory, tokens).detach())
    return torch.cat(memories), torch.stack(final_losses)


def reference_outer_loss(model, memory):
    logits = model.read(memory, QUERY)
    return F.cross_entropy(logits.flatten(0, 1), LABELS.flatten(), ignore_index=-100)


@pytest.mark.parametrize("K,last", [(2, 2), (2, 1), (3, 1), (3, 2), (2, 0)])
def test_last_K_second_order_differentiates_exactly_the_last_steps(K, last):
    model = tiny_model(lr=3.0, K=K, last_K_second_order=last, use_write_head=True, n_ctrl_tokens=1)
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    memory, _ = reference_write(model, CONTEXT, second_order_steps=last)
    reference_outer_loss(model, memory).backward()
    reference = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert reference.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


def test_training_without_the_final_inner_loss_saves_one_forward_and_changes_no_gradient():
    """train_final_inner_loss=False drops the statistic's forward in training only: the same loss and gradients
    (float64), one backbone forward fewer per step, no inner_loss / inner_loss_step_K stats; evaluation keeps them."""
    measured, lean = (tiny_model(K=2, lr=0.5, use_write_head=True, add_inner_loss_to_outer=True,
                                 train_final_inner_loss=flag) for flag in (True, False))
    calls = {}
    for name, model in (("measured", measured), ("lean", lean)):
        calls[name] = 0
        get_backbone(model.model).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    out_measured, out_lean = measured(**BATCH), lean(**BATCH)
    assert calls == {"measured": 4, "lean": 3}  # K=2 inner forwards (+ 1 measuring) + READ
    assert "inner_loss" not in out_lean.stats and "inner_loss_step_2" not in out_lean.stats
    assert {"inner_loss", "inner_loss_step_2"} <= set(out_measured.stats)
    torch.testing.assert_close(out_lean.loss, out_measured.loss, rtol=0, atol=0)
    grads = {}
    for name, model, out in (("measured", measured, out_measured), ("lean", lean, out_lean)):
        out.loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["lean"].keys() == grads["measured"].keys()
    for n in grads["lean"]:
        torch.testing.assert_close(grads["lean"][n], grads["measured"][n], rtol=1e-12, atol=0, msg=n)
    lean.eval()
    with torch.no_grad():
        assert "inner_loss_step_2" in lean(**BATCH).stats


def test_write_matches_naive_per_sample_reference_and_reports_the_final_inner_loss():
    model = tiny_model(lr=3.0, K=2, use_write_head=True, n_ctrl_tokens=1)
    with torch.no_grad():
        memory, stats = model.write(CONTEXT)
    reference, final_losses = reference_write(model, CONTEXT, second_order_steps=0)
    torch.testing.assert_close(memory, reference.detach(), rtol=1e-10, atol=1e-12)
    # inner_loss = mean per-sample loss at the final memory (after the last update), written rows only
    assert stats["inner_loss"].item() == pytest.approx(final_losses.mean().item(), rel=1e-6)
    assert stats["inner_loss_step_2"] == stats["inner_loss"]
    assert stats["inner_loss_step_2"] < stats["inner_loss_step_0"]
    expected = {"inner_loss", "inner_loss_step_0", "inner_loss_step_1", "inner_loss_step_2", "written_frac"}
    for prefix in ("inner_grad_norm", "mem_norm", "delta_mem_norm"):
        expected |= {f"{prefix}_mean", f"{prefix}_max", f"{prefix}_min"}
    assert set(stats) == expected
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32 for v in stats.values())


@pytest.mark.parametrize("use_adam", [False, True])
def test_first_order_is_fomaml(use_adam):
    model = tiny_model(lr=0.05 if use_adam else 3.0, use_adam=use_adam, grad_mode="first", use_write_head=True,
                       n_ctrl_tokens=1)
    grads = grads_of(model)
    # FOMAML: memory_K is treated as memory_init + constant, so d loss / d init = sum_i d loss / d memory_K[i], and
    # the weights get only their READ gradient; write-only parameters get nothing.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        memory, _ = model.write(CONTEXT)
    memory.requires_grad_(True)
    reference_outer_loss(model, memory).backward()
    torch.testing.assert_close(grads["mem"], memory.grad.sum(0), rtol=1e-9, atol=1e-12)
    for name, param in model.named_parameters():
        if name == "mem":
            continue
        if param.grad is None:
            assert name not in grads, name
        else:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)
    for name in ("write_head.weight", "write_start", "write_end"):
        assert name not in grads


@pytest.mark.parametrize("mode", ["proj", "per_sample"])
def test_none_leaves_memory_init_and_write_only_parameters_untouched(mode):
    model = tiny_model(grad_mode="none", lr=3.0, use_write_head=True, n_ctrl_tokens=1, mem_proj_mode=mode)
    grads = grads_of(model)
    untouched = {"mem", "write_head.weight", "write_start", "write_end"}
    if mode == "per_sample":
        untouched |= {"mem_proj.weight", "mem_proj.bias"}
    assert not untouched & grads.keys()
    assert {"read_start", "read_end", LLAMA_WEIGHT} <= grads.keys()
    if mode == "proj":
        assert "mem_proj.weight" in grads  # applied at READ


@pytest.mark.parametrize("options", [
    dict(lr=3.0, use_write_head=True, n_ctrl_tokens=1, mem_proj_mode="per_sample"),
    dict(lr=0.05, use_adam=True, inner_clip_norm=0.05, mem_proj_mode="proj"),
])
def test_per_sample_independence_of_batch_and_padding(options):
    model = tiny_model(**options)
    with torch.no_grad():
        memory, _ = model.write(CONTEXT)
        logits = model.read(memory, QUERY)
        init_memory, _ = GradMemGPT.write(model, torch.zeros(1, 0, dtype=torch.long))  # K steps on no tokens
        for i in range(CONTEXT.shape[0]):
            length = int((CONTEXT[i] != PAD).sum())
            alone, _ = model.write(CONTEXT[i : i + 1, :length])
            torch.testing.assert_close(memory[i : i + 1], alone, rtol=1e-10, atol=1e-12)
            q_length = int((QUERY[i] != PAD).sum())
            alone_logits = model.read(alone, QUERY[i : i + 1, :q_length])
            torch.testing.assert_close(logits[i : i + 1, :q_length], alone_logits, rtol=1e-10, atol=1e-12)
        # an all-padding row inside a batch is not written: it keeps the initial memory, the others are unchanged
        padded = torch.cat([CONTEXT, torch.zeros(1, CONTEXT.shape[1], dtype=torch.long)])
        memory_padded, stats = model.write(padded)
    torch.testing.assert_close(memory_padded[:3], memory, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memory_padded[3], init_memory[0], rtol=0, atol=1e-14)
    assert stats["written_frac"].item() == pytest.approx(0.75)
    assert all(torch.isfinite(v) for v in stats.values())


def test_all_padding_rows_keep_second_order_gradients_finite():
    model = tiny_model(lr=0.05, use_adam=True, inner_clip_norm=0.05, mem_proj_mode="per_sample")
    batch = dict(BATCH, context_input_ids=CONTEXT.clone())
    batch["context_input_ids"][2] = PAD
    grads = grads_of(model, batch)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_K0_means_no_write():
    model = tiny_model(K=0, mem_proj_mode="proj")
    out = model(**BATCH)
    expected = model.mem_proj(model.mem).expand(3, -1, -1)
    torch.testing.assert_close(out.memory, expected)
    assert set(out.stats) == {"mem_norm_mean", "mem_norm_max", "mem_norm_min", "delta_mem_norm_mean",
                              "delta_mem_norm_max", "delta_mem_norm_min", "written_frac", "target_loss"}
    out.loss.backward()
    assert model.mem.grad is not None and torch.isfinite(model.mem.grad).all()


def test_eval_K_and_eval_lr_apply_outside_training_only():
    trained = tiny_model(K=2, lr=0.5, eval_K=4, eval_lr=0.2, add_inner_loss_to_outer=True)
    same_steps = tiny_model(K=4, lr=0.2, add_inner_loss_to_outer=True)  # the same weights (same seed)
    reference = tiny_model(K=2, lr=0.5, add_inner_loss_to_outer=True)
    trained.eval(), same_steps.eval()
    with torch.no_grad():
        out = trained(**BATCH)
        torch.testing.assert_close(out.memory, same_steps(**BATCH).memory)
        torch.testing.assert_close(out.loss, same_steps(**BATCH).loss)
    assert "inner_loss_step_4" in out.stats
    trained.train(), reference.train()
    out = trained(**BATCH)  # training writes with K / lr, and the second-order graph is the usual one
    torch.testing.assert_close(out.memory, reference(**BATCH).memory)
    assert "inner_loss_step_4" not in out.stats
    torch.testing.assert_close(grads_of(trained), grads_of(reference))


def test_no_grad_builds_no_second_order_graph(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    model = tiny_model(K=3, lr=3.0, add_inner_loss_to_outer=True)
    model.eval()
    with torch.no_grad():
        out = model(**BATCH)
    assert calls == [False, False, False]
    assert not out.memory.requires_grad and not out.loss.requires_grad
    with_grad = model(**BATCH)  # eval() alone does not change the math: gradients stay exact
    assert calls[3:] == [True, True, True]
    assert with_grad.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    assert out.stats["inner_loss_outer"] == out.stats["inner_loss_step_2"]


def test_write_lora_is_active_only_in_write():
    torch.manual_seed(0)
    fresh = GradMemGPT(GradMemGPTConfig(base_config=tiny_backbone("llama"), use_write_lora=True, write_lora_r=2))
    assert all(p.abs().max() == 0 for n, p in fresh.named_parameters() if "lora_B" in n)  # peft's init kept
    model = tiny_model(lr=3.0, use_write_lora=True, write_lora_r=2)
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    with torch.no_grad():
        memory, _ = model.write(CONTEXT)
        logits = model.read(memory, QUERY)
        for name, p in lora.items():
            if "lora_B" in name:
                p.zero_()  # adapters now compute the identity
        memory_without, _ = model.write(CONTEXT)
        logits_without = model.read(memory, QUERY)
    assert (memory - memory_without).abs().max() > 1e-3  # the adapters change WRITE ...
    torch.testing.assert_close(logits, logits_without, rtol=0, atol=0)  # ... and not READ
    assert all(p.requires_grad for p in lora.values())


def test_freeze_backbone_trains_only_memory_parts():
    model = tiny_model(freeze_backbone=True, use_write_lora=True, use_write_head=True, n_ctrl_tokens=1,
                       mem_proj_mode="proj", lr=3.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    own = {"mem", "mem_proj.weight", "mem_proj.bias", "write_head.weight", "write_start", "write_end",
           "read_start", "read_end"}
    assert own <= trainable
    assert all(name in own or "lora_" in name for name in trainable)
    grads = grads_of(model)
    assert set(grads) == trainable


def test_generate_is_the_teacher_forced_argmax():
    model = tiny_model(lr=3.0, n_ctrl_tokens=1)
    with torch.no_grad():
        memory, _ = model.write(CONTEXT)
    generated = model.generate(memory, QUERY, max_new_tokens=4)
    lengths = (QUERY != PAD).sum(1)
    for i in range(QUERY.shape[0]):
        sequence = torch.cat([QUERY[i, : lengths[i]], generated[i]])[None]
        with torch.no_grad():
            argmax = model.read(memory[i : i + 1], sequence).argmax(-1)[0]
        assert argmax[lengths[i] :].tolist() == generated[i].tolist()
    # eos: the row stops after emitting it, the rest is padding
    eos = int(generated[0, 1])
    with_eos = model.generate(memory, QUERY, max_new_tokens=4, eos_token_id=eos)
    assert with_eos[0].tolist() == generated[0, :2].tolist() + [PAD, PAD]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_round_trip_and_memory_file(tmp_path, arch):
    overrides = {"tie_word_embeddings": True} if arch == "llama" else {}
    model = tiny_model(arch, dtype=torch.float32, backbone_overrides=overrides, lr=3.0, use_write_head=True,
                       n_ctrl_tokens=1, mem_proj_mode="per_sample", use_write_lora=arch == "llama")
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        out = model(**BATCH)
    torch.save(out.memory, tmp_path / "memory.pt")

    loaded = AutoModel.from_pretrained(tmp_path / "model")
    assert isinstance(loaded, GradMemGPT)
    saved, reloaded = (json.loads(c.to_json_string(use_diff=False)) for c in (model.config, loaded.config))
    saved.pop("_name_or_path"), reloaded.pop("_name_or_path")
    assert reloaded == saved
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        torch.testing.assert_close(loaded_state[key], state[key], rtol=0, atol=0, msg=key)
    lm = loaded.model
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == (
        model.model.get_output_embeddings().weight is model.model.get_input_embeddings().weight)
    with torch.no_grad():
        loaded_out = loaded(**BATCH)
        memory = torch.load(tmp_path / "memory.pt")
        read_later = loaded.read(memory, QUERY)
    torch.testing.assert_close(loaded_out.logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(read_later, out.logits, rtol=1e-5, atol=1e-6)


def test_auto_classes_and_default_pad_token():
    config = AutoConfig.for_model("grad_memgpt", base_config=tiny_backbone("gpt2", pad_token_id=None).to_dict())
    assert isinstance(config, GradMemGPTConfig)
    model = AutoModel.from_config(config)
    assert isinstance(model, GradMemGPT)
    assert model.pad_token_id == 1  # eos when the backbone has no pad id


def test_write_head_starts_as_an_untied_copy_of_the_lm_head():
    model = tiny_model(use_write_head=True)
    lm_head = model.model.get_output_embeddings()
    torch.testing.assert_close(model.write_head.weight, lm_head.weight, rtol=0, atol=0)
    assert model.write_head.weight.data_ptr() != lm_head.weight.data_ptr()


def test_gradient_checkpointing_gives_the_same_second_order_gradients():
    model = tiny_model(lr=3.0, use_write_head=True)
    model.train()
    plain = grads_of(model)
    model.activation_checkpointing_enable()
    checkpointed = grads_of(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_sdpa_is_refused_for_second_order_at_build_time():
    with pytest.raises(ValueError, match="double backward"):
        tiny_model(attn_implementation="sdpa")
    tiny_model(attn_implementation="sdpa", grad_mode="first")  # fine without second order


@pytest.mark.parametrize("options,message", [
    (dict(grad_mode="third"), "unknown grad_mode"),
    (dict(K=-1), "K"),
    (dict(n_mem_tokens=0), "n_mem_tokens"),
    (dict(K=2, last_K_second_order=3), "last_K_second_order"),
    (dict(grad_mode="first", last_K_second_order=1), "last_K_second_order"),
    (dict(use_mem_proj=True), "use_mem_proj"),
    (dict(mem_proj_mode="proj"), "use_mem_proj"),
    (dict(mem_proj_mode="diag", use_mem_proj=True), "mem_proj_mode"),
    (dict(inner_clip_norm=0.0), "inner_clip_norm"),
    (dict(inner_loss_weight=0.5), "add_inner_loss_to_outer"),
    (dict(K=0, add_inner_loss_to_outer=True), "K >= 1"),
    (dict(eval_K=-1), "eval_K"),
    (dict(eval_K=2.5), "eval_K"),
    (dict(eval_lr=-0.1), "eval_lr"),
    (dict(write_lora_target_modules="q_proj"), "use_write_lora"),
    (dict(use_write_lora=True, use_gradient_checkpointing=True), "gradient_checkpointing"),
    (dict(pretrained_model="gpt2", base_config={"model_type": "gpt2"}), "not both"),
])
def test_invalid_options_fail_loudly(options, message):
    with pytest.raises(ValueError, match=message):
        GradMemGPTConfig(**options)


@pytest.mark.parametrize("name", ["final_logit_softcapping", "logit_scale"])
def test_a_backbone_that_post_processes_its_logits_is_refused(name):
    """The memory models take logits from the LM head alone; a softcap or logit scale would be skipped silently."""
    with pytest.raises(NotImplementedError, match=name):
        tiny_model(backbone_overrides={name: 30.0})
    tiny_model(backbone_overrides={name: None})


def test_a_write_lora_that_would_train_nothing_loads_but_is_refused_for_training():
    """The reference's scripts default to grad_mode none, so some of its write-LoRA checkpoints have configs whose
    adapters training cannot reach: such a model builds (to load and evaluate); the run scripts refuse to train it."""
    from grad_memgpt import GradMemArgs

    for grad_mode in ("none", "first"):
        model = tiny_model(dtype=torch.float32, use_write_lora=True, grad_mode=grad_mode)
        assert any("lora_" in name for name, _ in model.named_parameters())
        with pytest.raises(ValueError, match="never receive a gradient"):
            GradMemArgs(use_write_lora=True, grad_mode=grad_mode).validate()
    GradMemArgs(use_write_lora=True, grad_mode="first", add_inner_loss_to_outer=True).validate()


def test_every_option_is_declared_once_and_the_config_and_the_command_line_agree():
    """GradMemOptions is the one declaration: the config takes each option as a keyword with its default, the command
    line (GradMemArgs) is derived from it: same order, types (an Optional[bool] is a bool flag defaulting to None),
    defaults and help, renamed only where CLI_NAMES says."""
    import dataclasses
    import inspect

    from grad_memgpt import CLI_NAMES, OPTION_NAMES, GradMemArgs, GradMemOptions
    from training_args import parse_cli

    declared = dataclasses.fields(GradMemOptions)
    command_line = {f.name: f for f in dataclasses.fields(GradMemArgs)}
    assert list(command_line) == [CLI_NAMES.get(f.name, f.name) for f in declared]
    assert CLI_NAMES == {"lr": "inner_lr", "eval_lr": "eval_inner_lr"}  # the reference's config and flag names
    for f in declared:  # (annotations: HfArgumentParser rewrites a parsed dataclass's field.type in place)
        name = CLI_NAMES.get(f.name, f.name)
        derived = command_line[name]
        declared_type = GradMemOptions.__annotations__[f.name]
        assert (GradMemArgs.__annotations__[name], derived.default, dict(derived.metadata)) == (
            bool if declared_type == Optional[bool] else declared_type, f.default, {"help": f.metadata["help"]})
    config = GradMemGPTConfig()
    (parsed,) = parse_cli(GradMemArgs, args=[])
    for f in declared:
        assert getattr(config, f.name) == f.default == getattr(parsed, CLI_NAMES.get(f.name, f.name)), f.name
    assert set(OPTION_NAMES) <= set(config.to_dict())  # saved with every config
    assert set(inspect.signature(GradMemGPTConfig.__init__).parameters) == {"self", "pretrained_model", "base_config",
                                                                            "kwargs"}  # nothing restated
    # the reference config's defaults; attention "auto" (the model resolves it for its device and gradient mode)
    assert (config.n_mem_tokens, config.K, config.lr, config.use_adam, config.grad_mode, config.use_write_head,
            config.add_inner_loss_to_outer, config.inner_loss_weight, config.attn_implementation) == (
        8, 2, 0.01, False, "second", False, False, None, "auto")


def test_one_validation_names_config_options_and_command_line_flags():
    from grad_memgpt import GradMemArgs
    from training_args import parse_cli

    cases = [  # (config keywords, its message, command line, its message): one check, named either way
        (dict(lr=float("nan")), "lr must be a finite number", ["--inner_lr", "nan"], "--inner_lr must be a finite number"),
        (dict(eval_lr=-0.1), "eval_lr (inner lr outside training) must be >= 0",
         ["--eval_inner_lr", "-0.1"], "--eval_inner_lr (inner lr outside training) must be >= 0"),
        (dict(inner_loss_weight=0.5), "inner_loss_weight 0.5 is only used with add_inner_loss_to_outer",
         ["--inner_loss_weight", "0.5"], "--inner_loss_weight 0.5 is only used with --add_inner_loss_to_outer"),
        (dict(K=0, add_inner_loss_to_outer=True), "add_inner_loss_to_outer needs K >= 1",
         ["--K", "0", "--add_inner_loss_to_outer"], "--add_inner_loss_to_outer needs K >= 1"),
    ]
    for options, config_message, flags, cli_message in cases:
        with pytest.raises(ValueError, match="^GradMemGPTConfig: " + re.escape(config_message)):
            GradMemGPTConfig(**options)
        with pytest.raises(ValueError, match="^" + re.escape(cli_message)):
            parse_cli(GradMemArgs, args=flags)
    # the same completion: the added inner loss weighs 1.0 unless a weight is given
    (parsed,) = parse_cli(GradMemArgs, args=["--add_inner_loss_to_outer"])
    assert parsed.inner_loss_weight == GradMemGPTConfig(add_inner_loss_to_outer=True).inner_loss_weight == 1.0


SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "results" / "kv_checkpoints").glob("N*"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_configs_load_with_their_own_options(name):
    """config.json files saved before the options had one home load with the values they hold (the shipped KV
    checkpoints: inner lr 0.04 / 0.08, write head, inner loss weight 0.5, attention auto); those written before eval_K /
    eval_lr, train_final_inner_loss, lean_ops or recompute_write existed lack them and take their defaults (as in
    training; lean ops and recomputation off)."""
    from grad_memgpt import OPTION_NAMES, GradMemOptions

    folder = Path(__file__).resolve().parents[1] / "results" / "kv_checkpoints" / name
    saved = json.loads((folder / "config.json").read_text())
    config = GradMemGPTConfig.from_pretrained(folder)
    defaults = GradMemOptions()
    added_later = {"eval_K", "eval_lr", "train_final_inner_loss", "lean_ops", "recompute_write"}
    assert set(OPTION_NAMES) - set(saved) <= added_later
    for option in OPTION_NAMES:
        assert getattr(config, option) == saved.get(option, getattr(defaults, option)), option
    assert config.use_write_head and config.add_inner_loss_to_outer and config.inner_loss_weight == 0.5


def test_a_saved_eager_model_loads_as_eager(tmp_path):
    model = tiny_model(dtype=torch.float32, attn_implementation="eager")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "eager"
    del saved["eval_K"], saved["eval_lr"]  # as older code wrote it
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = GradMemGPT.from_pretrained(tmp_path)
    assert loaded.config.attn_implementation == "eager" and loaded.model.config._attn_implementation == "eager"
    assert (loaded.config.eval_K, loaded.config.eval_lr) == (None, None)


def test_model_needs_a_backbone_and_known_lora_targets():
    with pytest.raises(ValueError, match="exactly one"):
        GradMemGPT(GradMemGPTConfig())
    mistral = MistralConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(ValueError, match="write_lora_target_modules"):
        GradMemGPT(GradMemGPTConfig(base_config=mistral, use_write_lora=True))


def test_check_right_padding():
    class Tokenizer:
        padding_side = "left"

    with pytest.raises(ValueError, match="right padding"):
        check_right_padding(Tokenizer())
    Tokenizer.padding_side = "right"
    check_right_padding(Tokenizer())


def test_pretrained_backbone_from_a_local_folder_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone("llama"))
    backbone.save_pretrained(tmp_path / "backbone")
    model = GradMemGPT(GradMemGPTConfig(pretrained_model=str(tmp_path / "backbone"), n_mem_tokens=2,
                                        use_write_lora=True, write_lora_r=2))
    for name, value in backbone.state_dict().items():  # pretrained weights kept; adapters start as the identity
        key = name.replace("proj.weight", "proj.base_layer.weight")
        torch.testing.assert_close(model.model.state_dict()[key], value, rtol=0, atol=0)
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(tmp_path / "gradmem")
    (tmp_path / "backbone").rename(tmp_path / "moved")  # the saved config holds the backbone's: loads without it
    loaded = GradMemGPT.from_pretrained(tmp_path / "gradmem")
    assert loaded.config.pretrained_model == str(tmp_path / "backbone")  # provenance only
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, model(**BATCH).logits)


def test_gpt_neox_backbone_with_default_write_lora_targets():
    from transformers import GPTNeoXConfig

    neox = GPTNeoXConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=1)
    torch.manual_seed(0)
    model = GradMemGPT(GradMemGPTConfig(base_config=neox, n_mem_tokens=2, lr=1.0, use_write_lora=True))
    assert any("dense_4h_to_h.lora_A" in n for n, _ in model.named_parameters())
    out = model(**BATCH)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.mem.grad is not None
