"""The tokenizer and the backbone of a run: load_tokenizer, from-scratch backbone configs, backbone_source.

A memory model's config takes its causal LM either as a pretrained name/folder or as a from-scratch config written
here locally (no hub access); `backbone_source` gives that part of the config from BackboneArgs.
"""
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from training_args import BASE_MODELS, REPO_DIR, BackboneArgs

logger = logging.getLogger("gradmem")


def _repo_relative(path: str) -> Path:
    """A relative path that does not exist from the current directory is looked up in the repository."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_DIR / p).exists():
        return REPO_DIR / p
    return p


def load_tokenizer(backbone_args: BackboneArgs) -> PreTrainedTokenizerBase:
    """The pretrained model's tokenizer (pad := eos if it has none) or the from-scratch one; always right padding."""
    if backbone_args.pretrained_model is not None:
        tokenizer = AutoTokenizer.from_pretrained(backbone_args.pretrained_model)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {backbone_args.pretrained_model} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
    else:
        path = _repo_relative(backbone_args.tokenizer_path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer folder {backbone_args.tokenizer_path} not found; the KV tokenizers are committed under "
                "tokenizers/ and rebuilt by `python kv_dataset_utils.py --save_tokenizers`"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {path} has no pad token")
    if not tokenizer.is_fast:
        raise ValueError("a fast tokenizer is needed (character offsets locate the target tokens)")
    if tokenizer.padding_side != "right":
        logger.info("tokenizer padding side %r -> 'right' (memory models rely on right padding)", tokenizer.padding_side)
        tokenizer.padding_side = "right"
    return tokenizer


def build_backbone_config(
    base_model: str,
    n_layer: int,
    n_head: int,
    n_embd: int,
    tokenizer: PreTrainedTokenizerBase,
    max_position_embeddings: Optional[int] = None,
) -> PretrainedConfig:
    """A from-scratch backbone config, written locally (no hub access).

    llama:  Llama-3.2-1B family settings (tied embeddings, rope_theta 500000 with llama3 rope scaling, 131072
            positions, rms eps 1e-5, SiLU) with kv heads = heads, head_dim = width / heads, FFN = 4 x width.
            With `max_position_embeddings`, plain RoPE (theta 10000, no scaling) like the reference GPT baseline.
    gpt2:   GPT-2 small settings (1024 positions, gelu_new, dropout 0.1), FFN = 4 x width.
    pythia: Pythia-160m settings (gpt_neox: parallel residual, rotary on 25% of head dims, 2048 positions, untied
            embeddings), FFN = 4 x width.
    mamba:  mamba-130m-hf settings with expand 4 (d_inner = 4 x width), time_step_rank = ceil(width / 16); no heads.
    Vocabulary size and special ids come from the tokenizer.
    """
    vocab = len(tokenizer)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if base_model == "llama":
        from transformers import LlamaConfig

        if max_position_embeddings is None:
            positions = 131072
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
        else:
            positions, rope = max_position_embeddings, {"rope_type": "default", "rope_theta": 10000.0}
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, head_dim=n_embd // n_head, hidden_act="silu",
            max_position_embeddings=positions, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False, initializer_range=0.02, **special,
        )
    elif base_model == "gpt2":
        from transformers import GPT2Config

        config = GPT2Config(
            vocab_size=vocab, n_positions=max_position_embeddings or 1024, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_inner=4 * n_embd, activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1,
            attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02, **special,
        )
    elif base_model == "pythia":
        from transformers import GPTNeoXConfig

        config = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
            intermediate_size=4 * n_embd, hidden_act="gelu", max_position_embeddings=max_position_embeddings or 2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
            hidden_dropout=0.0, initializer_range=0.02, **special,
        )
    elif base_model == "mamba":
        from transformers import MambaConfig

        config = MambaConfig(
            vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer, state_size=16, expand=4,
            intermediate_size=4 * n_embd, conv_kernel=4, time_step_rank=math.ceil(n_embd / 16), use_bias=False,
            use_conv_bias=True, hidden_act="silu", initializer_range=0.1, residual_in_fp32=True,
            layer_norm_epsilon=1e-5, tie_word_embeddings=True, **special,
        )
    else:
        raise ValueError(f"unknown base model {base_model!r}; choose one of {', '.join(BASE_MODELS)}")
    config.use_cache = False
    config.dtype = torch.float32
    return config


def backbone_source(backbone_args: BackboneArgs, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The backbone part of a memory-model config: {pretrained_model} or {base_config} (from scratch)."""
    if backbone_args.pretrained_model is not None:
        return {"pretrained_model": backbone_args.pretrained_model}
    return {"base_config": build_backbone_config(
        backbone_args.base_model, backbone_args.n_layer, backbone_args.n_head, backbone_args.n_embd, tokenizer,
        backbone_args.max_position_embeddings)}


def check_vocab_fits(model_vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {model_vocab_size}: "
                         "the model and the tokenizer do not belong together")
