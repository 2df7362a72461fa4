"""Pieces shared by the memory models (GradMem, RMT): the output contract, backbone loading, the static causal mask
and the declaration of their options; and the full-context LMs' step for CUDA graphs (FullContextStep), which reuses
that mask.

Both memory models wrap any Hugging Face causal LM (the "backbone"), built either from a config (trained from
scratch) or from a pretrained name/path, and return a `MemoryModelOutput` whose `logits[:, j]` predicts query token
`j` (labels are aligned with the query ids, not shifted), so one collator and one metrics function serve both.

Options: a model declares each of its options once, as a field of its options dataclass (made with `option`: name,
type, default, help and, where it differs, the command-line name), with a `validate(flag=None, training=False)`
method. Its config takes the fields as keywords with those defaults; `command_line_args` derives the run scripts'
command-line dataclass from the same fields.
"""
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class MemoryModelOutput(ModelOutput):
    """Output of a memory model's forward.

    loss:   scalar training loss (None without labels).
    logits: [B, Q, V]; logits[:, j] predicts query token j (aligned with `labels`, no shift needed).
    memory: [B, M, d] the final memory, exactly as READ consumed it (a plain tensor: save it, read it later).
    stats:  dict of detached 0-d tensors (inner-loop / memory statistics) for logging.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    memory: Optional[torch.Tensor] = None
    stats: Optional[dict] = None


def option(default, help: str, cli: Optional[str] = None):
    """A field of a model's options dataclass: its default, its help text and, where it differs from the config's
    name, its command-line name."""
    return field(default=default, metadata={"help": help} if cli is None else {"help": help, "cli": cli})


def cli_names(options_type: type) -> dict:
    """Command-line names that differ from the config's: config name -> flag name (without the dashes)."""
    return {f.name: f.metadata["cli"] for f in fields(options_type) if "cli" in f.metadata}


def command_line_args(options_type: type, name: str, doc: str, module: str) -> type:
    """The command-line dataclass of a model's options: the same fields in the same order, with their types,
    defaults and help, under their command-line names. An `Optional[bool]` option (None: the model derives it) is a
    `bool` there with the default None, so that a bare `--flag` means true (HfArgumentParser gives an Optional[bool]
    no bare form).

    Its `options()` returns the parsed values as `options_type` (config names); its `validate()` (called by
    training_args.parse_cli) runs `options_type.validate` with the flags' names and training=True and keeps the
    completed values, so that the run record holds what the model is built with."""
    names = cli_names(options_type)

    def options(self):
        return options_type(**{f.name: getattr(self, names.get(f.name, f.name)) for f in fields(options_type)})

    def validate(self) -> None:
        values = self.options()
        values.validate(flag=lambda option_name: "--" + names.get(option_name, option_name), training=True)
        for option_name, value in vars(values).items():
            setattr(self, names.get(option_name, option_name), value)

    return dataclasses.make_dataclass(
        name,
        [(names.get(f.name, f.name), bool if f.type == Optional[bool] else f.type,
          field(default=f.default, metadata={"help": f.metadata["help"]})) for f in fields(options_type)],
        namespace={"__doc__": doc, "__module__": module, "options": options, "validate": validate},
    )


def base_config_to_dict(base_config: Union[None, dict, PretrainedConfig]) -> Optional[dict]:
    """A backbone config stored inside our own config must be a plain dict so that save/load round-trips."""
    if base_config is None or isinstance(base_config, dict):
        return base_config
    if isinstance(base_config, PretrainedConfig):
        return base_config.to_dict()
    raise TypeError(f"base_config must be a dict or a PretrainedConfig, got {type(base_config).__name__}")


def base_config_from_dict(base_config: dict) -> PretrainedConfig:
    if "model_type" not in base_config:
        raise ValueError("base_config has no 'model_type'; build it from a transformers config (e.g. LlamaConfig)")
    config = dict(base_config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def build_causal_lm(
    pretrained_model: Optional[str],
    base_config: Optional[dict],
    attn_implementation: Optional[str] = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """The backbone: `AutoModelForCausalLM` from a pretrained name/folder, or freshly initialised from a config."""
    if (pretrained_model is None) == (base_config is None):
        raise ValueError("give exactly one of pretrained_model (a hub id or local folder) and base_config")
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if pretrained_model is not None:
        return AutoModelForCausalLM.from_pretrained(pretrained_model, **kwargs, **from_pretrained_kwargs)
    return AutoModelForCausalLM.from_config(base_config_from_dict(base_config), **kwargs)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (`model` for llama, `transformer` for gpt2, `gpt_neox` for pythia)."""
    lm = unwrap_peft(model)
    backbone = getattr(lm, lm.base_model_prefix, None)
    if backbone is None:
        raise ValueError(f"cannot find the decoder of {type(lm).__name__} (base_model_prefix={lm.base_model_prefix!r})")
    return backbone


def hidden_size(config: PretrainedConfig) -> int:
    """Width of the input embeddings (where memory vectors live)."""
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"cannot read the hidden size of a {type(config).__name__}")


def max_positions(config: PretrainedConfig) -> Optional[int]:
    """How many positions the backbone can embed (GPT-2: n_positions; others: max_position_embeddings); None for
    backbones without a position limit (e.g. mamba)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def check_plain_logits(config: PretrainedConfig) -> None:
    """The memory models compute logits from hidden states with the LM head alone: refuse a backbone whose forward
    post-processes its logits (softcapping, a logit scale), which that would silently skip."""
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise NotImplementedError(
                f"backbones with {name} are not supported (logits are computed from hidden states)")


def pad_token_id(config: PretrainedConfig) -> int:
    """The backbone's pad id (inputs are right-padded with it); eos when no pad id is set (as for GPT-2)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("the backbone config has neither pad_token_id nor eos_token_id; set pad_token_id")


def safetensors_files(folder: Path) -> list:
    """The weight files of a checkpoint folder: model.safetensors, or the shards its model.safetensors.index.json
    names (transformers shards large checkpoints); [] when it has neither."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
    return [folder / name for name in shards]


def static_mask_kind(attn_implementation: Optional[str]) -> Optional[str]:
    """"eager" (additive float mask) or "sdpa" (bool mask): how transformers builds the 4D mask for this attention
    implementation; None where it builds neither (then no ready 4D causal mask can stand in for it)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    if attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None
    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(attn_implementation)
    return "eager" if builder is eager_mask else "sdpa" if builder is sdpa_mask else None


class StaticCausalMask:
    """Mixin for a memory model whose backbone (`self.model`) runs causal, right-padded sequences: `_decoder_hidden`
    gives the backbone's final hidden states, with `use_static_causal_mask = True` (set by fast_step for CUDA graphs)
    passing a ready 4D causal mask instead of letting transformers build one.

    transformers returns a 4D mask as it is, which skips its mask construction: that construction checks the position
    ids for packed sequences with a host synchronisation on every call, which a CUDA graph cannot capture. The mask is
    what the attention implementation's own mask builder would make for a right-padded causal batch: additive float
    (0 / dtype min) for "eager", bool (True = attend) for the implementations built on transformers' sdpa mask (sdpa,
    exact_eager, fused_double_bwd, ...). Masks are cached per length, device, dtype and attention.
    """

    use_static_causal_mask = False

    def _decoder_hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the backbone's decoder stack: [B, T, d] -> [B, T, d]."""
        kwargs = {}
        if self.use_static_causal_mask:
            kwargs["attention_mask"] = self._static_causal_mask(inputs_embeds)
        return get_backbone(self.model)(inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state

    def _static_causal_mask(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The causal mask [1, 1, T, T] for this attention implementation (see the class docstring)."""
        cache = self.__dict__.setdefault("_causal_mask_cache", {})  # WRITE and READ lengths differ
        T, device, dtype = inputs_embeds.shape[1], inputs_embeds.device, inputs_embeds.dtype
        attn = self.model.config._attn_implementation
        key = (T, device, dtype, attn)
        if key in cache:
            return cache[key]
        kind = static_mask_kind(attn)
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, T, T]
        if kind == "eager":
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        elif kind == "sdpa":
            mask = allowed
        else:
            raise ValueError(
                f"use_static_causal_mask: attn_implementation {attn!r} does not take a 4D causal mask built like "
                "transformers' eager or sdpa masks; use eager, sdpa, exact_eager or fused_double_bwd"
            )
        cache[key] = mask
        return mask


class FullContextStep(StaticCausalMask, nn.Module):
    """The training step of a full-context causal LM (Llama, Mamba) for fast_step.CapturedTrainStep: `input_ids` and
    `labels` of a right-padded batch (training_collators.CausalLMCollator's) -> the LM's output, its loss the mean
    over the labelled tokens, as in the eager step.

    The batch's 2D attention mask is not passed: transformers would build the 4D mask from it with host
    synchronisations, which a CUDA graph cannot record. With right padding the causal mask alone gives every real
    token the same attention (a pad comes after every real token of its row) and only the pads' outputs change, which
    carry no label; so the loss and the gradients are those of the eager step. Attention models get the static
    causal mask (StaticCausalMask); Mamba needs none (its scan is causal, the pads come last).
    """

    step_input_names = ("input_ids", "labels")
    use_static_causal_mask = True
    MODEL_TYPES = ("llama", "mamba")  # the full-context LMs whose step has been checked against the eager one

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.model = lm

    @classmethod
    def problem(cls, lm) -> Optional[str]:
        """Why `lm`'s step cannot be recorded this way (None: it can)."""
        model_type = getattr(getattr(lm, "config", None), "model_type", None)
        if model_type not in cls.MODEL_TYPES or not type(lm).__name__.endswith("ForCausalLM"):
            return (f"captured steps are implemented for the memory models and the full-context "
                    f"{'/'.join(cls.MODEL_TYPES)} LMs, not {type(lm).__name__}")
        if getattr(lm, "is_gradient_checkpointing", False):
            return "gradient checkpointing is on (recomputation is not captured)"
        attn = getattr(lm.config, "_attn_implementation", None)
        if model_type != "mamba" and static_mask_kind(attn) is None:
            return f"attn_implementation {attn!r} takes no ready 4D causal mask (eager and sdpa do)"
        return None

    def captured_step_problem(self) -> Optional[str]:
        return self.problem(self.model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """input_ids, labels [B, T] (labels aligned with input_ids; the LM shifts them) -> the LM's output."""
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, d]
        kwargs = {}
        if self.model.config.model_type != "mamba":
            kwargs["attention_mask"] = self._static_causal_mask(inputs_embeds)  # [1, 1, T, T]
        return self.model(inputs_embeds=inputs_embeds, labels=labels, use_cache=False, **kwargs)


class LoadsFully:
    """Mixin for a memory model (before PreTrainedModel in the bases): `from_pretrained` refuses a checkpoint that
    leaves a model tensor unloaded or holds tensors the model lacks (transformers would only log them and leave
    freshly initialised weights in place).

    `checkpoint_state_dict(folder)` is the hook for checkpoints named differently (e.g. the reference implementation's):
    it returns the folder's tensors under our names, or None to load the folder as it is.
    """

    @classmethod
    def checkpoint_state_dict(cls, folder: str) -> Optional[dict]:
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        source = pretrained_model_name_or_path
        state_dict = None
        if source is not None and kwargs.get("state_dict") is None:
            state_dict = cls.checkpoint_state_dict(str(source))
        if state_dict is not None:  # load the converted tensors, with the folder's config
            config = kwargs.pop("config", None)
            if not isinstance(config, PretrainedConfig):
                config = cls.config_class.from_pretrained(config or source)
            model, info = super().from_pretrained(None, *args, config=config, state_dict=state_dict,
                                                  output_loading_info=True, **kwargs)
        else:
            model, info = super().from_pretrained(source, *args, output_loading_info=True, **kwargs)
        unused = sorted(info["unexpected_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        missing = sorted(info["missing_keys"])
        if unused or missing:
            raise ValueError(
                f"{source} does not fit the {type(model).__name__} its config.json describes: checkpoint tensors "
                f"not used: {listed(unused)}; model tensors not in the checkpoint: {listed(missing)}. The weights were "
                "written with other model options: set them in config.json (e.g. n_mem_tokens, n_ctrl_tokens, "
                "mem_proj_mode, use_write_head, use_write_lora, write_lora_r, write_lora_target_modules)")
        return (model, info) if want_info else model


def listed(names: Sequence[str], limit: int = 6) -> str:
    """'a, b, c and 4 more' (or 'none')."""
    names = list(names)
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
