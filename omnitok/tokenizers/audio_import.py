"""``omnitok audio-tokenizer import`` and new codecs from presets.

Formats:
- ``hf``: a Hugging Face codec directory (``config.json`` + ``model.safetensors``): EnCodec
  (``facebook/encodec_24khz``), Mimi (``kyutai/mimi``), DAC (``descript/dac_44khz``), WavTokenizer, X-Codec or
  X-Codec2 (``HKUSTAudio/xcodec2``), recognised by the config's ``model_type`` and loaded by its ``transformers``
  class (``codecs.py``). Anything else is refused in one line naming what the directory holds.
- ``encodec``: an original Meta checkpoint (``encodec_24khz-d7cc33bc.th``, ``encodec_48khz-7e698e3e.th``): a state
  dict read with ``torch.load(weights_only=True)`` and renamed to transformers' names, following transformers'
  ``convert_encodec_checkpoint_to_pytorch.py`` (``encoder.model.N.conv.conv`` -> ``encoder.layers.N.conv``,
  ``convtr.convtr`` -> ``conv``, ``conv.norm`` -> ``norm``, ``quantizer.vq.layers.N._codebook`` ->
  ``quantizer.layers.N.codebook``; weight norm's ``weight_g``/``weight_v`` -> the parametrization's
  ``original0``/``original1``). The preset (``24khz`` or ``48khz``) names the architecture.

The number of codebooks is chosen here: ``bandwidth`` for EnCodec and X-Codec, ``num_codebooks`` for Mimi and DAC.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object
from omnitok.tokenizers.audio import PRESETS, AudioTokenizer, AudioTokenizerConfig
from omnitok.tokenizers.codecs import CODECS, model_class
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


def codec_kind(src: Path) -> str:
    """The codec a Hugging Face directory holds (its config's ``model_type``), or one line saying it holds none."""
    config = read_json_object(src / "config.json", f"{src} is not a Hugging Face codec directory (no config.json)")
    kind = config.get("model_type")
    if kind in CODECS:
        return kind
    what = f"a {kind!r} model" if kind else "a config without model_type"
    if config.get("architectures"):
        what += f" ({', '.join(map(str, config['architectures']))})"
    raise OmnitokError(f"{src} holds {what}, not an audio codec omnitok reads ({', '.join(CODECS)})")


def import_audio_tokenizer(fmt: str, src: str | Path, out: str | Path | None = None, bandwidth: float | None = None,
                           preset: str | None = None, num_codebooks: int | None = None) -> AudioTokenizer:
    src = Path(src)
    if not src.exists():
        raise OmnitokError(f"{src} does not exist")
    if fmt == "hf":
        kind = codec_kind(src)
        model = from_pretrained(model_class(kind), src)
    elif fmt == "encodec":
        if preset is None:
            raise OmnitokError("--format encodec needs --preset (24khz or 48khz): the checkpoint holds no config")
        model = encodec_model(preset)
        load_weights(model, rename_original(torch_load_state(src)), str(src))
    else:
        raise OmnitokError(f"unknown audio checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=None if bandwidth is None else float(bandwidth),
                                                     num_codebooks=num_codebooks))
    if out is not None:
        tok.save(out)
    return tok
