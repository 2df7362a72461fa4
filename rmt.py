"""RMT2Segm: the Recurrent Memory Transformer baseline with two segments (WRITE the context, READ the query).

Where GradMem writes the context into memory by gradient descent, RMT writes it with a forward pass: the memory
vectors are fed before the context, a second copy of them (the "write-out" slots) is appended after the context,
and the backbone's final hidden states at those slots become the new memory. READ feeds `[memory; query]` and
predicts the target. Everything is trained end to end by plain backpropagation through every forward write.

WRITE sequence (C control tokens, M memory vectors, S context tokens of which `len_i` are real):

    [write_st (C)] [memory (M)] [write_end (C)] [context (len_i)] [write_st (C)] [memory (M)] [pads]

The write-out block sits right after each sample's last real context token (not after the padding), so no
attention mask is needed: under causal attention real tokens and memory slots never see a pad, and positions run
0, 1, 2, ... as if the sample were alone. This gives exactly what an attention mask with `position_ids =
cumsum(mask) - 1` gives, works with every attention implementation, and needs no host sync.

READ sequence: `[read_st (C)] [memory (M)] [read_end (C)] [query (Q)]` (right padded: pads come after every real
token, causal attention keeps them invisible). As in GradMem, the logit at position `P - 1 + j` (P = M + 2C)
predicts query token j, so `logits[:, j]` lines up with `labels[:, j]`.

Options (all from the reference implementation):
- `K` forward writes: write k > 0 starts from the memory written by write k - 1 (the hidden states at the
  write-out slots, fed back as input embeddings). K must be >= 1.
- `mem_proj_mode`: `none`; `proj` = one Linear (PyTorch default init) applied to the memory before every write
  (not at read); `proj_rw` = that write Linear plus a read Linear initialised to the identity.
- `use_reconstruction_loss`: after write k (k = 1..K) one more pass predicts the context from
  `[memory_k; context]`; the mean of the K losses, times `reconstruction_loss_weight`, is added to the loss.
  `use_write_head` gives that loss its own vocabulary projection (an untied copy of the LM head).
- `use_mem_residual`: from the second write on, `memory_k = memory_{k-1} + LayerNorm(write_out_k)`.
- `use_gradient_checkpointing`: HF activation checkpointing of the backbone layers (non-reentrant), in training.

Every parameter that is created receives a gradient: options that would create a dead parameter (a write head
without the reconstruction loss, a residual LayerNorm with K=1) are rejected, so multi-GPU DDP runs never need
`find_unused_parameters`.

Options: each is declared once, as a field of RMTOptions (name, type, default, help), with one validation
(RMTOptions.validate); RMT2SegmConfig takes them as keywords with those defaults, and the run scripts' command line
(RMTArgs, at the end of this file) is derived from the same fields.
"""
import logging
from dataclasses import dataclass, fields
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from attn_double_bwd import resolve_attn_implementation
from modeling_utils import (
    LoadsFully,
    MemoryModelOutput,
    StaticCausalMask,
    base_config_to_dict,
    build_causal_lm,
    check_plain_logits,
    command_line_args,
    hidden_size,
    option,
    pad_token_id,
)
from training_args import BackboneArgs
from training_backbone import backbone_source, check_vocab_fits

logger = logging.getLogger("gradmem")
MEM_PROJ_MODES = ("none", "proj", "proj_rw")


@dataclass
class RMTOptions:
    """Every RMT2Segm option, declared once: its name, type, default (the reference's) and help. RMT2SegmConfig takes
    them as keywords with these defaults and keeps them as attributes; the run scripts' command line (RMTArgs, at the
    end of this file) is derived from these fields. validate() checks them for both."""

    n_mem_tokens: int = option(8, "M memory vectors")
    K: int = option(1, "forward writes of the context (>= 1)")
    n_ctrl_tokens: int = option(0, "learned start/end marker vectors around the memory")
    use_mem_proj: Optional[bool] = option(
        None, "project the memory: follows from mem_proj_mode when not given, must agree with it when given")
    mem_proj_mode: Literal[MEM_PROJ_MODES] = option("none", "none / proj (write side) / proj_rw (write and read)")
    use_reconstruction_loss: bool = option(False, "add a loss of reconstructing the context")
    reconstruction_loss_weight: float = option(1.0, "weight of the reconstruction loss")
    use_write_head: bool = option(
        False, "own head for the reconstruction loss; without --use_reconstruction_loss the run scripts build no head "
               "(a warning says so: the reference built one that nothing used) and the config refuses it")
    use_mem_residual: bool = option(False, "memory_k = memory_{k-1} + LayerNorm(write-out), K >= 2")
    use_gradient_checkpointing: bool = option(False, "recompute backbone activations")
    attn_implementation: str = option("eager", "eager, sdpa, flash_attention_2, ... or auto")

    def validate(self, flag: Optional[Callable[[str], str]] = None, training: bool = False) -> None:
        """Raise a ValueError for every invalid value or incompatible pair, naming each option by `flag(name)` (the
        config names it by its name, the command line by its --flag); complete use_mem_proj (None: whether
        mem_proj_mode projects). A write head without the reconstruction loss would be a parameter without gradient:
        the config refuses it; `training` (the run scripts) drops it with a warning instead, as the reference's SQuAD
        and phonebook presets pass --use_write_head alone."""
        flag = flag or (lambda name: name)

        def fail(message):
            raise ValueError(message)

        if self.n_mem_tokens < 1:
            fail(f"{flag('n_mem_tokens')} must be >= 1, got {self.n_mem_tokens}")
        if self.n_ctrl_tokens < 0:
            fail(f"{flag('n_ctrl_tokens')} must be >= 0, got {self.n_ctrl_tokens}")
        if self.K < 1:
            fail(f"{flag('K')}={self.K}: RMT needs at least one forward write of the context (use K >= 1)")
        if self.mem_proj_mode not in MEM_PROJ_MODES:
            fail(f"{flag('mem_proj_mode')} must be one of {MEM_PROJ_MODES}, got {self.mem_proj_mode!r}")
        if self.use_mem_proj is None:
            self.use_mem_proj = self.mem_proj_mode != "none"
        if self.use_mem_proj != (self.mem_proj_mode != "none"):
            fail(f"{flag('use_mem_proj')}={self.use_mem_proj} contradicts {flag('mem_proj_mode')}="
                 f"{self.mem_proj_mode!r}: pass {flag('mem_proj_mode')} proj|proj_rw to project the memory "
                 f"({flag('use_mem_proj')} follows from it)")
        if self.use_write_head and not self.use_reconstruction_loss:
            if not training:
                fail(f"{flag('use_write_head')} without {flag('use_reconstruction_loss')}: the write head is only used "
                     "by the reconstruction loss and would be a parameter without gradient; add "
                     f"{flag('use_reconstruction_loss')} or drop {flag('use_write_head')}")
            logger.warning("%s without %s: only the reconstruction loss uses a write head, so none is built (the "
                           "reference's SQuAD and phonebook presets built an unused one)",
                           flag("use_write_head"), flag("use_reconstruction_loss"))
            self.use_write_head = False
        if not self.use_reconstruction_loss and self.reconstruction_loss_weight != 1.0:
            fail(f"{flag('reconstruction_loss_weight')}={self.reconstruction_loss_weight} has no effect without "
                 f"{flag('use_reconstruction_loss')}")
        if self.use_reconstruction_loss and not self.reconstruction_loss_weight > 0:
            fail(f"{flag('reconstruction_loss_weight')} must be > 0, got {self.reconstruction_loss_weight}")
        if self.use_mem_residual and self.K < 2:
            fail(f"{flag('use_mem_residual')} needs K >= 2: the residual applies from the second write on, so with "
                 f"K={self.K} its LayerNorm would be a parameter without gradient")


OPTION_NAMES = tuple(f.name for f in fields(RMTOptions))


class RMT2SegmConfig(PretrainedConfig):
    """Configuration of an RMT2Segm: its backbone and its RMTOptions.

    RMT2SegmConfig(pretrained_model=..., base_config=..., **options): the options are RMTOptions' fields, as keywords
    with its defaults, validated by RMTOptions.validate, and become attributes (config.K, config.mem_proj_mode, ...).
    Backbone: exactly one of `pretrained_model` (hub id or local folder) and `base_config` (a transformers config or
    its dict; stored as a plain dict); the model checks that one is given.
    """

    model_type = "rmt_2segm"

    def __init__(self, pretrained_model: Optional[str] = None, base_config: Optional[dict] = None, **kwargs):
        options = RMTOptions(**{name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs})
        try:
            options.validate()
        except ValueError as error:
            raise ValueError(f"RMT2SegmConfig: {error}") from None
        self.pretrained_model = pretrained_model
        self.base_config = base_config_to_dict(base_config)
        for name, value in vars(options).items():
            setattr(self, name, value)
        # architecture of a pretrained backbone, recorded when it is loaded, so that a saved RMT2Segm reloads
        # without the original weights
        self.pretrained_backbone_config = kwargs.pop("pretrained_backbone_config", None)
        super().__init__(**kwargs)

    def options(self) -> RMTOptions:
        """This config's RMT options (a copy)."""
        return RMTOptions(**{name: getattr(self, name) for name in OPTION_NAMES})


class RMT2Segm(LoadsFully, StaticCausalMask, PreTrainedModel):
    config_class = RMT2SegmConfig
    base_model_prefix = "rmt"
    main_input_name = "context_input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: RMT2SegmConfig):
        super().__init__(config)
        if (config.pretrained_model is None) == (config.base_config is None):
            raise ValueError("RMT2SegmConfig needs exactly one of pretrained_model and base_config")
        self.model = self._build_backbone(config)
        lm_config = self.model.config
        check_plain_logits(lm_config)
        lm_config.use_cache = False
        self.pad_token_id = pad_token_id(lm_config)
        d = hidden_size(self.model.config)
        M, C = config.n_mem_tokens, config.n_ctrl_tokens

        self.mem = nn.Parameter(torch.empty(M, d))  # initial memory [M, d]
        if C > 0:
            self.write_st = nn.Parameter(torch.empty(C, d))
            self.write_end = nn.Parameter(torch.empty(C, d))
            self.read_st = nn.Parameter(torch.empty(C, d))
            self.read_end = nn.Parameter(torch.empty(C, d))
        self.mem_proj = nn.Linear(d, d) if config.mem_proj_mode in ("proj", "proj_rw") else None
        self.read_mem_proj = nn.Linear(d, d) if config.mem_proj_mode == "proj_rw" else None
        if config.use_write_head:
            self.write_head = nn.Linear(d, self.model.get_output_embeddings().weight.shape[0], bias=False)
        else:
            self.write_head = None
        self.mem_residual_ln = nn.LayerNorm(d) if config.use_mem_residual else None

        self.post_init()
        if config.use_gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ----------------------------------------------------------------------------------------------- init

    @staticmethod
    def _build_backbone(config: RMT2SegmConfig):
        # RMT needs first-order gradients only: "auto" -> sdpa; legacy names -> exact implementations
        attn = resolve_attn_implementation(config.attn_implementation or "auto", second_order=False)
        if config.pretrained_model is not None and torch.empty(0).device.type == "meta":
            # `RMT2Segm.from_pretrained(our checkpoint)` builds the model on the meta device and then loads every
            # weight from our own checkpoint: the backbone only needs its architecture, recorded at construction.
            if config.pretrained_backbone_config is None:
                raise ValueError("this checkpoint has no pretrained_backbone_config; re-save it with this code")
            return build_causal_lm(None, config.pretrained_backbone_config, attn)
        model = build_causal_lm(config.pretrained_model, config.base_config, attn)
        if config.pretrained_model is not None:
            config.pretrained_backbone_config = model.config.to_dict()
        return model

    @torch.no_grad()
    def _init_weights(self, module):
        """Our own parameters only; the backbone is initialised (or loaded) by itself."""
        if module is self:
            self.mem.normal_(0.0, 0.02)
            for name in ("write_st", "write_end", "read_st", "read_end"):
                if hasattr(self, name):
                    getattr(self, name).normal_(0.0, 0.02)
        elif module is self.mem_proj:
            module.reset_parameters()  # PyTorch's default Linear init, as the reference
        elif module is self.read_mem_proj:
            module.weight.copy_(torch.eye(module.weight.shape[0], dtype=module.weight.dtype))
            module.bias.zero_()
        elif module is self.write_head:
            module.weight.copy_(self.model.get_output_embeddings().weight)  # an untied copy of the LM head
        elif module is self.mem_residual_ln:
            module.reset_parameters()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the backbone's layers (non-reentrant unless told otherwise); applies to WRITE and READ."""
        kwargs_ = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x
            enable(activation_checkpointing_kwargs=kwargs_, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_, **kwargs)

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        flag = getattr(type(self.model), "is_activation_checkpointing", None)  # transformers >= 5.2x
        return self.model.is_activation_checkpointing if flag is not None else self.model.is_gradient_checkpointing

    def captured_step_problem(self) -> Optional[str]:
        """Why fast_step.CapturedTrainStep cannot record this model's training step (None: it can). The step has no
        host synchronisation (the write-out permutation and the losses are tensor ops; the causal mask is static
        under the captured step)."""
        if self.config.use_gradient_checkpointing:
            return "gradient checkpointing is on (recomputation is not captured)"
        return None

    # ----------------------------------------------------------------------------------------------- pieces

    @property
    def n_prefix(self) -> int:
        """P: positions before the first context/query token (memory and its control tokens)."""
        return self.config.n_mem_tokens + 2 * self.config.n_ctrl_tokens

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _around(self, start: Optional[torch.Tensor], memory: torch.Tensor, end: Optional[torch.Tensor]):
        """[start (C)] [memory (M)] [end (C)] for a batch; start/end None means no control tokens."""
        B = memory.shape[0]
        parts = []
        if start is not None:
            parts.append(start.expand(B, -1, -1))
        parts.append(memory)
        if end is not None:
            parts.append(end.expand(B, -1, -1))
        return torch.cat(parts, dim=1)

    def _ctrl(self, name: str) -> Optional[torch.Tensor]:
        return getattr(self, name) if self.config.n_ctrl_tokens > 0 else None

    def _write_out_permutation(self, context_lengths: torch.Tensor, S: int) -> torch.Tensor:
        """Index map that moves the write-out block from after the padding to right after the real context.

        Input layout  [prefix (P)] [context (S) = real (len_i) + pads] [write-out (T)]
        Output layout [prefix (P)] [real (len_i)] [write-out (T)] [pads (S - len_i)]
        """
        P, T = self.n_prefix, self.config.n_ctrl_tokens + self.config.n_mem_tokens
        t = torch.arange(P + S + T, device=context_lengths.device)[None, :]  # [1, L]
        end_real = P + context_lengths[:, None]  # [B, 1]
        return torch.where(
            t < end_real, t, torch.where(t < end_real + T, P + S + (t - end_real), t - T)
        )  # [B, L]

    def _rec_loss(self, hidden: torch.Tensor, context_input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Next-token CE of the context from [prefix; context] hidden states: position P-1+t predicts token t."""
        P, S = self.n_prefix, context_input_ids.shape[1]
        head = self.write_head if self.write_head is not None else self.model.get_output_embeddings()
        logits = _upcast(head(hidden[:, P - 1 : P - 1 + S]))  # [B, S, V]
        targets = context_input_ids.masked_fill(~real, -100)
        loss_sum = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        return loss_sum / real.sum().clamp_min(1)

    # ----------------------------------------------------------------------------------------------- WRITE / READ

    def write(self, context_input_ids: torch.Tensor):
        """K forward writes of a right-padded context batch [B, S]. Returns (memory [B, M, d] as READ consumes it,
        stats); the memory keeps its graph to the parameters when gradients are enabled."""
        memory, _, stats = self._write(context_input_ids)
        return memory, stats

    def _write(self, context_input_ids: torch.Tensor):
        """write() plus the reconstruction losses of memory_1..memory_K (empty without use_reconstruction_loss)."""
        cfg = self.config
        B, S = context_input_ids.shape
        M, C, P = cfg.n_mem_tokens, cfg.n_ctrl_tokens, self.n_prefix
        real = context_input_ids != self.pad_token_id  # [B, S]
        context_lengths = real.sum(1)  # [B]
        context_embeds = self._embed(context_input_ids)  # [B, S, d]
        d = context_embeds.shape[-1]
        permutation = self._write_out_permutation(context_lengths, S)[..., None].expand(-1, -1, d)  # [B, L, d]
        write_out_positions = (P + context_lengths + C)[:, None] + torch.arange(M, device=real.device)  # [B, M]
        write_out_positions = write_out_positions[..., None].expand(-1, -1, d)

        memory = self.mem.expand(B, M, d)  # [B, M, d]
        memory_first = None
        rec_losses = []
        step_deltas = []  # per-sample ‖memory_k − memory_{k−1}‖ for writes k = 2..K
        n_passes = cfg.K + (1 if cfg.use_reconstruction_loss else 0)
        for k in range(n_passes):
            memory_in = self.mem_proj(memory) if self.mem_proj is not None else memory
            prefix = self._around(self._ctrl("write_st"), memory_in, self._ctrl("write_end"))  # [B, P, d]
            if k == cfg.K:
                # the extra pass only scores how well memory_K reconstructs the context: no write-out slots needed
                hidden = self._decoder_hidden(torch.cat([prefix, context_embeds], 1))
                rec_losses.append(self._rec_loss(hidden, context_input_ids, real))
                break
            write_out = self._around(self._ctrl("write_st"), memory_in, None)  # [B, C + M, d]
            inputs = torch.cat([prefix, context_embeds, write_out], 1).gather(1, permutation)  # [B, P+S+C+M, d]
            hidden = self._decoder_hidden(inputs)
            if cfg.use_reconstruction_loss and k > 0:  # memory_0 is the learned init: nothing to reconstruct yet
                rec_losses.append(self._rec_loss(hidden, context_input_ids, real))
            new_memory = hidden.gather(1, write_out_positions)  # [B, M, d]
            if self.mem_residual_ln is not None and k > 0:
                new_memory = memory + self.mem_residual_ln(new_memory)
            if k > 0:
                step_deltas.append((new_memory - memory).detach().flatten(1).norm(dim=1))
            memory = new_memory
            if k == 0:
                memory_first = memory

        stats = _norm_stats("mem_norm", memory.detach().flatten(1).norm(dim=1))
        if cfg.K > 1:
            steps = torch.stack(step_deltas)  # [K-1, B]
            stats["step_delta_mem_norm_mean"] = steps.mean()
            stats["step_delta_mem_norm_max"] = steps.max()
            stats["step_delta_mem_norm_min"] = steps.min()
            stats.update(_norm_stats("delta_mem_norm", (memory - memory_first).detach().flatten(1).norm(dim=1)))
        return memory, rec_losses, stats

    def read(self, memory: torch.Tensor, query_input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, Q, V] of the READ pass; logits[:, j] predicts query token j."""
        P, Q = self.n_prefix, query_input_ids.shape[1]
        memory_in = self.read_mem_proj(memory) if self.read_mem_proj is not None else memory
        prefix = self._around(self._ctrl("read_st"), memory_in, self._ctrl("read_end"))  # [B, P, d]
        inputs = torch.cat([prefix, self._embed(query_input_ids)], 1)  # [B, P + Q, d]
        hidden = self._decoder_hidden(inputs)
        return self.model.get_output_embeddings()(hidden[:, P - 1 : P - 1 + Q])  # [B, Q, V]

    def forward(
        self,
        context_input_ids: torch.Tensor,
        query_input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> MemoryModelOutput:
        """context_input_ids [B, S] and query_input_ids [B, Q], right padded with the backbone's pad id; labels
        [B, Q] aligned with the query ids (-100 = ignored).

        loss = target CE (token-weighted mean) [+ reconstruction_loss_weight * mean of the K reconstruction losses].
        """
        memory, rec_losses, stats = self._write(context_input_ids)
        logits = self.read(memory, query_input_ids)

        loss = None
        if rec_losses:
            rec_loss = torch.stack(rec_losses).mean()
            stats["rec_loss"] = rec_loss.detach()
        if labels is not None:
            target_loss = F.cross_entropy(_upcast(logits).transpose(1, 2), labels, ignore_index=-100)
            stats["target_loss"] = target_loss.detach()
            loss = target_loss
            if rec_losses:
                loss = loss + self.config.reconstruction_loss_weight * rec_loss
        return MemoryModelOutput(loss=loss, logits=logits, memory=memory, stats=stats)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in at least float32 (bf16/fp16 logits lose too much in log-softmax)."""
    return logits.float() if logits.element_size() < 4 else logits


def _norm_stats(prefix: str, norms: torch.Tensor) -> dict:
    return {f"{prefix}_mean": norms.mean(), f"{prefix}_max": norms.max(), f"{prefix}_min": norms.min()}


AutoConfig.register(RMT2SegmConfig.model_type, RMT2SegmConfig)
AutoModel.register(RMT2SegmConfig, RMT2Segm)


# ----------------------------------------------------------------------------------------------------------------
# Command-line options and the builder of the run script
# ----------------------------------------------------------------------------------------------------------------

# The RMT options of the run scripts' command line, derived from RMTOptions: the same fields (type, default, help)
# under the same names; RMTArgs.options() gives them back as RMTOptions, and its validate() is RMTOptions.validate
# naming the flags (training=True: a write head without the reconstruction loss is dropped with a warning).
RMTArgs = command_line_args(RMTOptions, "RMTArgs", "RMT2Segm options on the command line (RMTOptions).", __name__)


def check_backbone(backbone_args: BackboneArgs) -> None:
    if backbone_args.base_model == "mamba":
        raise ValueError("--base_model mamba: RMT needs a transformer backbone (llama, gpt2, pythia); the Mamba "
                         "baseline is the full-context LM (run_gpt2_on_*.py)")


def build_rmt(backbone_args: BackboneArgs, r: RMTArgs, tokenizer) -> RMT2Segm:
    """RMT2Segm around a pretrained LM (--pretrained_model) or a from-scratch backbone (--base_model)."""
    check_backbone(backbone_args)
    model = RMT2Segm(RMT2SegmConfig(**backbone_source(backbone_args, tokenizer), **vars(r.options())))
    check_vocab_fits(model.model.get_input_embeddings().weight.shape[0], tokenizer)
    if model.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"the backbone's pad id {model.pad_token_id} differs from the tokenizer's "
                         f"{tokenizer.pad_token_id}: the model would not recognise the collator's padding")
    return model
