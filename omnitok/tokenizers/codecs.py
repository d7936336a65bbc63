"""The audio codecs omnitok tokenizes with, each a small adapter over a ``transformers`` model class.

An adapter says what the token layout and the streaming windows need to know (sample rate, channels, samples per
frame, the codebooks' sizes, whether the model is causal, EnCodec 48 kHz's independent chunks) and makes the two
calls omnitok uses on a batch: ``encode((B, channels, samples)) -> (B, n_q, frames)`` with ``frames = ceil(samples /
hop)``, and ``decode((B, n_q, frames)) -> (B, channels, frames * hop)``. Everything else (reading files, resampling,
windows, batching, the directory form) is the one ``AudioTokenizer``'s.

Codecs (docs/ARCHITECTURE.md, Media tokenizers; the README's audio table):
- ``encodec``: ``EncodecModel``; the number of codebooks is chosen as a bandwidth in kbps.
- ``mimi``: ``MimiModel`` (Moshi's codec: 24 kHz, 12.5 frames/s, a semantic first codebook); the number of
  codebooks (of its 32) is chosen at import, 8 by default as Moshi uses.
- ``dac``: ``DacModel`` (Descript Audio Codec, 16 / 24 / 44.1 kHz); the number of codebooks is chosen, all by default.
- ``wavtokenizer``: ``WavTokenizerModel`` (one codebook, 40 or 75 frames/s at 24 kHz).

Frames. DAC drops a last partial frame, so every codec is given its input zero-padded to whole frames (what DAC's
own preprocessing does); for the others, which pad a partial frame themselves, the padding is the same or changes
only that last frame (see each class).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from omnitok.errors import OmnitokError

# Config keys that are bookkeeping, not the codec (left out of fingerprints).
BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "return_dict",
               "output_attentions", "output_hidden_states", "use_cache", "chunk_size_feed_forward", "id2label",
               "label2id", "problem_type", "tie_word_embeddings", "_attn_implementation_autoset", "use_streaming"}


class Codec:
    """One codec model and the number of codebooks chosen for it."""

    kind: ClassVar[str]  # the type written in omnitok.json and recognised from config.json's model_type
    model_class: ClassVar[str]  # the transformers class
    choice: ClassVar[str | None] = "num_codebooks"  # the setting that picks how many codebooks (None: fixed)

    def __init__(self, model: Any, setting: float | int | None):
        self.model, self.config = model, model.config
        if not 1 <= self.channels <= 2:
            raise OmnitokError(f"{self.kind} model takes {self.channels} audio channels; omnitok reads mono and stereo "
                               "codecs")
        if abs(self.hop * self.frame_rate - self.sample_rate) > 1e-6 * self.sample_rate:
            raise OmnitokError(f"{self.kind} model's frames are not a whole number of samples ({self.sample_rate} Hz "
                               f"at {self.frame_rate:g} frames/s); omnitok's windows need whole frames")
        self.setting = self._resolve(setting)

    # ---------------------------------------------------------------- what the layout and windows need

    @property
    def sample_rate(self) -> int:
        return int(self.config.sampling_rate)

    @property
    def channels(self) -> int:
        return int(getattr(self.config, "audio_channels", 1))

    @property
    def hop(self) -> int:
        return int(self.config.hop_length)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def causal(self) -> bool:
        """A causal model's frames do not see later samples, so windows may be zero-padded to batch together."""
        return False

    @property
    def chunk(self) -> tuple[int, int] | None:
        """``(length, stride)`` in samples when the model encodes independent chunks (EnCodec 48 kHz)."""
        return None

    @property
    def max_codebooks(self) -> int:
        return 1

    @property
    def num_codebooks(self) -> int:
        return int(self.setting) if self.choice == "num_codebooks" else 1

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (int(self.config.codebook_size),) * self.num_codebooks

    def default_setting(self) -> float | int | None:
        return self.max_codebooks if self.choice == "num_codebooks" else None

    def _resolve(self, setting: float | int | None) -> float | int | None:
        if setting is None:
            return self.default_setting()
        if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= self.max_codebooks:
            raise OmnitokError(f"a {self.kind} codec uses 1 to {self.max_codebooks} codebooks, not {setting!r}")
        return setting

    def describe(self) -> dict[str, Any]:
        """What a fingerprint covers besides the weights: the codec's config and the chosen setting."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in BOOKKEEPING}
        return {self.kind: config, self.choice or "codebooks": self.setting}

    # ---------------------------------------------------------------- the model calls

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, -x.shape[-1] % self.hop))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, channels, samples) -> (B, n_q, ceil(samples / hop))."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, frames) -> (B, channels, frames * hop)."""
        raise NotImplementedError


class EncodecCodec(Codec):
    """EnCodec. Causal at 24 kHz (zero padding a window changes nothing but a partial last frame, which EnCodec
    reflect-pads itself); non-causal at 32 kHz; at 48 kHz independent 1 s chunks, each normalised to unit RMS (the
    scale is not kept, so decoded 48 kHz audio has every second at unit RMS)."""

    kind, model_class, choice = "encodec", "EncodecModel", "bandwidth"

    @property
    def causal(self) -> bool:
        return bool(self.config.use_causal_conv)

    @property
    def chunk(self) -> tuple[int, int] | None:
        if self.config.chunk_length is None:
            return None
        return int(self.config.chunk_length), int(self.config.chunk_stride)

    @property
    def num_codebooks(self) -> int:
        return int(self.model.quantizer.get_num_quantizers_for_bandwidth(self.setting))

    def default_setting(self) -> float:
        supported = list(self.config.target_bandwidths)
        default = {24_000: 6.0, 32_000: 2.2, 48_000: 6.0}.get(self.sample_rate)  # 8, 4 and 4 codebooks
        return default if default in supported else supported[0]

    def _resolve(self, setting: float | int | None) -> float:
        if setting is None:
            return self.default_setting()
        bandwidths = list(self.config.target_bandwidths)
        if isinstance(setting, bool) or float(setting) not in bandwidths:
            raise OmnitokError(f"bandwidth {setting} kbps is not one this codec was trained for: {bandwidths}")
        return float(setting)

    def describe(self) -> dict[str, Any]:
        arch = {k: getattr(self.config, k) for k in ENCODEC_ARCHITECTURE_KEYS}  # as fingerprinted since version 1
        arch["upsampling_ratios"], arch["target_bandwidths"] = (list(arch["upsampling_ratios"]),
                                                                list(arch["target_bandwidths"]))
        return {"encodec": arch, "bandwidth": self.setting}

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.chunk is not None else super().pad_to_frames(x)  # chunks pad themselves (exactly)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.model.encode(x, bandwidth=self.setting).audio_codes  # (chunks, B, n_q, F)
        return codes.permute(1, 2, 0, 3).reshape(x.shape[0], codes.shape[2], -1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, n_q, frames = codes.shape
        if self.chunk is None:
            return self.model.decode(codes[None], [None]).audio_values[..., :frames * self.hop]
        per_chunk = math.ceil(self.chunk[0] / self.hop)
        chunks = math.ceil(frames / per_chunk)
        pad = chunks * per_chunk - frames
        padded = torch.nn.functional.pad(codes, (0, pad))
        chunked = padded.reshape(b, n_q, chunks, per_chunk).permute(2, 0, 1, 3)  # (chunks, B, n_q, per_chunk)
        return self.model.decode(chunked, [None] * chunks, last_frame_pad_length=pad).audio_values


# The EncodecConfig fields that define the codec (what a fingerprint covers; saving adds bookkeeping keys).
ENCODEC_ARCHITECTURE_KEYS = (
    "sampling_rate", "audio_channels", "normalize", "chunk_length_s", "overlap", "hidden_size", "num_filters",
    "num_residual_layers", "upsampling_ratios", "norm_type", "kernel_size", "last_kernel_size", "residual_kernel_size",
    "dilation_growth_rate", "use_causal_conv", "pad_mode", "compress", "num_lstm_layers", "trim_right_ratio",
    "codebook_size", "codebook_dim", "use_conv_shortcut", "target_bandwidths")


class MimiCodec(Codec):
    """Mimi: causal convolutions and a causal (sliding-window) transformer, so windows batch with zero padding and
    a partial last frame is padded with zeros as Mimi pads it."""

    kind, model_class = "mimi", "MimiModel"

    @property
    def hop(self) -> int:
        return round(self.sample_rate / float(self.config.frame_rate))

    @property
    def frame_rate(self) -> float:
        return float(self.config.frame_rate)

    @property
    def causal(self) -> bool:
        return bool(self.config.use_causal_conv)

    @property
    def max_codebooks(self) -> int:
        return int(self.config.num_quantizers)

    def default_setting(self) -> int:
        return min(8, self.max_codebooks)  # Moshi models the first 8 of Mimi's 32 codebooks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, num_quantizers=self.setting).audio_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[..., :codes.shape[-1] * self.hop]


class DacCodec(Codec):
    """DAC: non-causal; a partial last frame is dropped by the model, hence the zero padding to whole frames."""

    kind, model_class = "dac", "DacModel"

    @property
    def max_codebooks(self) -> int:
        return int(self.config.n_codebooks)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, n_quantizers=self.setting).audio_codes[:, :self.setting]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(audio_codes=codes).audio_values[:, None, :codes.shape[-1] * self.hop]


class WavTokenizerCodec(Codec):
    """WavTokenizer: one codebook; non-causal."""

    kind, model_class, choice = "wavtokenizer", "WavTokenizerModel", None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).audio_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[..., :codes.shape[-1] * self.hop]


CODECS: dict[str, type[Codec]] = {c.kind: c for c in (EncodecCodec, MimiCodec, DacCodec, WavTokenizerCodec)}
# Audio codecs transformers has that omnitok does not read yet, and why (said when a directory holds one).
NOT_READ = {
    "xcodec2": "X-Codec2's semantic encoder takes Kaldi filterbank features that transformers computes with "
               "torchaudio, which omnitok does not depend on",
    "xcodec": "X-Codec's semantic encoder (HuBERT) is not wired in yet",
}


def model_class(kind: str) -> Any:
    import transformers

    return getattr(transformers, CODECS[kind].model_class)
