"""What the multimodal tokenizer needs from an image or audio tokenizer, and how a tokenizer is fingerprinted.

A media tokenizer is a small object with batched ``encode``/``decode`` and a few sizes (docs/ARCHITECTURE.md,
Media tokenizers). The multimodal tokenizer only ever talks to it through these protocols, so the VQ-GAN and
EnCodec tokenizers, and the fakes in the tests, plug in the same way.

Every tokenizer directory carries ``omnitok.json`` saying which modality and type it holds; that file is how
``load_part`` picks the one class that can read the directory (one loader, explicit formats).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object
from omnitok.tokenizers.codecs import CODECS

PART_FILE = "omnitok.json"


@runtime_checkable
class ImageCodec(Protocol):
    """Images <-> grids of codes.

    ``encode(images)`` takes a batch of images (paths, bytes, PIL images or uint8 ``(H, W, 3)`` arrays) and returns
    one ``(rows, cols)`` integer array per image, ``rows, cols <= max_grid_side``. ``decode(codes)`` takes such
    arrays and returns uint8 ``(H, W, 3)`` arrays.
    """

    codebook_size: int
    max_grid_side: int

    @property
    def fingerprint(self) -> str: ...

    def encode(self, images: Sequence[Any]) -> list[np.ndarray]: ...

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def save(self, directory: str | Path) -> None: ...


@runtime_checkable
class AudioCodec(Protocol):
    """Waveforms <-> residual codes.

    ``encode(audio)`` takes a batch of ``(waveform, sample_rate)`` pairs (or paths / bytes of audio files) and
    returns one ``(num_codebooks, frames)`` integer array per item, codebook ``q`` in ``[0, codebook_sizes[q])``.
    ``decode(codes)`` returns float32 ``(channels, samples)`` waveforms at ``sample_rate``; ``frame_rate`` is
    frames per second.
    """

    codebook_sizes: tuple[int, ...]
    sample_rate: int
    frame_rate: float

    @property
    def fingerprint(self) -> str: ...

    def encode(self, audio: Sequence[Any]) -> list[np.ndarray]: ...

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def save(self, directory: str | Path) -> None: ...


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
                blobs: Iterable[bytes] = ()) -> str:
    """sha256 over a tokenizer's config (canonical JSON), its weights (name, dtype, shape, bytes) and raw blobs.

    Two tokenizers with the same fingerprint map the same input to the same codes.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors or {}):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for blob in blobs:
        h.update(b"\0blob\0")
        h.update(blob)
    return h.hexdigest()


def write_part_info(directory: str | Path, modality: str, kind: str, **extra: Any) -> None:
    """Write ``omnitok.json``, the note that says what a tokenizer directory holds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"modality": modality, "type": kind, **extra}
    (directory / PART_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_part_info(directory: str | Path, modality: str, kind: str | None = None) -> dict[str, Any]:
    """Read ``omnitok.json`` and check it describes a tokenizer of ``modality`` (and type ``kind`` when given)."""
    info = read_json_object(Path(directory) / PART_FILE,
                            f"{directory} is not an omnitok {modality} tokenizer directory (no {PART_FILE})")
    if info.get("modality") != modality:
        raise OmnitokError(f"{directory} holds a tokenizer for {info.get('modality')!r}, not for {modality!r}")
    if kind is not None and info.get("type") != kind:
        raise OmnitokError(f"{directory} holds a {modality} tokenizer of type {info.get('type')!r}, not {kind!r}")
    return info


def _load_vqgan(directory: Path) -> ImageCodec:
    from omnitok.tokenizers.image import ImageTokenizer  # torch model code; imported only when needed

    return ImageTokenizer.from_dir(directory)


def _load_codec(directory: Path) -> AudioCodec:
    from omnitok.tokenizers.audio import AudioTokenizer

    return AudioTokenizer.from_dir(directory)


# Media tokenizer types by modality: the type named in a directory's omnitok.json -> the function that loads it.
MEDIA_LOADERS: dict[str, dict[str, Callable[[Path], Any]]] = {"image": {"vqgan": _load_vqgan},
                                                              "audio": {kind: _load_codec for kind in CODECS}}


def load_media_part(directory: str | Path, modality: str) -> ImageCodec | AudioCodec:
    """Load the image or audio tokenizer saved in ``directory``."""
    directory = Path(directory)
    info = read_part_info(directory, modality)
    loaders = MEDIA_LOADERS[modality]
    kind = info.get("type")
    if kind not in loaders:
        known = ", ".join(sorted(loaders)) or "none"
        raise OmnitokError(f"{directory}: unknown {modality} tokenizer type {kind!r} (this omnitok reads: {known})")
    return loaders[kind](directory)
