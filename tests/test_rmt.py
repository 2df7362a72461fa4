"""RMT2Segm: layout, alignment, gradients through every write, reconstruction loss, options, save/load."""
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GPT2Config, GPTNeoXConfig, LlamaConfig

from transformers.trainer_utils import EvalPrediction

from modeling_utils import get_backbone
from rmt import RMT2Segm, RMT2SegmConfig
from training_collators import make_compute_metrics, reduce_logits_to_predictions

V, PAD = 24, 0


def llama_config(**overrides):
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def gpt2_config():
    return GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=PAD,
                      bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def neox_config():
    return GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=1)


def make_model(dtype=torch.float64, base=None, seed=0, **options) -> RMT2Segm:
    torch.manual_seed(seed)
    options.setdefault("n_mem_tokens", 3)
    # eager attention runs its softmax in float32 even for a float64 model; sdpa stays in float64 (exact checks)
    options.setdefault("attn_implementation", "sdpa")
    model = RMT2Segm(RMT2SegmConfig(base_config=base or llama_config(), **options)).to(dtype)
    return model.eval()


def batch(seed=1, B=3, S=9, Q=6, lengths=(9, 5, 0)):
    """Right-padded context/query ids; sample i has lengths[i] real context tokens."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(1, V, (B, S), generator=g)
    for i, n in enumerate(lengths):
        context[i, n:] = PAD
    query = torch.randint(1, V, (B, Q), generator=g)
    query[0, Q - 1 :] = PAD
    labels = query.clone()
    labels[:, :2] = -100
    labels[query == PAD] = -100
    return context, query, labels


# ------------------------------------------------------------------------------------------------ a hand-written RMT
def reference_forward(model: RMT2Segm, context, query):
    """RMT as the reference writes it: write-out slots after the padding, an attention mask over the pads and
    position_ids = cumsum(mask) - 1, full LM logits, READ logits at P-1+j. Returns (memory, logits, rec_losses)."""
    cfg = model.config
    B, S = context.shape
    M, C = cfg.n_mem_tokens, cfg.n_ctrl_tokens
    P = M + 2 * C
    embed = model.model.get_input_embeddings()
    backbone = get_backbone(model.model)
    ctrl = (lambda name: [getattr(model, name).expand(B, -1, -1)]) if C else (lambda name: [])
    real = context != PAD
    memory = model.mem.expand(B, -1, -1)
    rec_losses = []
    for k in range(cfg.K + (1 if cfg.use_reconstruction_loss else 0)):
        memory_in = model.mem_proj(memory) if model.mem_proj is not None else memory
        seq = torch.cat(ctrl("write_st") + [memory_in] + ctrl("write_end") + [embed(context)]
                        + ctrl("write_st") + [memory_in], 1)
        ones = torch.ones(B, P, dtype=torch.long)
        mask = torch.cat([ones, real.long(), ones[:, : C + M]], 1)
        hidden = backbone(inputs_embeds=seq, attention_mask=mask, position_ids=mask.cumsum(1) - 1).last_hidden_state
        if cfg.use_reconstruction_loss and k > 0:
            head = model.write_head if model.write_head is not None else model.model.get_output_embeddings()
            logits = head(hidden[:, P - 1 : P + S - 1])
            rec_losses.append(F.cross_entropy(logits.transpose(1, 2), context.masked_fill(~real, -100)))
        if k == cfg.K:
            break
        new_memory = hidden[:, -M:]
        if model.mem_residual_ln is not None and k > 0:
            new_memory = memory + model.mem_residual_ln(new_memory)
        memory = new_memory
    memory_read = model.read_mem_proj(memory) if model.read_mem_proj is not None else memory
    seq = torch.cat(ctrl("read_st") + [memory_read] + ctrl("read_end") + [embed(query)], 1)
    logits = model.model(inputs_embeds=seq).logits[:, P - 1 : P - 1 + query.shape[1]]
    return memory, logits, rec_losses


ALL_OPTIONS = [
    dict(),
    dict(K=3),
    dict(n_ctrl_tokens=2, K=2),
    dict(mem_proj_mode="proj"),
    dict(mem_proj_mode="proj_rw", K=2),
    dict(K=3, use_mem_residual=True),
    dict(K=2, use_reconstruction_loss=True, reconstruction_loss_weight=0.5),
    dict(K=2, n_ctrl_tokens=1, mem_proj_mode="proj_rw", use_reconstruction_loss=True, use_write_head=True,
         use_mem_residual=True),
]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_masked_reference_and_every_parameter_gets_a_gradient(options):
    model = make_model(**options)
    context, query, labels = batch()
    out = model(context, query, labels)
    memory, logits, rec_losses = reference_forward(model, context, query)

    assert out.logits.shape == (3, 6, V) and out.memory.shape == (3, 3, 32)
    torch.testing.assert_close(out.memory, memory, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    target_loss = F.cross_entropy(logits.transpose(1, 2), labels)
    torch.testing.assert_close(out.stats["target_loss"], target_loss)
    if options.get("use_reconstruction_loss"):
        assert len(rec_losses) == model.config.K
        rec_loss = torch.stack(rec_losses).mean()
        torch.testing.assert_close(out.stats["rec_loss"], rec_loss)
        torch.testing.assert_close(out.loss, target_loss + model.config.reconstruction_loss_weight * rec_loss)
    else:
        assert "rec_loss" not in out.stats
        torch.testing.assert_close(out.loss, target_loss)

    for value in out.stats.values():
        assert value.dim() == 0 and not value.requires_grad
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # only the input embeddings of tokens absent from the batch may stay at zero
    assert set(no_grad) <= {"model.model.embed_tokens.weight"}, no_grad


def test_reconstruction_loss_by_hand_one_sample_at_a_time():
    """CE of each context token t given [memory_k; context_<t], memory_k from write k = 1..K, token-weighted."""
    model = make_model(K=2, use_reconstruction_loss=True, use_write_head=True)
    context, query, labels = batch(lengths=(9, 5, 2))
    out = model(context, query, labels)

    P = model.config.n_mem_tokens
    losses = []
    for k in (1, 2):
        model.config.K = k  # memory after k writes (padding-independent: see test_padding_does_not_change_a_sample)
        memory_k = model.write(context)[0]
        model.config.K = 2
        total, count = 0.0, 0
        for i in range(3):
            n = int((context[i] != PAD).sum())
            seq = torch.cat([memory_k[i : i + 1], model.model.get_input_embeddings()(context[i : i + 1, :n])], 1)
            hidden = get_backbone(model.model)(inputs_embeds=seq).last_hidden_state
            logits = model.write_head(hidden)[0]  # [P + n, V]
            for t in range(n):
                total = total - torch.log_softmax(logits[P - 1 + t], -1)[context[i, t]]
                count += 1
        losses.append(total / count)
    torch.testing.assert_close(out.stats["rec_loss"], torch.stack(losses).mean())
    # the write head, not the LM head, scores the reconstruction
    with torch.no_grad():
        model.write_head.weight.mul_(2.0)
    assert not torch.allclose(model(context, query, labels).stats["rec_loss"], out.stats["rec_loss"])


def test_padding_does_not_change_a_sample():
    """A sample alone (no padding) and inside a padded batch gets the same memory and READ logits."""
    model = make_model(K=2, n_ctrl_tokens=1, mem_proj_mode="proj_rw", use_reconstruction_loss=True)
    context, query, labels = batch(lengths=(9, 5, 0))
    out = model(context, query, labels)
    for i, n in enumerate((9, 5, 0)):
        q = int((query[i] != PAD).sum())
        alone = model(context[i : i + 1, :n], query[i : i + 1, :q])
        torch.testing.assert_close(alone.memory[0], out.memory[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone.logits[0], out.logits[i, :q], rtol=1e-10, atol=1e-10)


def test_write_out_slots_follow_the_last_real_token():
    """Positions restart at 0 and the write-out block sits right after the real context, for every sample."""
    model = make_model(n_ctrl_tokens=1)
    lengths = torch.tensor([4, 0, 2])
    perm = model._write_out_permutation(lengths, S=4)  # P = 5, T = 4, L = 13
    P, S, T = 5, 4, 4
    for i, n in enumerate(lengths.tolist()):
        expected = list(range(P + n)) + list(range(P + S, P + S + T)) + list(range(P + n, P + S))
        assert perm[i].tolist() == expected


def test_k_writes_differentiate_through_every_write():
    """The initial memory reaches READ only through all K writes: its autograd gradient must match finite
    differences (float64; GPT-NeoX because Llama's RMSNorm computes in float32 even for float64 models)."""
    model = make_model(base=neox_config(), K=3, n_mem_tokens=2, n_ctrl_tokens=1, mem_proj_mode="proj_rw",
                       use_mem_residual=True)
    context, query, labels = batch(lengths=(9, 4, 1))

    def loss_of(mem):
        return torch.func.functional_call(model, {"mem": mem}, (context, query, labels)).loss

    mem0 = model.mem.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(mem0), mem0)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        direction = torch.randn(mem0.shape, generator=g, dtype=mem0.dtype)
        with torch.no_grad():
            finite_difference = (loss_of(mem0 + 1e-6 * direction) - loss_of(mem0 - 1e-6 * direction)) / 2e-6
        torch.testing.assert_close((grad * direction).sum(), finite_difference, rtol=1e-6, atol=1e-9)
    # and K really repeats the write: each extra write changes the memory
    memories = []
    for K in (1, 2, 3):
        model.config.K = K
        memories.append(model.write(context)[0])
    assert not torch.allclose(memories[0], memories[1]) and not torch.allclose(memories[1], memories[2])


def copy_next_llama():
    """A Llama whose layers add nothing and whose head maps token x to x + 1: it predicts the next token of any
    counting sequence, at any position, only if the logits are aligned with the labels."""
    model = make_model(base=llama_config(hidden_size=32, vocab_size=V))
    lm = model.model
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.embed_tokens.weight.copy_(torch.eye(V, 32, dtype=torch.float64))
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[1:, : V - 1] = torch.eye(V - 1, dtype=torch.float64)
    return model


def test_alignment_a_next_token_model_scores_exact_match_one():
    model = copy_next_llama()
    query = torch.tensor([[3, 4, 5, 6, 7, 8], [10, 11, 12, 13, PAD, PAD]])
    labels = query.clone()
    labels[:, :2] = -100
    labels[query == PAD] = -100
    context = torch.tensor([[1, 2, 3], [4, PAD, PAD]])
    out = model(context, query, labels)
    predictions = out.logits.argmax(-1)
    mask = labels != -100
    assert torch.equal(predictions[mask], labels[mask])
    # through the shared trainer's metric path (the Trainer hands it (logits, memory, stats))
    reduced, stats = reduce_logits_to_predictions((out.logits, out.memory, out.stats), labels)
    metrics = make_compute_metrics(None, ignore_tokens=())(
        EvalPrediction(predictions=(reduced.numpy(), {k: v.numpy() for k, v in stats.items()}), label_ids=labels.numpy()))
    assert metrics["exact_match"] == 1.0 and metrics["token_accuracy"] == 1.0 and "mem_norm_mean" in metrics
    # shifted by one (the reference RMT's alignment) every prediction is wrong
    assert not (predictions[:, 1:][mask[:, :-1]] == labels[:, :-1][mask[:, :-1]]).any()


def test_projection_initialisation_and_where_it_applies():
    model = make_model(mem_proj_mode="proj_rw", K=2)
    d = 32
    assert model.config.use_mem_proj
    # write projection: PyTorch's default Linear init (uniform in ±1/sqrt(d)), not the identity
    w = model.mem_proj.weight
    assert w.abs().max() <= d ** -0.5 and w.std() > 0.1 * d ** -0.5
    assert not torch.allclose(w, torch.eye(d, dtype=w.dtype))
    # read projection: identity, zero bias
    assert torch.equal(model.read_mem_proj.weight, torch.eye(d, dtype=torch.float64))
    assert torch.equal(model.read_mem_proj.bias, torch.zeros(d, dtype=torch.float64))

    calls = {"write": 0, "read": 0}
    model.mem_proj.register_forward_hook(lambda *a: calls.__setitem__("write", calls["write"] + 1))
    model.read_mem_proj.register_forward_hook(lambda *a: calls.__setitem__("read", calls["read"] + 1))
    model(*batch()[:2])
    assert calls == {"write": 2, "read": 1}

    proj = make_model(mem_proj_mode="proj")  # proj: write side only, READ consumes the memory unprojected
    assert proj.read_mem_proj is None
    calls = []
    proj.mem_proj.register_forward_hook(lambda *a: calls.append(1))
    context, query, _ = batch()
    out = proj(context, query)
    assert len(calls) == 1
    torch.testing.assert_close(out.logits, proj.read(out.memory, query))

    none = make_model()
    assert none.mem_proj is None and none.read_mem_proj is None and not none.config.use_mem_proj


def test_residual_with_layer_norm():
    model = make_model(K=2, use_mem_residual=True)
    with torch.no_grad():
        model.mem_residual_ln.weight.fill_(0.5)
        model.mem_residual_ln.bias.fill_(0.1)
    context, query, _ = batch()
    model.config.K = 1
    memory_1 = model.write(context)[0]
    model.config.K = 2
    memory_2 = model.write(context)[0]
    # second write from memory_1, without residual: the raw write-out
    plain = make_model(K=1)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "residual" not in k})
    for i in range(3):
        plain.mem.data = memory_1.detach()[i]
        write_out = plain.write(context[i : i + 1])[0][0]
        expected = memory_1[i] + F.layer_norm(write_out, (32,), model.mem_residual_ln.weight, model.mem_residual_ln.bias)
        torch.testing.assert_close(memory_2[i], expected, rtol=1e-10, atol=1e-10)


def test_bad_options_fail_loudly():
    base = llama_config()
    with pytest.raises(ValueError, match="K=0"):
        RMT2SegmConfig(base_config=base, K=0)
    with pytest.raises(ValueError, match="use_write_head without use_reconstruction_loss"):
        RMT2SegmConfig(base_config=base, use_write_head=True)
    with pytest.raises(ValueError, match="use_mem_residual needs K >= 2"):
        RMT2SegmConfig(base_config=base, use_mem_residual=True)
    with pytest.raises(ValueError, match="contradicts"):
        RMT2SegmConfig(base_config=base, use_mem_proj=True, mem_proj_mode="none")
    with pytest.raises(ValueError, match="contradicts"):
        RMT2SegmConfig(base_config=base, use_mem_proj=False, mem_proj_mode="proj")
    with pytest.raises(ValueError, match="mem_proj_mode"):
        RMT2SegmConfig(base_config=base, mem_proj_mode="per_sample")
    with pytest.raises(ValueError, match="no effect"):
        RMT2SegmConfig(base_config=base, reconstruction_loss_weight=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        RMT2Segm(RMT2SegmConfig())
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        make_model(attn_implementation="flash_attn_typo")
    softcapped = llama_config()
    softcapped.final_logit_softcapping = 30.0  # logits come from the LM head alone: a softcap would be skipped
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        make_model(base=softcapped)


def test_every_option_is_declared_once_and_the_config_and_the_command_line_agree():
    """RMTOptions is the one declaration: the config takes each option as a keyword with its default, the command line
    (RMTArgs) is derived from it: same names, order, defaults and help; the same types, except that use_mem_proj
    (Optional[bool]: None follows mem_proj_mode) is a bool flag there, so that a bare --use_mem_proj means true."""
    import dataclasses
    import inspect
    from typing import Optional

    from rmt import OPTION_NAMES, RMTArgs, RMTOptions
    from training_args import parse_cli

    declared = dataclasses.fields(RMTOptions)
    command_line = {f.name: f for f in dataclasses.fields(RMTArgs)}
    assert list(command_line) == [f.name for f in declared] == list(OPTION_NAMES)
    for f in declared:  # (annotations: HfArgumentParser rewrites a parsed dataclass's field.type in place)
        cli_type = bool if RMTOptions.__annotations__[f.name] == Optional[bool] else RMTOptions.__annotations__[f.name]
        derived = command_line[f.name]
        assert (RMTArgs.__annotations__[f.name], derived.default, dict(derived.metadata)) == (
            cli_type, f.default, {"help": f.metadata["help"]}), f.name
    config = RMT2SegmConfig()
    (parsed,) = parse_cli(RMTArgs, args=[])
    completed = RMTOptions()
    completed.validate()
    for f in declared:  # the same values once validated (use_mem_proj: None -> False, as mem_proj_mode is none)
        assert getattr(config, f.name) == getattr(completed, f.name) == getattr(parsed, f.name), f.name
    assert set(OPTION_NAMES) <= set(config.to_dict())  # saved with every config
    assert set(inspect.signature(RMT2SegmConfig.__init__).parameters) == {"self", "pretrained_model", "base_config",
                                                                          "kwargs"}  # nothing restated
    # the reference's defaults
    assert (config.n_mem_tokens, config.K, config.n_ctrl_tokens, config.use_mem_proj, config.mem_proj_mode,
            config.reconstruction_loss_weight, config.attn_implementation) == (8, 1, 0, False, "none", 1.0, "eager")
    assert vars(config.options()) == vars(completed)


def test_one_validation_names_config_options_and_command_line_flags(caplog):
    from rmt import RMTArgs
    from training_args import parse_cli

    cases = [  # (config keywords, its message, command line, its message): one check, named either way
        (dict(K=0), "K=0: RMT needs at least one forward write", ["--K", "0"], "--K=0: RMT needs"),
        (dict(use_mem_residual=True), "use_mem_residual needs K >= 2", ["--use_mem_residual"],
         "--use_mem_residual needs K >= 2"),
        (dict(reconstruction_loss_weight=0.5), "reconstruction_loss_weight=0.5 has no effect without "
         "use_reconstruction_loss", ["--reconstruction_loss_weight", "0.5"],
         "--reconstruction_loss_weight=0.5 has no effect without --use_reconstruction_loss"),
        (dict(use_mem_proj=False, mem_proj_mode="proj"), "use_mem_proj=False contradicts mem_proj_mode='proj'",
         ["--use_mem_proj", "false", "--mem_proj_mode", "proj"], "--use_mem_proj=False contradicts --mem_proj_mode"),
    ]
    for options, config_message, flags, cli_message in cases:
        with pytest.raises(ValueError, match="^RMT2SegmConfig: " + re.escape(config_message)):
            RMT2SegmConfig(**options)
        with pytest.raises(ValueError, match="^" + re.escape(cli_message)):
            parse_cli(RMTArgs, args=flags)
    # the same completion: use_mem_proj follows mem_proj_mode unless given; a bare --use_mem_proj is true
    for flags in (["--mem_proj_mode", "proj"], ["--use_mem_proj", "--mem_proj_mode", "proj"]):
        (parsed,) = parse_cli(RMTArgs, args=flags)
        assert parsed.use_mem_proj is RMT2SegmConfig(mem_proj_mode="proj").use_mem_proj is True
    # a write head without the reconstruction loss: the config refuses it, the run scripts drop it with a warning
    with pytest.raises(ValueError, match="^RMT2SegmConfig: use_write_head without use_reconstruction_loss"):
        RMT2SegmConfig(use_write_head=True)
    with caplog.at_level("WARNING", logger="gradmem"):
        (parsed,) = parse_cli(RMTArgs, args=["--use_write_head"])
    assert parsed.use_write_head is False and "--use_write_head without --use_reconstruction_loss" in caplog.text


def test_saved_configs_load_with_their_own_options(tmp_path):
    """config.json files written before the options had one home (every option saved, use_mem_proj as a bool) load
    with the values they hold."""
    import json

    model = make_model(dtype=torch.float32, K=2, mem_proj_mode="proj_rw", use_mem_residual=True)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_mem_proj"] is True and saved["K"] == 2 and saved["attn_implementation"] == "sdpa"
    loaded = RMT2SegmConfig.from_pretrained(tmp_path)
    for name in ("n_mem_tokens", "K", "n_ctrl_tokens", "use_mem_proj", "mem_proj_mode", "use_reconstruction_loss",
                 "reconstruction_loss_weight", "use_write_head", "use_mem_residual", "use_gradient_checkpointing",
                 "attn_implementation"):
        assert getattr(loaded, name) == saved[name], name


def test_gradient_checkpointing_is_applied():
    plain = make_model(K=2, use_reconstruction_loss=True)
    ckpt = make_model(K=2, use_reconstruction_loss=True, use_gradient_checkpointing=True)
    layers = get_backbone(ckpt.model).layers
    assert ckpt.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    calls = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=func, **k: (calls.append(1), _f(*a, **k))[1]
    context, query, labels = batch()
    plain.train(), ckpt.train()
    out_plain, out_ckpt = plain(context, query, labels), ckpt(context, query, labels)
    # 2 writes + 1 reconstruction-only pass + 1 read, each through both layers
    assert len(calls) == 2 * 4
    out_plain.loss.backward(), out_ckpt.loss.backward()
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("base", ["gpt2", "gpt_neox"])
def test_other_backbones(base):
    configs = {"gpt2": gpt2_config(), "gpt_neox": neox_config()}
    model = make_model(base=configs[base], K=2, mem_proj_mode="proj_rw")
    context, query, labels = batch()
    out = model(context, query, labels)
    memory, logits, _ = reference_forward(model, context, query)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    assert model.mem.grad.abs().sum() > 0


def test_save_pretrained_round_trip(tmp_path):
    model = make_model(dtype=torch.float32, K=2, n_ctrl_tokens=1, mem_proj_mode="proj_rw",
                       use_reconstruction_loss=True, use_write_head=True, use_mem_residual=True)
    assert isinstance(model.config.base_config, dict)
    model.save_pretrained(tmp_path / "rmt")
    config = AutoConfig.from_pretrained(tmp_path / "rmt")
    assert isinstance(config, RMT2SegmConfig) and config.K == 2 and config.mem_proj_mode == "proj_rw"
    loaded = AutoModel.from_pretrained(tmp_path / "rmt").eval()
    assert isinstance(loaded, RMT2Segm)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    context, query, labels = batch()
    torch.testing.assert_close(loaded(context, query, labels).loss, model(context, query, labels).loss)


def test_pretrained_backbone_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(llama_config())
    lm.save_pretrained(tmp_path / "lm")
    model = RMT2Segm(RMT2SegmConfig(pretrained_model=str(tmp_path / "lm"), n_mem_tokens=2))
    for (name, a), b in zip(lm.state_dict().items(), model.model.state_dict().values()):
        assert torch.equal(a, b), name  # the wrapper's init did not overwrite the pretrained weights
    model.save_pretrained(tmp_path / "rmt")
    (tmp_path / "lm").rename(tmp_path / "moved")  # the saved config holds the backbone's: loads without it
    loaded = AutoModel.from_pretrained(tmp_path / "rmt")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
