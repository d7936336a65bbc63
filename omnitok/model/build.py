"""The decoder LM: a Hugging Face causal LM whose vocabulary is the token layout's.

From scratch: ``ModelConfig`` names the architecture (``llama``; ``qwen3`` for Chameleon-style QK-norm) and its sizes.
From a pretrained LLM (``init_from``): its local directory is loaded and the embedding and output rows for the layout's
specials and media codes are added, mean-initialised as AnyGPT does with ``resize_token_embeddings``; the layout's text
range must equal the LLM's vocabulary (its embedding rows), so every original row keeps its id. From an omnitok
export (``init_from`` holding ``tokenizer/layout.json``): the model continues as it is, on its own layout or on that
layout with the chat markers added (instruction tuning), which keeps every id it learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import LAYOUT_FILE, TokenLayout
from omnitok.weights import from_pretrained

ARCHITECTURES = ("llama", "qwen3")


@dataclass
class ModelConfig:
    arch: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_from: str | None = None  # a local Hugging Face causal-LM directory to continue from

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise OmnitokError(f"model.arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise OmnitokError("model: hidden_size must divide by num_heads, and num_heads by num_kv_heads")


def _hf_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads)
    return LlamaConfig(**common) if cfg.arch == "llama" else Qwen3Config(**common)


ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def empty_model(cfg: ModelConfig, layout: TokenLayout) -> torch.nn.Module:
    """The architecture ``build_model`` returns for ``cfg`` and ``layout``, with fresh weights: the frame that full
    weights saved from training are loaded into (the continued LLM's own architecture when ``init_from`` names one).
    Its random initialisation leaves the global RNG as it was: a run that writes one at a checkpoint draws the same
    numbers afterwards as a run resumed from that checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.init_from is None:
        hf_config = _hf_config(cfg, layout.vocab_size)
    else:
        hf_config = AutoConfig.from_pretrained(cfg.init_from, local_files_only=True)
        hf_config.vocab_size = layout.vocab_size
    with torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(hf_config)


def build_model(cfg: ModelConfig, layout: TokenLayout, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A causal LM with ``layout.vocab_size`` rows: new; or from ``cfg.init_from``, either a text LLM whose rows are
    extended with the layout's specials and codes, or an omnitok export (its ``tokenizer/layout.json`` beside it)
    continued as it is (instruction tuning: the same layout with chat markers). Attention is computed with
    ``attn_implementation`` (one of transformers' kernels; every one of them keeps packed documents apart)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation not in ATTENTION:
        raise OmnitokError(f"attention must be one of {', '.join(ATTENTION)}, got {attn_implementation!r}")
    if cfg.init_from is None:
        return AutoModelForCausalLM.from_config(_hf_config(cfg, layout.vocab_size),
                                                attn_implementation=attn_implementation)
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        raise OmnitokError(f"model.init_from {path} is not a Hugging Face model directory (no config.json)")
    model = from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32, attn_implementation=attn_implementation)
    rows = model.get_input_embeddings().weight.shape[0]
    trained_on = path / "tokenizer" / LAYOUT_FILE
    if trained_on.is_file():  # an omnitok export: continue it on its own layout, or on it with chat markers added
        layout.check_reads(TokenLayout.load(trained_on), "this tokenizer", f"the model in {path}")
        if rows != layout.vocab_size:  # the markers did not fit in the padding: new rows, mean-initialised
            model.resize_token_embeddings(layout.vocab_size, mean_resizing=True)
        return model
    if rows != layout.text_vocab_size:
        raise OmnitokError(f"the LLM in {path} has {rows} embedding rows but the token layout's text range has "
                           f"{layout.text_vocab_size}; assemble the tokenizer from this LLM with --text-vocab-size "
                           f"{rows}")
    model.resize_token_embeddings(layout.vocab_size, mean_resizing=True)
    return model
