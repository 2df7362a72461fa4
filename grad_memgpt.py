"""GradMem: a causal LM that writes a context into M memory vectors by K steps of test-time gradient descent.

    WRITE  memory_0 = init (learned);  for k < K:  memory_{k+1} = memory_k - lr * grad_k,
           grad_k = d/d memory_k of the per-sample reconstruction loss of the context given
           [write_start; memory_k; write_end; context]  (weights frozen, only the memory moves)
    READ   logits of the query given [read_start; memory_K; read_end; query]
    TRAIN  the READ loss is backpropagated through the K WRITE updates (grad_mode="second": exact
           second order; "first": first-order MAML; "none": memory treated as a constant), so the
           weights, the memory init and the write-only parameters are meta-learned.

Sequence layouts (C control tokens on each side of the memory, mem_offset = M + 2C):
    WRITE  [write_start (C)] [memory (M)] [write_end (C)] [context (S)]   position mem_offset-1+t predicts context t
    READ   [read_start (C)]  [memory (M)] [read_end (C)]  [query (Q)]     position mem_offset-1+j predicts query j
No attention mask and no position ids are passed: inputs are right-padded, so under causal attention real tokens
never see padding, and positions restart at 0 in both sequences. (With `model.use_static_causal_mask = True`, set by
fast_step for CUDA graphs, the backbone gets the plain causal mask as a ready 4D tensor: same function, no host sync.)

Inner loss (per sample i): mean cross-entropy over the sample's real (non-pad) context tokens; the batch loss is the
SUM over samples, so d loss / d memory_i = d loss_i / d memory_i: the inner lr is per sample and independent of the
batch size and of padding. A row whose context is all padding has zero loss and zero gradient: it is not written.

The memory returned by `write` is exactly what READ consumes (after `mem_proj`, or after the per-sample fast
projection), a plain [B, M, d] tensor: it can be saved with torch.save and read later by a freshly loaded model.

Stats (dict of detached 0-d float32 tensors, computed without host synchronisation):
    inner_loss                      mean per-sample inner loss after the final update (at memory_K), written rows;
                                    measured with one extra forward without graph (no backward); in training only
                                    with train_final_inner_loss (the default)
    inner_loss_step_{k}, k=0..K     mean per-sample inner loss at memory_k (k=K is inner_loss), written rows
    inner_grad_norm_mean/max/min    per-sample L2 norm of the raw (unclipped) inner gradient w.r.t. the memory
                                    (the un-projected memory variable), over written rows and the K steps
    mem_norm_mean/max/min           per-sample norm of the final memory as READ consumes it, all rows
    delta_mem_norm_mean/max/min     per-sample norm of (final memory - initial memory), both as READ consumes
                                    them, written rows
    written_frac                    fraction of rows with at least one real context token
  forward() adds:
    target_loss                     token-weighted mean READ cross-entropy over labels != -100
    inner_loss_outer                (add_inner_loss_to_outer only) the inner-loss term added to the outer loss,
                                    before the weight: mean per-sample loss at memory_{K-1}, with graph
With K=0 (or an empty context tensor) there is no WRITE and only mem_norm_*, delta_mem_norm_* and written_frac are
reported.

Contract (shared with RMT, see modeling_utils.MemoryModelOutput):
    forward(context_input_ids [B, S], query_input_ids [B, Q], labels [B, Q] or None)
        -> MemoryModelOutput(loss, logits [B, Q, V] (logits[:, j] predicts query token j), memory [B, M, d], stats)
    Inputs are right-padded with the backbone's pad id (config.pad_token_id, else eos); labels are aligned with the
    query ids (not shifted), -100 = ignore.
    loss = target_loss + inner_loss_weight * inner_loss_outer (the second term only with add_inner_loss_to_outer;
    inner_loss_outer is the loss at memory_{K-1}, the last inner loss that WRITE differentiates, so its gradient
    also trains the write-only parameters in "none"/"first" modes, as in the reference).

Gradient modes, when the caller has gradients enabled (torch.is_grad_enabled()):
    second  exact meta-gradient through the last `last_K_second_order` (default K) steps (create_graph=True);
            earlier steps use their gradient as a constant. Inner Adam is differentiable (moments on the graph).
    first   first-order MAML: inner gradients (and Adam moments) are constants, memory_K = init - sum of steps.
    none    the written memory is a constant: the memory init, write head, write control tokens and per-sample
            projection get no gradient from the READ loss.
Under torch.no_grad() (e.g. the Trainer's evaluation) WRITE still runs (inner gradients under enable_grad) but
builds no graph through the updates: about one forward + backward per inner step. model.eval() alone does not
change the math (only the backbone's dropout), so gradients taken in eval mode are still exact.
Dropout of the backbone (e.g. GPT-2's 0.1) is active in WRITE while training; the double backward reuses the
same masks, so the meta-gradient is exact for the sampled masks.

Hooks of the shared trainer, which knows no model: `parameters_without_gradient()` (trainable parameters the loss
cannot reach in this configuration; frozen so that DDP needs no unused-parameter search) and
`captured_step_problem()` (why fast_step cannot record the training step, or None); `adapt_checkpoint()` renames a
reference checkpoint's tensors for --init_checkpoint (training_checkpoints).

Options: each is declared once, as a field of GradMemOptions (name, type, default, help), before the config that
holds them. The run scripts' command line (GradMemArgs, derived from those fields), the named presets of
`--preset` (PRESETS, e.g. paper_kv: the paper's KV model) and the builder (build_grad_memgpt) are at the end of
this file.
"""
import contextlib
import functools
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init

import attn_double_bwd
import lean_ops
import write_recompute
from modeling_utils import (
    LoadsFully,
    MemoryModelOutput,
    StaticCausalMask,
    base_config_to_dict,
    build_causal_lm,
    check_plain_logits,
    cli_names,
    command_line_args,
    hidden_size,
    option,
    pad_token_id,
    safetensors_files,
    unwrap_peft,
)
from training_args import BackboneArgs
from training_backbone import backbone_source, check_vocab_fits

GRAD_MODES = ("none", "first", "second")
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
MEM_PROJ_MODES = ("none", "proj", "per_sample")

# LoRA targets of the write-phase adapters when none are given (every linear layer of the decoder blocks).
DEFAULT_WRITE_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

# Tensor names in checkpoints of the reference implementation -> ours. Its control tokens are `write_st`/`read_st`, and
# its write LoRA wraps the backbone with peft's get_peft_model, which puts every backbone tensor under
# `model.base_model.model.` (the adapters themselves are named as here: `<module>.lora_A.default.weight`).
REFERENCE_NAMES = ((re.compile(r"^write_st$"), "write_start"), (re.compile(r"^read_st$"), "read_start"),
                   (re.compile(r"^model\.base_model\.model\."), "model."))

# Inner Adam hyper-parameters (fixed, as in the reference; the inner lr is `lr`).
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


@dataclass
class GradMemOptions:
    """Every GradMem option, declared once: its name (the config's, as in the reference), type, default (the
    reference config's) and help. GradMemGPTConfig takes them as keywords with these defaults and keeps them as
    attributes; the run scripts' command line (GradMemArgs, at the end of this file) is derived from these fields,
    under the `cli` name where one is given (--inner_lr for lr). validate() checks them for both."""

    n_mem_tokens: int = option(8, "M memory vectors")
    K: int = option(2, "inner (WRITE) gradient steps")
    lr: float = option(0.01, "learning rate of the inner (WRITE) steps on the memory", cli="inner_lr")
    use_adam: bool = option(False, "inner Adam instead of SGD")
    grad_mode: typing.Literal[GRAD_MODES] = option(
        "second", "outer gradient through the WRITE: none (the written memory is a constant), first (first order), "
                  "second (exact, through the inner gradients)")
    last_K_second_order: Optional[int] = option(None, "differentiate through the last L inner steps only "
                                                      "(default: all K)")
    n_ctrl_tokens: int = option(0, "learned start/end marker vectors around the memory")
    inner_clip_value: Optional[float] = option(None, "clip inner gradients elementwise")
    inner_clip_norm: Optional[float] = option(None, "clip each sample's inner gradient norm")
    use_mem_proj: bool = option(False, "must be set exactly when mem_proj_mode is not none")
    mem_proj_mode: typing.Literal[MEM_PROJ_MODES] = option(
        "none", "linear projection of the memory before READ: none, proj (shared) or per_sample")
    use_write_head: bool = option(False, "own output head for the inner (WRITE) loss")
    use_write_lora: bool = option(False, "LoRA adapters active during WRITE only")
    write_lora_r: int = option(8, "write LoRA rank")
    write_lora_alpha: int = option(16, "write LoRA alpha")
    write_lora_dropout: float = option(0.0, "write LoRA dropout")
    write_lora_target_modules: Optional[str] = option(
        None, "comma list of module names for the write LoRA (the config also takes a list, and keeps one); "
              "default: the backbone's attention and MLP projections")
    freeze_backbone: bool = option(False, "train only the memory parameters (and adapters)")
    use_gradient_checkpointing: bool = option(False, "recompute backbone activations")
    attn_implementation: str = option(
        "auto", "auto: the fused Triton double backward on CUDA (exact_eager on the CPU) for second-order training, "
                "sdpa otherwise; or any name attn_double_bwd.resolve_attn_implementation knows")
    lean_ops: Optional[bool] = option(
        None, "SwiGLU (fused with the down projection) and RMSNorm with closed-form first and second derivatives "
              "that save only their inputs for the backward (lean_ops.py): same function and gradients, much less "
              "activation memory in second-order training; llama-family backbones. Default: on for second-order "
              "training on CUDA when the backbone has them (Triton kernels there), off otherwise")
    recompute_write: bool = option(
        False, "second-order WRITE steps keep no graph: each is run again inside the outer backward "
               "(write_recompute.py): the same gradients with one step's graph alive instead of K, for one more "
               "inner forward and backward per step")
    add_inner_loss_to_outer: bool = option(False, "add the inner loss to the training loss")
    inner_loss_weight: Optional[float] = option(None, "weight of the added inner loss (default: 1.0 when it is added)")
    eval_K: Optional[int] = option(None, "inner steps when evaluating and generating (default: K); training always "
                                         "writes with K")
    eval_lr: Optional[float] = option(None, "inner lr when evaluating and generating (default: the inner lr)",
                                      cli="eval_inner_lr")
    train_final_inner_loss: bool = option(True, "while training, also measure the inner loss after the last WRITE "
                                                "step (a statistic: one more forward per step); evaluation always does")

    def validate(self, flag: Optional[Callable[[str], str]] = None, training: bool = False) -> None:
        """Raise a ValueError for every invalid value or incompatible pair, naming each option by `flag(name)` (the
        config names it by its name, the command line by its --flag); then complete inner_loss_weight (None: 1.0
        when the inner loss is added). `training` (the run scripts) also refuses settings that would train nothing;
        a model with them still loads and evaluates (checkpoints of the reference have such configs)."""
        flag = flag or (lambda name: name)

        def fail(message):
            raise ValueError(message)

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (float, Optional[float]) and value is not None and not math.isfinite(value):
                fail(f"{flag(f.name)} must be a finite number, got {value}")
        if self.grad_mode not in GRAD_MODES:
            fail(f"unknown {flag('grad_mode')} {self.grad_mode!r}; choose one of {GRAD_MODES}")
        if not isinstance(self.K, int) or self.K < 0:
            fail(f"{flag('K')} (number of inner steps) must be an integer >= 0, got {self.K!r}")
        if not isinstance(self.n_mem_tokens, int) or self.n_mem_tokens < 1:
            fail(f"{flag('n_mem_tokens')} must be an integer >= 1, got {self.n_mem_tokens!r}")
        if not isinstance(self.n_ctrl_tokens, int) or self.n_ctrl_tokens < 0:
            fail(f"{flag('n_ctrl_tokens')} must be an integer >= 0, got {self.n_ctrl_tokens!r}")
        if self.lr < 0:
            fail(f"{flag('lr')} (the inner lr) must be >= 0, got {self.lr}")
        if self.eval_K is not None and (not isinstance(self.eval_K, int) or self.eval_K < 0):
            fail(f"{flag('eval_K')} (inner steps outside training) must be an integer >= 0 or None, got "
                 f"{self.eval_K!r}")
        if self.eval_lr is not None and self.eval_lr < 0:
            fail(f"{flag('eval_lr')} (inner lr outside training) must be >= 0 or None, got {self.eval_lr}")
        if self.last_K_second_order is not None:
            if self.grad_mode != "second" and self.last_K_second_order != 0:
                fail(f"{flag('last_K_second_order')} {self.last_K_second_order} needs {flag('grad_mode')} second "
                     f"(got {self.grad_mode!r}); leave it unset")
            if not isinstance(self.last_K_second_order, int) or not 0 <= self.last_K_second_order <= self.K:
                fail(f"{flag('last_K_second_order')} must be an integer in [0, K={self.K}], got "
                     f"{self.last_K_second_order!r}")
        if self.recompute_write and (self.grad_mode != "second" or self.last_K_second_order == 0):
            fail(f"{flag('recompute_write')} recomputes second-order WRITE steps, and this model has none "
                 f"({flag('grad_mode')} {self.grad_mode!r}, {flag('last_K_second_order')} "
                 f"{self.last_K_second_order}); use grad_mode second or leave recompute_write off")
        for name in ("inner_clip_value", "inner_clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                fail(f"{flag(name)} must be > 0 or None, got {value}")
        if self.mem_proj_mode not in MEM_PROJ_MODES:
            fail(f"unknown {flag('mem_proj_mode')} {self.mem_proj_mode!r}; choose one of {MEM_PROJ_MODES}")
        if self.use_mem_proj != (self.mem_proj_mode != "none"):
            fail(f"{flag('use_mem_proj')} {self.use_mem_proj} contradicts {flag('mem_proj_mode')} "
                 f"{self.mem_proj_mode!r}: {flag('use_mem_proj')} must be set exactly when {flag('mem_proj_mode')} "
                 "is proj or per_sample")
        if self.use_write_lora:
            if self.write_lora_r < 1:
                fail(f"{flag('write_lora_r')} must be >= 1, got {self.write_lora_r}")
            if not 0.0 <= self.write_lora_dropout < 1.0:
                fail(f"{flag('write_lora_dropout')} must be in [0, 1), got {self.write_lora_dropout}")
            if training and self.grad_mode != "second" and not self.add_inner_loss_to_outer:
                fail(f"{flag('use_write_lora')} with {flag('grad_mode')} {self.grad_mode} and without "
                     f"{flag('add_inner_loss_to_outer')}: the write adapters would never receive a gradient; use "
                     "grad_mode second or add the inner loss")
            if self.use_gradient_checkpointing:
                fail(f"{flag('use_write_lora')} cannot be combined with {flag('use_gradient_checkpointing')}: "
                     "recomputation in the backward would run with the adapters in the wrong (READ/WRITE) state")
        elif self.write_lora_target_modules not in (None, "auto"):
            fail(f"{flag('write_lora_target_modules')} is set but {flag('use_write_lora')} is not")
        if self.add_inner_loss_to_outer:
            if self.K < 1:
                fail(f"{flag('add_inner_loss_to_outer')} needs K >= 1 (there is no inner loss without inner steps)")
            if self.inner_loss_weight is None:
                self.inner_loss_weight = 1.0
            if not self.inner_loss_weight > 0:
                fail(f"{flag('inner_loss_weight')} must be > 0, got {self.inner_loss_weight}")
        elif self.inner_loss_weight is not None:
            fail(f"{flag('inner_loss_weight')} {self.inner_loss_weight} is only used with "
                 f"{flag('add_inner_loss_to_outer')} (set that too, or set {flag('inner_loss_weight')} to None)")


OPTION_NAMES = tuple(f.name for f in fields(GradMemOptions))


class GradMemGPTConfig(PretrainedConfig):
    """Configuration of a GradMem model: its backbone and its GradMemOptions (see the module docstring for the
    algorithm).

    GradMemGPTConfig(pretrained_model=..., base_config=..., **options): the options are GradMemOptions' fields, as
    keywords with its defaults, and become attributes (config.K, config.lr, ...). Backbone: exactly one of
    `pretrained_model` (hub id or local folder) and `base_config` (a transformers config or its dict; stored as a
    plain dict so that save/load round-trips). The model checks that one is given.
    """

    model_type = "grad_memgpt"

    def __init__(
        self,
        pretrained_model: Optional[str] = None,
        base_config: Union[None, dict, PretrainedConfig] = None,
        **kwargs,
    ):
        self.pretrained_model = pretrained_model
        self.base_config = base_config_to_dict(base_config)
        options = GradMemOptions(**{name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs})
        for name, value in vars(options).items():
            setattr(self, name, value)
        targets = self.write_lora_target_modules  # a comma list or a list -> a list; "auto" -> None (the defaults)
        if isinstance(targets, str):
            targets = None if targets == "auto" else [name.strip() for name in targets.split(",") if name.strip()]
        self.write_lora_target_modules = None if targets is None else list(targets)
        # architecture of a pretrained backbone, recorded when it is loaded, so that a saved model reloads without it
        self.pretrained_backbone_config = kwargs.pop("pretrained_backbone_config", None)
        super().__init__(**kwargs)
        self.validate_options()

    def options(self) -> GradMemOptions:
        """This config's GradMem options (a copy)."""
        return GradMemOptions(**{name: getattr(self, name) for name in OPTION_NAMES})

    def validate_options(self):
        """Raise a ValueError naming the option (and the fix) for every invalid or incompatible setting
        (GradMemOptions.validate, which also completes inner_loss_weight), or for two backbones."""
        if self.pretrained_model is not None and self.base_config is not None:
            raise ValueError("GradMemGPTConfig: give either pretrained_model or base_config, not both")
        options = self.options()
        try:
            options.validate()
        except ValueError as error:
            raise ValueError(f"GradMemGPTConfig: {error}") from None
        self.inner_loss_weight = options.inner_loss_weight

    @property
    def n_second_order_steps(self) -> int:
        """How many of the last inner steps are differentiated through (create_graph) when training."""
        if self.grad_mode != "second":
            return 0
        return self.K if self.last_K_second_order is None else self.last_K_second_order


def check_right_padding(tokenizer) -> None:
    """GradMem assumes right-padded inputs (no attention mask is passed); refuse a left-padding tokenizer."""
    side = getattr(tokenizer, "padding_side", "right")
    if side != "right":
        raise ValueError(
            f"{type(tokenizer).__name__} pads on the {side!r}; GradMem needs right padding: "
            "set tokenizer.padding_side = 'right'"
        )


class GradMemGPT(LoadsFully, StaticCausalMask, PreTrainedModel):
    config_class = GradMemGPTConfig
    base_model_prefix = "grad_memgpt"
    main_input_name = "context_input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: GradMemGPTConfig):
        super().__init__(config)
        config.validate_options()
        if (config.pretrained_model is None) == (config.base_config is None):
            raise ValueError("GradMemGPT needs exactly one of config.pretrained_model and config.base_config")
        self.n_mem_tokens = config.n_mem_tokens
        self.n_ctrl_tokens = config.n_ctrl_tokens
        self.mem_offset = config.n_mem_tokens + 2 * config.n_ctrl_tokens

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        second_order = config.grad_mode == "second" and config.K > 0
        attn = attn_double_bwd.resolve_attn_implementation(
            config.attn_implementation,
            device_type=device_type,
            second_order=second_order,
            head_dim=attn_double_bwd.head_dim_of(_backbone_config(config)),
        )
        self.model = self._build_backbone(config, attn)
        lm_config = self.model.config
        check_plain_logits(lm_config)
        lm_config.use_cache = False
        self.pad_token_id = pad_token_id(lm_config)

        d = hidden_size(lm_config)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.mem = nn.Parameter(torch.empty(config.n_mem_tokens, d))  # memory init [M, d]
        self.mem_proj = nn.Linear(d, d, bias=True) if config.mem_proj_mode != "none" else None
        if config.n_ctrl_tokens > 0:
            C = config.n_ctrl_tokens
            self.write_start = nn.Parameter(torch.empty(C, d))
            self.write_end = nn.Parameter(torch.empty(C, d))
            self.read_start = nn.Parameter(torch.empty(C, d))
            self.read_end = nn.Parameter(torch.empty(C, d))
        else:
            self.write_start = self.write_end = self.read_start = self.read_end = None
        if config.use_write_head:
            lm_head = self.model.get_output_embeddings()
            self.write_head = nn.Linear(d, vocab_size, bias=getattr(lm_head, "bias", None) is not None)
        else:
            self.write_head = None

        if config.use_write_lora:
            self._add_write_lora(config)
        problem = lean_ops.lean_ops_problem(self.model)
        if config.lean_ops and problem is not None:
            raise ValueError(f"lean_ops: {problem}; build the model without lean_ops")
        self.uses_lean_ops = (config.lean_ops if config.lean_ops is not None
                              else device_type == "cuda" and second_order and problem is None)
        if self.uses_lean_ops:
            lean_ops.use_lean_ops(self.model)
        for name, param in self.model.named_parameters():
            param.requires_grad_(not config.freeze_backbone or "lora_" in name)
        self.post_init()
        if config.use_gradient_checkpointing:
            self.activation_checkpointing_enable()

    # ----------------------------------------------------------------------------------------------------------------
    # construction helpers

    @staticmethod
    def _build_backbone(config: GradMemGPTConfig, attn_implementation: str) -> PreTrainedModel:
        if config.pretrained_model is not None and torch.empty(0).device.type == "meta":
            # Being loaded by from_pretrained: every weight comes from our checkpoint; build the backbone from the
            # architecture recorded at construction (checkpoints of older code: re-read from pretrained_model, and
            # recorded now, so that the model saves self-contained).
            config.pretrained_backbone_config = _backbone_config(config)
            return build_causal_lm(None, config.pretrained_backbone_config, attn_implementation=attn_implementation)
        model = build_causal_lm(config.pretrained_model, config.base_config, attn_implementation=attn_implementation)
        if config.pretrained_model is not None:
            config.pretrained_backbone_config = model.config.to_dict()  # pretrained_model stays as provenance
        return model

    def _add_write_lora(self, config: GradMemGPTConfig):
        from peft import LoraConfig, inject_adapter_in_model

        model_type = self.model.config.model_type
        targets = config.write_lora_target_modules
        if targets is None:
            if model_type not in DEFAULT_WRITE_LORA_TARGETS:
                raise ValueError(
                    f"no default write-LoRA target modules for model_type {model_type!r}; "
                    f"set write_lora_target_modules (known defaults: {sorted(DEFAULT_WRITE_LORA_TARGETS)})"
                )
            targets = DEFAULT_WRITE_LORA_TARGETS[model_type]
        lora_config = LoraConfig(
            r=config.write_lora_r,
            lora_alpha=config.write_lora_alpha,
            lora_dropout=config.write_lora_dropout,
            target_modules=list(targets),
            fan_in_fan_out=model_type == "gpt2",  # GPT-2 uses Conv1D (weights stored transposed)
        )
        inject_adapter_in_model(lora_config, self.model)
        # peft initialised the adapters itself (B = 0, so the adapted model starts equal to the backbone); keep
        # transformers' weight init (run by post_init on uninitialised modules) away from them.
        for name, module in self.model.named_modules():
            if "lora_" in name:
                module._is_hf_initialized = True

    # ----------------------------------------------------------------------------------------------------------------
    # checkpoints of the reference implementation

    @classmethod
    def checkpoint_state_dict(cls, folder: str) -> Optional[dict]:
        """from_pretrained's hook: the tensors of a reference checkpoint folder under our names (None for ours)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        files = safetensors_files(Path(folder))
        if not files:
            return None
        names = []
        for weights in files:
            with safe_open(str(weights), framework="pt") as f:
                names += list(f.keys())
        if from_reference_names(dict.fromkeys(names)).keys() == set(names):
            return None
        return from_reference_names({k: v for weights in files for k, v in load_file(str(weights)).items()})

    def adapt_checkpoint(self, state_dict: dict) -> tuple:
        """--init_checkpoint's hook: (the tensors under our names, '' or a sentence naming the options the checkpoint
        was written with where they differ from this model's)."""
        state_dict = from_reference_names(state_dict)
        theirs, ours = options_implied_by(state_dict), options_implied_by(self.state_dict())
        differ = [_as_cli_option(name, value) for name, value in theirs.items() if ours.get(name) != value]
        return state_dict, (f" The checkpoint was written with {' '.join(differ)}." if differ else "")

    @torch.no_grad()
    def _init_weights(self, module):
        std = 0.02
        if module is self:
            init.normal_(self.mem, mean=0.0, std=std)
            for param in (self.write_start, self.write_end, self.read_start, self.read_end):
                if param is not None:
                    init.normal_(param, mean=0.0, std=std)
        elif module is self.mem_proj:
            init.eye_(module.weight)  # identity: memory inputs start equal to the memory
            init.zeros_(module.bias)
        elif module is self.write_head:
            lm_head = self.model.get_output_embeddings()  # an independent, untied copy of the LM head
            init.copy_(module.weight, lm_head.weight)
            if module.bias is not None:
                init.copy_(module.bias, lm_head.bias)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the backbone's layers (WRITE and READ), always non-reentrant: the reentrant variant cannot be
        differentiated twice."""
        if self.config.use_write_lora:
            raise ValueError("gradient checkpointing cannot be combined with use_write_lora (see GradMemGPTConfig)")
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        checkpoint_kwargs["use_reentrant"] = False
        backbone = unwrap_peft(self.model)
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.2x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    # ----------------------------------------------------------------------------------------------------------------
    # hooks of the shared trainer (training_loop, fast_step)

    def parameters_without_gradient(self) -> list:
        """Names of the trainable parameters that the training loss cannot reach in this configuration, decided from
        the config alone (no forward pass); the trainer freezes them so that DDP needs no find_unused_parameters.

        write head, write control tokens, write LoRA: used only inside WRITE, so reached only through the inner
            gradients: when K > 0 and either an inner step is differentiated (grad_mode second with
            last_K_second_order != 0) or the inner loss is added to the outer loss;
        memory init, and a per-sample projection (an inner variable): reached unless grad_mode is none (then the
            written memory is a constant);
        everything else (backbone, shared mem_proj, read control tokens): always reached through READ.
        """
        config = self.config
        through_write = config.K > 0 and (config.n_second_order_steps > 0 or config.add_inner_loss_to_outer)
        through_memory = config.grad_mode != "none"
        unreached = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            top = name.split(".")[0]
            if top in ("write_head", "write_start", "write_end") or "lora_" in name:
                reached = through_write
            elif top == "mem" or (top == "mem_proj" and config.mem_proj_mode == "per_sample"):
                reached = through_memory
            else:
                reached = True
            if not reached:
                unreached.append(name)
        return unreached

    def captured_step_problem(self) -> Optional[str]:
        """Why fast_step.CapturedTrainStep cannot record this model's training step (None: it can)."""
        if self.config.use_gradient_checkpointing:
            return "gradient checkpointing is on (recomputation is not captured)"
        if self.config.use_write_lora:
            return "write LoRA toggles adapters from Python inside the step"
        dropout = self.dropout_in_training() if self.config.recompute_write else None
        if dropout is not None:
            return (f"recompute_write with dropout ({dropout}) replays the random state inside the backward (not "
                    "capturable); set the dropout to 0 to record the step")
        return None

    def dropout_in_training(self) -> Optional[str]:
        """The first dropout a training forward applies ('module: rate'), or None: dropout modules with p > 0 and float
        attributes named *dropout* above 0 (attention dropout is a float on transformers' attention modules)."""
        for name, module in self.named_modules():
            if isinstance(module, DROPOUT_MODULES) and module.p > 0:
                return f"{name or 'model'}: p={module.p}"
            for attr, value in vars(module).items():
                if "dropout" in attr and isinstance(value, float) and value > 0:
                    return f"{name or 'model'}.{attr}={value}"
        return None

    # ----------------------------------------------------------------------------------------------------------------
    # building blocks

    def _layout(self, start, memory, end, token_embeds):
        """[start (C)] [memory (M)] [end (C)] [tokens (T)] -> [B, M + 2C + T, d]."""
        B = memory.shape[0]
        if start is None:
            return torch.cat([memory, token_embeds], dim=1)
        return torch.cat([start.expand(B, -1, -1), memory, end.expand(B, -1, -1), token_embeds], dim=1)

    def _initial_fast_weights(self, batch_size: int) -> list:
        """The inner-loop variables at step 0: [memory [B, M, d]] (+ [W [B, d, d], b [B, d]] for per_sample)."""
        B = batch_size
        fast = [self.mem.expand(B, -1, -1)]
        if self.config.mem_proj_mode == "per_sample":
            fast += [self.mem_proj.weight.expand(B, -1, -1), self.mem_proj.bias.expand(B, -1)]
        return fast

    def _memory_inputs(self, fast: list) -> torch.Tensor:
        """What the backbone sees at the memory positions: memory, mem_proj(memory) or memory @ W_i^T + b_i."""
        memory = fast[0]  # [B, M, d]
        mode = self.config.mem_proj_mode
        if mode == "proj":
            return self.mem_proj(memory)
        if mode == "per_sample":
            W, b = fast[1], fast[2]  # [B, d, d], [B, d]
            return torch.baddbmm(b.unsqueeze(1), memory, W.transpose(1, 2))
        return memory

    @contextlib.contextmanager
    def _write_lora_disabled(self):
        """READ runs the plain backbone: switch the write adapters off (restoring requires_grad afterwards)."""
        if not self.config.use_write_lora:
            yield
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        flags = [(p, p.requires_grad) for m in layers for n, p in m.named_parameters() if "lora_" in n]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for param, flag in flags:
                param.requires_grad_(flag)

    # ----------------------------------------------------------------------------------------------------------------
    # WRITE

    def _inner_loss(self, fast, context_embeds, context_input_ids, token_mask, n_tokens) -> torch.Tensor:
        """Per-sample reconstruction loss of the context given the memory: [B] (mean CE over real tokens)."""
        ce = self.reconstruction_token_losses(self._memory_inputs(fast), context_embeds, context_input_ids)
        return (ce * token_mask).sum(dim=1) / n_tokens.clamp_min(1)  # [B]; 0 for all-pad rows

    def reconstruction_token_losses(self, memory, context_embeds, context_input_ids) -> torch.Tensor:
        """The WRITE's loss per context token given the memory [B, M, d] (as READ consumes it): CE [B, S], padding
        included. The last memory / write_end position predicts the first context token; the logit of the last
        context position is never computed."""
        B, S = context_input_ids.shape
        x = self._layout(self.write_start, memory, self.write_end, context_embeds)
        h = self._decoder_hidden(x)[:, self.mem_offset - 1 : self.mem_offset - 1 + S]  # [B, S, d]
        head = self.write_head if self.write_head is not None else self.model.get_output_embeddings()
        logits = head(h)  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1), context_input_ids.flatten(), reduction="none").view(B, S)

    def _clip_inner_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Elementwise clamp to +-inner_clip_value, then per-sample L2 clip to inner_clip_norm (each optional)."""
        if self.config.inner_clip_value is not None:
            grad = grad.clamp(-self.config.inner_clip_value, self.config.inner_clip_value)
        if self.config.inner_clip_norm is not None:
            c = self.config.inner_clip_norm
            norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)  # [B]
            scale = torch.where(norm > c, c / (norm + 1e-6), torch.ones_like(norm))
            grad = grad * scale.view(-1, *([1] * (grad.dim() - 1)))
        return grad

    def write_steps(self) -> tuple:
        """(K, inner lr) of a WRITE: the trained ones, or eval_K / eval_lr outside training where they are set
        (a model trained with few steps may write better with more at test time)."""
        config = self.config
        if self.training:
            return config.K, config.lr
        return (config.K if config.eval_K is None else config.eval_K,
                config.lr if config.eval_lr is None else config.eval_lr)

    def _inner_step(self, fast: list, grads: Sequence[torch.Tensor], adam_state: list, step: int, lr: float) -> list:
        """One functional SGD or Adam step on the inner variables. Differentiable: whatever graph `grads` carries
        (second order) flows through the update, Adam moments included; constant grads give first-order steps."""
        grads = [self._clip_inner_grad(g) for g in grads]
        if not self.config.use_adam:
            return [p - lr * g for p, g in zip(fast, grads)]
        if not adam_state:
            adam_state.extend([torch.zeros_like(g), torch.zeros_like(g)] for g in grads)
        t = step + 1
        updated = []
        for p, g, state in zip(fast, grads, adam_state):
            m = ADAM_BETA1 * state[0] + (1 - ADAM_BETA1) * g
            v = ADAM_BETA2 * state[1] + (1 - ADAM_BETA2) * g * g
            state[0], state[1] = m, v
            m_hat = m / (1 - ADAM_BETA1**t)
            v_hat = v / (1 - ADAM_BETA2**t)
            updated.append(p - lr * m_hat / (_safe_sqrt(v_hat) + ADAM_EPS))
        return updated

    def _write_step(self, k, lr, context_input_ids, token_mask, n_tokens, fast, state, context_embeds, create_graph,
                    retain_graph=None):
        """One WRITE step as a function of its inputs (write_recompute's contract): the inner loss at `fast`, its
        gradient (differentiable when create_graph), the update. `state` holds the Adam moments flat (m, v per
        variable; empty before the first step). Returns (new fast, new state, per-sample losses [B], inner grads)."""
        losses = self._inner_loss(fast, context_embeds, context_input_ids, token_mask, n_tokens)  # [B]
        grads = torch.autograd.grad(losses.sum(), fast, create_graph=create_graph, retain_graph=retain_graph)
        adam_state = [list(state[i:i + 2]) for i in range(0, len(state), 2)]
        fast = self._inner_step(fast, grads, adam_state, k, lr)
        return fast, [t for pair in adam_state for t in pair], losses, grads

    def write(self, context_input_ids: torch.Tensor):
        """Write a right-padded context batch [B, S] into memory. Returns (memory [B, M, d] as READ consumes it,
        stats).

        The graph through the inner steps is built only when the caller has gradients enabled: under
        torch.no_grad() the inner gradients are computed (inside enable_grad) without create_graph and the
        returned memory is a constant.
        """
        memory, stats, _ = self._write(context_input_ids)
        return memory, stats

    def _write(self, context_input_ids: torch.Tensor):
        """write() plus the inner-loss term for the outer loss (mean per-sample loss at memory_{K-1}, with its graph
        when gradients are enabled; None unless add_inner_loss_to_outer)."""
        config = self.config
        K, lr = self.write_steps()
        B, S = context_input_ids.shape
        build_graph = torch.is_grad_enabled()
        connect = build_graph and config.grad_mode != "none"  # does memory_K depend on the init (and on W, b)?
        n_second_order = min(config.n_second_order_steps, K) if build_graph else 0
        keep_inner_loss = build_graph and config.add_inner_loss_to_outer

        fast = self._initial_fast_weights(B)
        if not connect:
            fast = [p.detach() for p in fast]
        with torch.no_grad():
            memory_init = self._memory_inputs(fast)  # [B, M, d], for stats

        stats = {}
        token_mask = context_input_ids != self.pad_token_id  # [B, S]
        n_tokens = token_mask.sum(dim=1)  # [B]
        written = (n_tokens > 0).float()  # [B]
        n_written = written.sum().clamp_min(1)
        inner_loss_outer = None
        if K > 0 and S > 0:
            context_embeds = self.model.get_input_embeddings()(context_input_ids)  # [B, S, d]
            params = [p for p in self.parameters() if p.requires_grad] if config.recompute_write else []
            random_write = config.recompute_write and self.training and self.dropout_in_training() is not None
            grad_norms, step_losses, state = [], [], []  # state: the inner Adam moments, flat
            with torch.enable_grad():
                for k in range(K):
                    second_order = k >= K - n_second_order
                    keep_graph = second_order or (keep_inner_loss and k == K - 1)
                    if connect:  # differentiate w.r.t. the (graph-connected) current variables
                        fast = [p if p.requires_grad else p.detach().requires_grad_() for p in fast]
                    else:  # a fresh leaf every step: nothing flows back through the WRITE
                        fast = [p.detach().requires_grad_() for p in fast]
                    step = functools.partial(self._write_step, k, lr, context_input_ids, token_mask, n_tokens)
                    if second_order and config.recompute_write:
                        fast, state, losses, grads = write_recompute.recomputed_step(
                            step, fast, state, context_embeds, params, replay_rng=random_write)
                    else:
                        fast, state, losses, grads = step(fast, state, context_embeds, second_order, keep_graph)
                    if config.add_inner_loss_to_outer and k == K - 1:
                        inner_loss_outer = losses.sum() / n_written  # [], loss at memory_{K-1}
                        if not keep_inner_loss:
                            inner_loss_outer = inner_loss_outer.detach()
                    step_losses.append(losses.detach().sum() / n_written)
                    grad_norms.append(torch.linalg.vector_norm(grads[0].detach().flatten(1), dim=1))  # [B]
            if not connect:
                fast = [p.detach() for p in fast]
            if config.train_final_inner_loss or not self.training:
                with torch.no_grad():  # the loss after the final update: one forward, no graph
                    final_losses = self._inner_loss(fast, context_embeds, context_input_ids, token_mask, n_tokens)
                step_losses.append(final_losses.sum() / n_written)
                stats["inner_loss"] = step_losses[-1]
            for k, loss in enumerate(step_losses):
                stats[f"inner_loss_step_{k}"] = loss
            grad_norms = torch.stack(grad_norms)  # [K, B]
            stats.update(_masked_summary("inner_grad_norm", grad_norms, written.expand_as(grad_norms)))

        memory = self._memory_inputs(fast)  # [B, M, d]
        with torch.no_grad():
            stats.update(_masked_summary("mem_norm", memory.flatten(1).norm(dim=1), torch.ones_like(written)))
            delta = (memory - memory_init).flatten(1).norm(dim=1)
            stats.update(_masked_summary("delta_mem_norm", delta, written))
            stats["written_frac"] = written.mean()
        stats = {name: value.detach().float() for name, value in stats.items()}
        return memory, stats, inner_loss_outer

    # ----------------------------------------------------------------------------------------------------------------
    # READ

    def _read_hidden(self, memory: torch.Tensor, query_input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, Q, d] whose j-th row predicts query token j (from [read_start; memory; read_end; query])."""
        Q = query_input_ids.shape[1]
        query_embeds = self.model.get_input_embeddings()(query_input_ids[:, : max(Q - 1, 0)])  # last token predicts nothing
        x = self._layout(self.read_start, memory, self.read_end, query_embeds)
        with self._write_lora_disabled():
            h = self._decoder_hidden(x)
        return h[:, self.mem_offset - 1 : self.mem_offset - 1 + Q]

    def read(self, memory: torch.Tensor, query_input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, Q, V] of a right-padded query batch [B, Q]; logits[:, j] predicts query token j."""
        return self.model.get_output_embeddings()(self._read_hidden(memory, query_input_ids))

    def forward(
        self,
        context_input_ids: torch.Tensor,
        query_input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> MemoryModelOutput:
        """WRITE the context, READ the query. labels [B, Q] are aligned with the query ids (-100 = ignore).

        loss = target_loss (+ inner_loss_weight * inner-loss term with add_inner_loss_to_outer, where the term is
        the mean per-sample inner loss at memory_{K-1}, the last loss the WRITE differentiated, with its graph).
        """
        memory, stats, inner_loss_outer = self._write(context_input_ids)
        logits = self.read(memory, query_input_ids)  # [B, Q, V]
        loss = None
        if labels is not None:
            n_labels = (labels != -100).sum().clamp_min(1)
            target_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            target_loss = target_loss / n_labels
            stats["target_loss"] = target_loss.detach().float()
            loss = target_loss
            if self.config.add_inner_loss_to_outer:
                stats["inner_loss_outer"] = inner_loss_outer.detach().float()
                loss = loss + self.config.inner_loss_weight * inner_loss_outer
        return MemoryModelOutput(loss=loss, logits=logits, memory=memory, stats=stats)

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        query_input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding from [memory; query] for a right-padded query batch [B, Q] (row i has its own length).

        Returns the new tokens [B, max_new_tokens]; after a row emits eos_token_id (kept) the rest of the row is
        padding. No KV cache: every step re-runs READ on the whole sequence (meant for short answers).
        """
        B, Q = query_input_ids.shape
        lengths = (query_input_ids != self.pad_token_id).sum(dim=1)  # [B] real query tokens (right padding)
        pad = torch.full((B, max_new_tokens), self.pad_token_id, dtype=query_input_ids.dtype, device=query_input_ids.device)
        sequence = torch.cat([query_input_ids, pad], dim=1)  # [B, Q + T]
        new_tokens = pad.clone()
        finished = torch.zeros(B, dtype=torch.bool, device=query_input_ids.device)
        head = self.model.get_output_embeddings()
        for t in range(max_new_tokens):
            position = lengths + t  # [B] index of the token to predict in each row
            h = self._read_hidden(memory, sequence[:, : Q + t + 1])  # [B, Q + t + 1, d]
            h = h.gather(1, position.view(B, 1, 1).expand(B, 1, h.shape[-1])).squeeze(1)  # [B, d]
            token = head(h).argmax(dim=-1)  # [B]
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            sequence.scatter_(1, position.unsqueeze(1), token.unsqueeze(1))
            new_tokens[:, t] = token
            if eos_token_id is not None:
                finished |= token == eos_token_id
                if bool(finished.all()):
                    break
        return new_tokens


def _backbone_config(config: GradMemGPTConfig) -> dict:
    """The backbone's config as a dict: base_config, or the pretrained backbone's as recorded at construction
    (checkpoints of older code: re-read from pretrained_model)."""
    if config.pretrained_model is None:
        return config.base_config
    return config.pretrained_backbone_config or AutoConfig.from_pretrained(config.pretrained_model).to_dict()


def from_reference_names(state_dict: dict) -> dict:
    """A state dict with the reference implementation's tensor names renamed to ours (others kept as they are)."""
    renamed = {}
    for name, tensor in state_dict.items():
        for pattern, ours in REFERENCE_NAMES:
            name = pattern.sub(ours, name)
        renamed[name] = tensor
    return renamed


def options_implied_by(state_dict: dict) -> dict:
    """The model options a GradMem state dict (our names) was written with, as far as its tensors tell."""
    lora_A = {name: t for name, t in state_dict.items() if ".lora_A." in name}
    options = {
        "n_mem_tokens": state_dict["mem"].shape[0] if "mem" in state_dict else None,
        "n_ctrl_tokens": state_dict["write_start"].shape[0] if "write_start" in state_dict else 0,
        "use_mem_proj": "mem_proj.weight" in state_dict,
        "use_write_head": "write_head.weight" in state_dict,
        "use_write_lora": bool(lora_A),
    }
    if lora_A:
        options["write_lora_r"] = next(iter(lora_A.values())).shape[0]
        options["write_lora_target_modules"] = sorted({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in lora_A})
    return options


def _as_cli_option(name: str, value) -> str:
    if name == "use_mem_proj":
        return "--use_mem_proj --mem_proj_mode proj (or per_sample)" if value else "--mem_proj_mode none"
    if isinstance(value, bool):
        return f"--{name} {str(value).lower()}"
    if isinstance(value, list):
        return f"--{name} {','.join(value)}"
    return f"--{name} {value}"


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite (zero) derivative at 0, so that rows with zero gradient (all-pad contexts) do not turn
    the differentiable Adam step into NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _masked_summary(name: str, values: torch.Tensor, weights: torch.Tensor) -> dict:
    """{name_mean, name_max, name_min} of `values` over the entries with weight 1 (0 when there are none)."""
    values, weights = values.detach().float(), weights.float()
    count = weights.sum()
    has_any = count > 0
    zero = torch.zeros((), device=values.device)
    inf = torch.full((), float("inf"), device=values.device)
    return {
        f"{name}_mean": (values * weights).sum() / count.clamp_min(1),
        f"{name}_max": torch.where(has_any, torch.where(weights > 0, values, -inf).max(), zero),
        f"{name}_min": torch.where(has_any, torch.where(weights > 0, values, inf).min(), zero),
    }


AutoConfig.register(GradMemGPTConfig.model_type, GradMemGPTConfig)
AutoModel.register(GradMemGPTConfig, GradMemGPT)


# ----------------------------------------------------------------------------------------------------------------
# Command-line options, presets and the builder of the run scripts
# ----------------------------------------------------------------------------------------------------------------

# Command-line names that differ from the config's (which keeps the reference's config names): config name -> flag.
CLI_NAMES = cli_names(GradMemOptions)

# The GradMem options of the run scripts' command line, derived from GradMemOptions: the same fields (type, default,
# help) under their command-line names; GradMemArgs.options() gives them back as GradMemOptions, and its validate() is
# GradMemOptions.validate naming the flags (training=True). A new option is a new field of GradMemOptions, nothing else.
GradMemArgs = command_line_args(
    GradMemOptions, "GradMemArgs",
    "GradMem model options on the command line (GradMemOptions under their flag names).", __name__)

# Named sets of option values for `--preset NAME` of the GradMem run scripts (training_args.parse_cli): command-line
# names of any of the script's options; the values replace the defaults, and options given on the command line win.
PRESETS = {
    # the paper's KV model: Llama L4 H4 D128 from scratch, 8 memory vectors, K=2 second-order inner SGD steps at inner
    # lr 0.04, write head, inner loss added to the training loss with weight 0.5
    "paper_kv": {
        "n_layer": 4, "n_head": 4, "n_embd": 128,
        "n_mem_tokens": 8, "K": 2, "inner_lr": 0.04, "grad_mode": "second", "use_write_head": True,
        "add_inner_loss_to_outer": True, "inner_loss_weight": 0.5,
    },
}


def build_grad_memgpt(backbone_args: BackboneArgs, g: GradMemArgs, tokenizer) -> GradMemGPT:
    """GradMemGPT around a pretrained LM (--pretrained_model) or a from-scratch backbone (--base_model)."""
    check_right_padding(tokenizer)
    model = GradMemGPT(GradMemGPTConfig(**backbone_source(backbone_args, tokenizer), **vars(g.options())))
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    return model
