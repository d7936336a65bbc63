"""``omnitok finetune``: instruction tuning, the second training stage, from an exported model on conversation shards.

It is pretraining's task (``pretrain.py``: the same stream, loss, DeepSpeed ZeRO 0-3, harness, resume and records)
started from ``model.init_from`` with one of two methods:

- ``full``: every weight is trained;
- ``lora`` (default): PEFT's LoRA on the attention and MLP projections (``lora.targets``), and of the embedding and
  output matrices only the rows of the ids the layout added to the base model's (``lora.token_rows: added``, PEFT's
  trainable token rows: the chat markers when the base was pretrained without them), or the whole matrices
  (``all``), or none. Every other weight stays frozen, bit for bit.

Each checkpoint's ``model.safetensors`` holds the merged weights (the adapter folded into a plain Hugging Face model,
which ``omnitok export`` and every reader of pretraining runs take as they are) and, for LoRA, ``adapter/``: PEFT's
own adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) that
``PeftModel.from_pretrained(base, dir)`` applies to the base model, written when the base has the layout's number
of rows (the chat markers fit in its padding; otherwise the base needs new rows and only the merged model is
complete).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnitok.config import apply_overrides, build, load_config_file
from omnitok.errors import OmnitokError
from omnitok.model.build import empty_model
from omnitok.tokenizers.layout import LAYOUT_FILE, TokenLayout
from omnitok.train.checkpoint import complete_checkpoints
from omnitok.train.pretrain import PretrainConfig, PretrainTask, run_lm_task

ADAPTER_DIR = "adapter"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKEN_ROWS = ("added", "all", "none")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names LoRA wraps
    # embedding and output rows trained: the ids the layout added (added), the whole matrices (all), none
    token_rows: str = "added"


@dataclass
class FinetuneConfig(PretrainConfig):
    out: str = "runs/finetune"
    method: str = "lora"  # lora or full
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model.init_from:
            raise OmnitokError("finetune: 'model.init_from' (the exported model directory to fine-tune) is required")
        if self.method not in ("lora", "full"):
            raise OmnitokError(f"finetune: method must be lora or full, got {self.method!r}")
        if self.lora.token_rows not in TOKEN_ROWS:
            raise OmnitokError(f"lora.token_rows must be one of {', '.join(TOKEN_ROWS)}, got {self.lora.token_rows!r}")
        if self.lora.r < 1 or not self.lora.targets:
            raise OmnitokError("lora.r must be at least 1 and lora.targets name at least one module")


def load_finetune_config(path: str | Path | None, overrides: list[str]) -> FinetuneConfig:
    return build(FinetuneConfig, apply_overrides(load_config_file(path), overrides))


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tune; returns the last train record (on every rank)."""
    return run_lm_task(FinetuneTask, cfg, resume, "finetune")


def base_layout(model_dir: str | Path) -> TokenLayout | None:
    """The layout an omnitok export was trained on; None for a plain text LLM."""
    path = Path(model_dir) / "tokenizer" / LAYOUT_FILE
    return TokenLayout.load(path) if path.is_file() else None


def lora_config(cfg: FinetuneConfig, layout: TokenLayout, tied: bool):
    """PEFT's LoRA settings for ``cfg`` on a model whose input and output embeddings are ``tied`` or not."""
    from peft import LoraConfig

    rows: dict = {}
    modules_to_save = None
    if cfg.lora.token_rows == "added":
        added = layout.added_ids(base_layout(cfg.model.init_from))
        if added:  # a tied output matrix follows its embedding
            rows = {"embed_tokens": added} if tied else {"embed_tokens": added, "lm_head": added}
    elif cfg.lora.token_rows == "all":
        modules_to_save = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.targets), trainable_token_indices=rows or None,
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")


def wrap_lora(model: torch.nn.Module, cfg: FinetuneConfig, layout: TokenLayout) -> torch.nn.Module:
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.lora.targets) - names)
    if missing:
        raise OmnitokError(f"lora.targets {', '.join(missing)} name no module of the model in {cfg.model.init_from}")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return get_peft_model(model, lora_config(cfg, layout, tied))


class FinetuneTask(PretrainTask):
    """Pretraining's task on a model from ``model.init_from``, with LoRA adapters or all weights trained."""

    cfg: FinetuneConfig

    def make_model(self) -> torch.nn.Module:
        model = super().make_model()
        if self.cfg.method == "full":
            return model
        if self.cfg.activation_checkpointing:  # the frozen embeddings' output must carry grad into the first layer
            model.enable_input_require_grads()
        return wrap_lora(model, self.cfg, self.layout)

    def hf_state(self, state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
        """LoRA: the adapter saved as PEFT's directory, and the merged plain weights returned."""
        if self.cfg.method == "full":
            return state
        with torch.random.fork_rng(devices=[]):  # LoRA's initialisation, overwritten at once, must not move the RNG
            frame = wrap_lora(empty_model(self.cfg.model, self.layout), self.cfg, self.layout)
        frame.load_state_dict(state, strict=True)
        if adapter_applies(self.cfg.model.init_from, self.layout):
            frame.peft_config["default"].base_model_name_or_path = str(Path(self.cfg.model.init_from).resolve())
            frame.save_pretrained(str(directory / ADAPTER_DIR))
        merged = frame.merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    def export(self, out: Path) -> None:
        super().export(out)
        if self.world.main and self.cfg.method == "lora":
            adapter = out / "export" / ADAPTER_DIR
            if adapter.exists():
                shutil.rmtree(adapter)
            newest = complete_checkpoints(out / "checkpoints")[-1]  # the one just written
            if (newest / ADAPTER_DIR).is_dir():
                shutil.copytree(newest / ADAPTER_DIR, adapter)
        self.world.barrier()


def adapter_applies(base: str | Path, layout: TokenLayout) -> bool:
    """Whether PEFT can apply an adapter to ``base`` as it is on disk: it has the layout's number of rows."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, local_files_only=True).vocab_size == layout.vocab_size
