"""Trained decoder LMs as plain Hugging Face model directories (``config.json``, ``model.safetensors``) with the
tokenizer directory in ``tokenizer/``: what the end of ``omnitok pretrain`` writes and ``omnitok export`` makes from a
run's newest intact checkpoint. Reads a checkpoint's ``model.safetensors`` and ``run.json`` only; DeepSpeed's pickled
files are never opened here."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from omnitok.config import build
from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object
from omnitok.model.build import ModelConfig, empty_model
from omnitok.tokenizers.layout import LAYOUT_FILE, TokenLayout
from omnitok.train import deepspeed_io
from omnitok.train.checkpoint import pick_checkpoint
from omnitok.weights import load_safetensors


def write_hf_directory(model_cfg: ModelConfig, tokenizer: str | Path, state: dict[str, torch.Tensor],
                       directory: Path) -> None:
    """``state`` (the full fp32 weights) in the architecture ``model_cfg`` names, saved with the tokenizer beside."""
    model = empty_model(model_cfg, TokenLayout.load(Path(tokenizer) / LAYOUT_FILE))
    model.load_state_dict(state, strict=True)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    if (directory / "tokenizer").exists():
        shutil.rmtree(directory / "tokenizer")
    shutil.copytree(tokenizer, directory / "tokenizer")


def export_run(run: str | Path, out: str | Path, adapter: bool = False) -> Path:
    """``omnitok export``: the newest intact checkpoint of a pretraining or fine-tuning run as a Hugging Face
    directory (a LoRA run's adapters merged in), or with ``adapter`` a LoRA run's adapter alone (PEFT's directory,
    with the tokenizer directory beside it)."""
    run, out = Path(run), Path(out)
    ckpt = pick_checkpoint(run / "checkpoints", deepspeed_io.allowed_classes())
    config = read_json_object(ckpt / "run.json", f"{ckpt} has no run.json")["config"]
    if not isinstance(config.get("model"), dict) or not config.get("tokenizer"):
        raise OmnitokError(f"{ckpt} is not a pretraining checkpoint (its run.json names no model and tokenizer)")
    if adapter:
        if config.get("method") != "lora":
            raise OmnitokError(f"{run} is not a LoRA fine-tuning run, so it has no adapter to export")
        if not (ckpt / "adapter").is_dir():
            raise OmnitokError(f"{ckpt} has no adapter: its base model ({config['model'].get('init_from')}) has fewer "
                               "rows than the layout, so an adapter cannot be applied to it; export the merged model")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ckpt / "adapter", out)
        shutil.copytree(config["tokenizer"], out / "tokenizer")
        return out
    if not (ckpt / "model.safetensors").is_file():
        raise OmnitokError(f"{ckpt} has no model.safetensors: it was written by an omnitok from before checkpoints "
                           "carried their full weights, and cannot be exported")
    write_hf_directory(build(ModelConfig, config["model"], "model."), config["tokenizer"],
                       load_safetensors(ckpt / "model.safetensors"), out)
    return out
