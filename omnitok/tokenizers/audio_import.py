"""``omnitok audio-tokenizer import`` and new codecs from presets.

Formats:
- ``hf``: a Hugging Face EnCodec directory (``facebook/encodec_24khz``-style: ``config.json`` +
  ``model.safetensors``), loaded by ``transformers.EncodecModel``.
- ``encodec``: an original Meta checkpoint (``encodec_24khz-d7cc33bc.th``, ``encodec_48khz-7e698e3e.th``): a state
  dict read with ``torch.load(weights_only=True)`` and renamed to transformers' names, following transformers'
  ``convert_encodec_checkpoint_to_pytorch.py`` (``encoder.model.N.conv.conv`` -> ``encoder.layers.N.conv``,
  ``convtr.convtr`` -> ``conv``, ``conv.norm`` -> ``norm``, ``quantizer.vq.layers.N._codebook`` ->
  ``quantizer.layers.N.codebook``; weight norm's ``weight_g``/``weight_v`` -> the parametrization's
  ``original0``/``original1``). The preset (``24khz`` or ``48khz``) names the architecture.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.audio import DEFAULT_BANDWIDTH, PRESETS, AudioTokenizer, AudioTokenizerConfig
from omnitok.weights import from_pretrained, load_weights, torch_load_state

FORMATS = ("hf", "encodec")

_ORIGINAL_NAMES = [
    (r"^(encoder|decoder)\.model\.", r"\1.layers."),
    (r"\.convtr\.convtr\.", ".conv."),
    (r"\.conv\.conv\.", ".conv."),
    (r"\.(conv|convtr)\.norm\.", ".norm."),
    (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook."),
    (r"\.weight_g$", ".parametrizations.weight.original0"),
    (r"\.weight_v$", ".parametrizations.weight.original1"),
]


def encodec_model(preset: str, **overrides: Any):
    """A randomly initialised ``EncodecModel`` of a published configuration (``overrides`` change its sizes)."""
    from transformers import EncodecConfig, EncodecModel

    if preset not in PRESETS:
        raise OmnitokError(f"unknown EnCodec preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return EncodecModel(EncodecConfig(**{**PRESETS[preset], **overrides}))


def rename_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in _ORIGINAL_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def import_audio_tokenizer(fmt: str, src: str | Path, out: str | Path | None = None, bandwidth: float | None = None,
                           preset: str | None = None) -> AudioTokenizer:
    from transformers import EncodecModel

    src = Path(src)
    if not src.exists():
        raise OmnitokError(f"{src} does not exist")
    if fmt == "hf":
        if not (src / "config.json").is_file():
            raise OmnitokError(f"{src} is not a Hugging Face EnCodec directory (no config.json)")
        model = from_pretrained(EncodecModel, src)
    elif fmt == "encodec":
        if preset is None:
            raise OmnitokError("--format encodec needs --preset (24khz or 48khz): the checkpoint holds no config")
        model = encodec_model(preset)
        load_weights(model, rename_original(torch_load_state(src)), str(src))
    else:
        raise OmnitokError(f"unknown audio checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if bandwidth is None:
        supported = list(model.config.target_bandwidths)
        default = DEFAULT_BANDWIDTH.get(model.config.sampling_rate)
        bandwidth = default if default in supported else supported[0]
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=float(bandwidth)))
    if out is not None:
        tok.save(out)
    return tok
