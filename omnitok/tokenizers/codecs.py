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
- ``xcodec``: ``XcodecModel`` (16 kHz, 50 frames/s, 1-8 codebooks of 1024 chosen as a bandwidth).
- ``xcodec2``: ``Xcodec2Model`` (one 65,536-code scalar quantizer, 50 frames/s at 16 kHz, a semantic branch fed
  with Kaldi filterbank features computed here: ``kaldi_fbank.py``).

Frames. DAC drops a last partial frame, so every codec is given its input zero-padded to whole frames (what DAC's
own preprocessing does); for the others, which pad a partial frame themselves, the padding is the same or changes
only that last frame (see each class). X-Codec2 is the exception: it pads as its feature extractor does, from the
clip's own length.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.kaldi_fbank import fbank

# Config keys that are bookkeeping, not the codec (left out of fingerprints).
BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "return_dict",
               "output_attentions", "output_hidden_states", "use_cache", "chunk_size_feed_forward", "id2label",
               "label2id", "problem_type", "tie_word_embeddings", "_attn_implementation_autoset", "use_streaming"}


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without its bookkeeping keys, sub-configs included (saving fills some of them in)."""
    return {k: _architecture(v) if isinstance(v, dict) else v for k, v in config.items() if k not in BOOKKEEPING}


def streamed_moments(blocks: Iterator[np.ndarray], head: int, tail: Callable[[int], int], kernel: int, stride: int,
                     features: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, sum and sum of squares, per feature, of ``features`` over every ``kernel``-sample frame (``stride``
    apart) of a mono clip given as blocks, with ``head`` zeros before it and ``tail(samples)`` zeros after: a
    whole-clip statistic in the memory of a block. ``features`` maps a run of whole frames to ``(frames, dims)``."""
    count, sums, squares = 0, 0.0, 0.0

    def take(wave: torch.Tensor) -> torch.Tensor:
        nonlocal count, sums, squares
        usable = (wave.shape[0] - kernel) // stride + 1 if wave.shape[0] >= kernel else 0
        if usable:
            f = features(wave[:(usable - 1) * stride + kernel]).double()
            count, sums, squares = count + len(f), sums + f.sum(0), squares + f.pow(2).sum(0)
        return wave[usable * stride:]

    pending, total = torch.zeros(head), 0  # pending: the samples from the next frame's start on
    for block in blocks:
        total += block.shape[1]
        pending = take(torch.cat([pending, torch.from_numpy(block[0])]))
    take(torch.cat([pending, torch.zeros(tail(total))]))
    return count, sums, squares


class Codec(ABC):
    """One codec model and the number of codebooks chosen for it; each codec implements the two model calls."""

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
        return {self.kind: _architecture(self.config.to_dict()), self.choice or "codebooks": self.setting}

    # ---------------------------------------------------------------- the model calls

    def batch_key(self, samples: int, bucket: int) -> int:
        """Windows with the same key are encoded in one batch, zero-padded to the longest (then to whole frames):
        a causal model's whole frames do not see the zeros after them, so lengths within a ``bucket`` batch; a
        non-causal model's frames do, so only windows of as many frames batch, each encoded exactly as alone."""
        return math.ceil(samples / bucket) if self.causal else math.ceil(samples / self.hop)

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, -x.shape[-1] % self.hop))

    @abstractmethod
    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        """(B, channels, samples) -> (B, n_q, ceil(samples / hop)); ``clips``: each row's ``clip_statistics`` when
        it is one window of a longer clip (None otherwise)."""

    def clip_statistics(self, blocks: Iterator[np.ndarray]) -> Any:
        """What encoding a window needs to know about its whole clip (read from ``blocks``, the clip at the model
        rate): nothing, but for a codec that normalises over the clip (X-Codec, X-Codec2). Not called for a clip of
        one window."""
        return None

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, frames) -> (B, channels, frames * hop)."""


class BandwidthCodec(Codec):
    """A codec whose number of codebooks is chosen as a bandwidth in kbps, one of ``config.target_bandwidths``."""

    choice = "bandwidth"

    @property
    def num_codebooks(self) -> int:
        return int(self.model.quantizer.get_num_quantizers_for_bandwidth(self.setting))

    def default_setting(self) -> float:
        return float(self.config.target_bandwidths[-1])

    def _resolve(self, setting: float | int | None) -> float:
        if setting is None:
            return self.default_setting()
        bandwidths = list(self.config.target_bandwidths)
        if isinstance(setting, bool) or float(setting) not in bandwidths:
            raise OmnitokError(f"bandwidth {setting} kbps is not one this codec was trained for: {bandwidths}")
        return float(setting)


class EncodecCodec(BandwidthCodec):
    """EnCodec. Causal at 24 kHz (zero padding a window changes nothing but a partial last frame, which EnCodec
    reflect-pads itself); non-causal at 32 kHz; at 48 kHz independent 1 s chunks, each normalised to unit RMS (the
    scale is not kept, so decoded 48 kHz audio has every second at unit RMS)."""

    kind, model_class = "encodec", "EncodecModel"

    @property
    def causal(self) -> bool:
        return bool(self.config.use_causal_conv)

    @property
    def chunk(self) -> tuple[int, int] | None:
        if self.config.chunk_length is None:
            return None
        return int(self.config.chunk_length), int(self.config.chunk_stride)

    def default_setting(self) -> float:
        supported = list(self.config.target_bandwidths)
        default = {24_000: 6.0, 32_000: 2.2, 48_000: 6.0}.get(self.sample_rate)  # 8, 4 and 4 codebooks
        return default if default in supported else supported[0]

    def describe(self) -> dict[str, Any]:
        arch = {k: getattr(self.config, k) for k in ENCODEC_ARCHITECTURE_KEYS}  # as fingerprinted since version 1
        arch["upsampling_ratios"], arch["target_bandwidths"] = (list(arch["upsampling_ratios"]),
                                                                list(arch["target_bandwidths"]))
        return {"encodec": arch, "bandwidth": self.setting}

    def batch_key(self, samples: int, bucket: int) -> int:
        # whole chunks share lengths unpadded; padding would change the normalisation of a last partial chunk
        return samples if self.chunk is not None else super().batch_key(samples, bucket)

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.chunk is not None else super().pad_to_frames(x)  # chunks pad themselves (exactly)

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
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

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        return self.model.encode(x, num_quantizers=self.setting).audio_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[..., :codes.shape[-1] * self.hop]


class DacCodec(Codec):
    """DAC: non-causal; a partial last frame is dropped by the model, hence the zero padding to whole frames."""

    kind, model_class = "dac", "DacModel"

    @property
    def max_codebooks(self) -> int:
        return int(self.config.n_codebooks)

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        return self.model.encode(x, n_quantizers=self.setting).audio_codes[:, :self.setting]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(audio_codes=codes).audio_values[:, None, :codes.shape[-1] * self.hop]


class WavTokenizerCodec(Codec):
    """WavTokenizer: one codebook; non-causal."""

    kind, model_class, choice = "wavtokenizer", "WavTokenizerModel", None

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        return self.model.encode(x).audio_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[..., :codes.shape[-1] * self.hop]


class XcodecCodec(BandwidthCodec):
    """X-Codec: DAC's acoustic encoder beside a HuBERT semantic encoder, one residual quantizer over both (16 kHz,
    50 frames/s, 1024 codes; 0.5-4 kbps = 1-8 codebooks, the largest by default). Non-causal, and HuBERT's group
    norm and attention see the whole input, so the zero padding to whole frames can change every frame a little;
    codes equal the class's ``encode`` on the padded clip. The windows of a long clip take the group norm's
    statistics from the whole clip (``clip_statistics``), as whole-clip encoding would have them."""

    kind, model_class = "xcodec", "XcodecModel"

    @property
    def sample_rate(self) -> int:
        return int(self.config.sample_rate)

    def _group_norm_layer(self) -> Any:
        """HuBERT's first convolution layer when it is followed by a group norm over time (``feat_extract_norm``
        "group", HuBERT base): a statistic of the whole input, which windows of a long clip take from the clip."""
        semantic = self.model.semantic_model
        if getattr(semantic.config, "feat_extract_norm", None) != "group":
            return None
        return semantic.feature_extractor.conv_layers[0]

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        layer = self._group_norm_layer()
        if layer is None or not clips or all(c is None for c in clips):
            return self.model.encode(x, bandwidth=self.setting).audio_codes

        def whole_clip_norm(module, inputs, output):
            out = output.clone()
            for b, stats in enumerate(clips):
                if stats is not None:
                    mean, var = (t.to(output)[:, None] for t in stats)
                    out[b] = (inputs[0][b] - mean) / torch.sqrt(var + module.eps) * module.weight[:, None] \
                        + module.bias[:, None]
            return out

        hook = layer.layer_norm.register_forward_hook(whole_clip_norm)
        try:
            return self.model.encode(x, bandwidth=self.setting).audio_codes
        finally:
            hook.remove()

    def clip_statistics(self, blocks: Iterator[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mean and (biased) variance over time of HuBERT's first convolution on the whole clip, padded as
        ``encode`` pads it (whole frames, then half a hop on each side), streamed."""
        layer = self._group_norm_layer()
        if layer is None:
            return None
        conv, half = layer.conv, self.hop // 2

        def convolved(wave: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return conv(wave[None, None].to(conv.weight))[0].T.cpu()  # (frames, channels)

        count, sums, squares = streamed_moments(blocks, half, lambda total: -total % self.hop + half,
                                                conv.kernel_size[0], conv.stride[0], convolved)
        mean = sums / count
        return mean.float(), (squares / count - mean.pow(2)).clamp(min=0).float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[..., :codes.shape[-1] * self.hop]


class Xcodec2Codec(Codec):
    """X-Codec2: one FSQ quantizer (65,536 codes at 50 frames/s, 16 kHz); non-causal. Its encoder also takes Kaldi
    log-mel features of the clip for its semantic (Wav2Vec2-BERT) branch, made here as ``Xcodec2FeatureExtractor``
    makes them (which needs torchaudio): one sample of zero padding then whole frames, half a hop of zeros on each
    side, ``kaldi_fbank`` of the 16-bit-scaled samples, each mel bin normalised over the clip, pairs of frames
    stacked. Normalising over the clip makes every frame depend on the clip's length, so windows are encoded at
    their own length (batched only with windows of the same length), unpadded, exactly as the extractor and the
    model would encode them; the model gives ``floor(samples / hop) + 1`` frames, of which ``ceil(samples / hop)``
    are kept (the last of a whole-frames clip is the padding sample's)."""

    kind, model_class, choice = "xcodec2", "Xcodec2Model", None
    MEL_BINS, FRAME_LENGTH, FRAME_SHIFT, STACK = 80, 400, 160, 2  # the feature extractor's fixed settings

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (math.prod(self.config.quantization_levels),)

    def batch_key(self, samples: int, bucket: int) -> int:
        return samples

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return x  # encode pads as the feature extractor does

    def _fbank(self, wave: torch.Tensor) -> torch.Tensor:
        return fbank(wave * 2 ** 15, self.sample_rate, self.MEL_BINS, self.FRAME_LENGTH, self.FRAME_SHIFT,
                     low_freq=20.0, high_freq=self.sample_rate // 2)

    def features(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        """(B, 1, samples) padded as the extractor pads -> (B, frames / 2, 2 * 80) log-mel features, each bin
        normalised over the row, or with the whole clip's mean and deviation when the row is one of its windows."""
        half = self.hop // 2
        feats = []
        for b, wave in enumerate(x[:, 0]):
            f = self._fbank(torch.nn.functional.pad(wave, (half, half)))
            stats = clips[b] if clips is not None else None
            mean, std = stats if stats is not None else (f.mean(0), torch.sqrt(f.var(0, unbiased=True) + 1e-7))
            feats.append((f - mean.to(f)) / std.to(f))
        f = torch.stack(feats)  # an even number of frames for any whole-frames input (hop 2 x frame_shift)
        return f.reshape(f.shape[0], -1, self.MEL_BINS * self.STACK)

    def encode(self, x: torch.Tensor, clips: list[Any] | None = None) -> torch.Tensor:
        frames = math.ceil(x.shape[-1] / self.hop)
        x = torch.nn.functional.pad(x, (0, 1))
        x = torch.nn.functional.pad(x, (0, -x.shape[-1] % self.hop))
        return self.model.encode(x, self.features(x, clips)).audio_codes[..., :frames]

    def clip_statistics(self, blocks: Iterator[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each mel bin's mean and deviation over the whole clip padded as the extractor pads it, streamed: what
        its windows are normalised with, so that they see the features whole-clip encoding would."""
        half = self.hop // 2
        # the extractor's padding: half a hop before; one sample, then whole frames, then half a hop after
        count, sums, squares = streamed_moments(blocks, half, lambda total: 1 + (-(total + 1)) % self.hop + half,
                                                self.FRAME_LENGTH, self.FRAME_SHIFT, self._fbank)
        mean = sums / count
        variance = (squares - count * mean.pow(2)) / max(count - 1, 1)
        return mean.float(), torch.sqrt(variance.clamp(min=0) + 1e-7).float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        frames = codes.shape[-1]
        if frames == 1:  # the decoder's group norms need two frames: a lone frame is decoded twice over, then cut
            codes = codes.repeat(1, 1, 2)
        return self.model.decode(codes).audio_values[..., :frames * self.hop]


CODECS: dict[str, type[Codec]] = {c.kind: c for c in (EncodecCodec, MimiCodec, DacCodec, WavTokenizerCodec,
                                                       XcodecCodec, Xcodec2Codec)}


def model_class(kind: str) -> Any:
    import transformers

    return getattr(transformers, CODECS[kind].model_class)
