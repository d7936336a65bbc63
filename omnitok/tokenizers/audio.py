"""The audio tokenizer: one class over every codec omnitok reads (``codecs.py``: EnCodec, Mimi, DAC, WavTokenizer,
X-Codec, X-Codec2, through their ``transformers`` model classes), with the number of codebooks fixed at creation.

``encode`` takes ``(waveform, sample_rate)`` pairs, paths or file bytes (anything libsndfile reads: wav, flac, ogg,
mp3 where the build has it), mixes channels to what the model takes, resamples with soxr, and returns one
``(n_q, frames)`` int64 array per item, ``frames = ceil(samples / hop)``. ``decode`` returns float32
``(channels, frames * hop)`` at ``sample_rate``.

Windows. Audio is streamed at the model rate and encoded in windows, so a one-hour file never sits in memory:
- one encoder pass over the whole signal (every codec but EnCodec 48 kHz): window ``i`` covers
  ``[i*C - K, (i+1)*C + K)`` samples (``C = chunk_s``, ``K = context_s``) and only the frames of ``[i*C, (i+1)*C)``
  are kept, so every kept frame sees ``K`` of context on both sides. Clips up to ``C + 2K`` are one window: exactly
  the whole-clip encoding. A codec that normalises over its whole input (X-Codec, X-Codec2) gives the windows of a
  longer clip the clip's statistics (``Codec.clip_statistics``, a first streamed pass over the item).
- EnCodec 48 kHz (the model encodes independent 1 s chunks with 1 % overlap): a window is a run of whole model
  chunks, which is exact. The model normalises each chunk to unit RMS, as trained, so codes equal
  ``EncodecModel.encode``; it would need each chunk's scale (a float) to restore the loudness, and a token sequence
  has no place for one, so decoded 48 kHz audio has every second at unit RMS (loudness across seconds is lost).
Batching. Every window is zero-padded to whole frames (a partial last frame is the only one this changes). A causal
codec's windows (EnCodec 24 kHz, Mimi) then batch with those in the same ``bucket_s`` of length, zero-padded to the
longest: zeros after a causal model's whole frames change none of them. A non-causal codec's frames see what follows,
so its windows batch only with windows of as many frames: each is encoded exactly as alone (X-Codec2: only with
windows of the same length; ``Codec.batch_key``).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

from omnitok.device import default_device, media_batch_size
from omnitok.errors import OmnitokError
from omnitok.tokenizers.codecs import CODECS, model_class
from omnitok.tokenizers.protocol import fingerprint, read_part_info, write_part_info
from omnitok.weights import from_pretrained

# Published EnCodec configurations, as transformers' EncodecConfig arguments.
PRESETS: dict[str, dict[str, Any]] = {
    # facebook/encodec_24khz: mono, causal, 75 Hz frames, 1024 codes; 1.5/3/6/12/24 kbps -> 2/4/8/16/32 codebooks
    "24khz": dict(sampling_rate=24_000, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0]),
    # facebook/encodec_32khz (MusicGen, AnyGPT music): mono, non-causal, 50 Hz frames, 4 codebooks of 2048
    "32khz": dict(sampling_rate=32_000, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, codebook_dim=128,
                  target_bandwidths=[2.2], num_filters=64, use_causal_conv=False, use_conv_shortcut=False),
    # facebook/encodec_48khz: stereo, non-causal, 150 Hz frames in 1 s chunks with 1 % overlap
    "48khz": dict(sampling_rate=48_000, audio_channels=2, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
                  use_causal_conv=False, norm_type="time_group_norm", normalize=True, chunk_length_s=1.0,
                  overlap=0.01),
}
READ_BLOCK_S = 10.0  # seconds read from a file at a time


class AudioError(OmnitokError):
    """One sound could not be used; the message names it and says why."""


def _name(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return f"<{type(source).__name__}>"


@dataclass
class AudioTokenizerConfig:
    bandwidth: float | None = None  # EnCodec, X-Codec: kbps, one the model was trained for (None: the default)
    num_codebooks: int | None = None  # Mimi, DAC: how many of the codebooks (None: the codec's default)
    chunk_s: float = 30.0  # window length for long audio, seconds; memory holds batch_size windows
    context_s: float = 2.0  # context on each side of a window, seconds
    bucket_s: float = 1.0  # a causal codec batches windows within this much of the same length

    def __post_init__(self) -> None:
        if self.chunk_s <= 0 or self.context_s < 0 or self.bucket_s <= 0:
            raise OmnitokError("chunk_s and bucket_s must be positive and context_s non-negative")


@dataclass
class _Window:
    item: int
    audio: np.ndarray  # (channels, samples) at the model rate, unpadded
    keep_from: int  # first frame of this window's codes that is kept
    keep: int  # number of frames kept
    last: bool  # the item's last window
    clip: Any = None  # the codec's clip_statistics, for a window of a clip longer than one window


# float samples beyond this (24 dB over full scale) are not audio a codec was trained on: integer PCM stored as float
# without scaling (peaks near 32768) encodes to noise; a float master a little over full scale still passes
MAX_PEAK = 16.0
# below this a sample rate is a broken header, not audio (telephone speech is 8 kHz): a 2000-sample file claiming 1 Hz
# would be resampled to 33 minutes at 24 kHz and encoded
MIN_RATE = 1000


def model_rate_blocks(source: Any, sample_rate: int, channels: int) -> Iterator[np.ndarray]:
    """Stream ``source`` (``(waveform, rate)``, a path or file bytes) as float32 ``(channels, n)`` blocks at
    ``sample_rate``: mono models take the channel mean; stereo models duplicate mono and take the mean of more than
    two channels as both sides. Raises ``AudioError`` naming the source."""
    name = _name(source)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError(f"{name}: audio must be (waveform, sample_rate)")
        wave, rate = source
        wave = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2 or wave.dtype.kind not in "fiu":
            raise AudioError(f"{name}: waveform must be (samples,) or (channels, samples) numbers, got "
                             f"{wave.shape} {wave.dtype}")
        if not isinstance(rate, int | np.integer) or rate <= 0:
            raise AudioError(f"{name}: sample rate must be a positive integer, got {rate!r}")
        if wave.dtype.kind in "iu":
            wave = wave / float(np.iinfo(wave.dtype).max)
        blocks: Iterator[np.ndarray] = iter([wave.astype(np.float32).T])  # (n, channels)
    else:
        rate, blocks = _file_blocks(source)
    if rate < MIN_RATE:
        raise AudioError(f"{name}: a sample rate of {rate} Hz is not sound a codec can take (below {MIN_RATE} Hz)")
    stream = soxr.ResampleStream(rate, sample_rate, channels, dtype="float32", quality="HQ") \
        if rate != sample_rate else None
    any_samples = False
    pending = next(blocks, None)
    while pending is not None:
        block, pending = pending, next(blocks, None)
        peak = float(np.abs(block).max()) if block.size else 0.0
        if not np.isfinite(peak):
            raise AudioError(f"{name}: holds NaN or infinite samples")
        if peak > MAX_PEAK:
            raise AudioError(f"{name}: samples reach {peak:.3g}; float audio lies within about [-1, 1] (integer PCM "
                             "stored as float without scaling?)")
        mixed = _mix(block, channels)  # (n, model channels)
        out = stream.resample_chunk(mixed, last=pending is None) if stream is not None else mixed
        if len(out):
            any_samples = True
            yield np.ascontiguousarray(out.T)
    if not any_samples:
        raise AudioError(f"{name}: holds no samples")

def _file_blocks(source: Any) -> tuple[int, Iterator[np.ndarray]]:
    name = _name(source)
    try:
        if isinstance(source, bytes | bytearray):
            if not source:
                raise AudioError(f"{name}: empty file")
            f = sf.SoundFile(io.BytesIO(source))
        else:
            if not Path(source).is_file():  # said as a missing image is
                why = "Is a directory" if Path(source).is_dir() else "No such file or directory"
                raise AudioError(f"{name}: cannot open ({why})")
            if Path(source).stat().st_size == 0:
                raise AudioError(f"{name}: empty file (0 bytes)")
            f = sf.SoundFile(str(source))
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{name}: not a sound file libsndfile can read ({e})") from None
    rate = f.samplerate

    def blocks() -> Iterator[np.ndarray]:
        with f:
            try:
                size = max(1, int(READ_BLOCK_S * rate))
                yield from f.blocks(blocksize=size, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioError(f"{name}: unreadable audio data ({e})") from None

    return rate, blocks()

def _mix(block: np.ndarray, channels: int) -> np.ndarray:
    """(n, channels) -> (n, model channels)."""
    if block.shape[1] == channels:
        return block
    mono = block.mean(axis=1, keepdims=True)
    return np.repeat(mono, channels, axis=1) if channels == 2 else mono



def _fill(blocks: Iterator[np.ndarray], buffer: np.ndarray, samples: int, done: bool) -> tuple[np.ndarray, bool]:
    """Append blocks until ``buffer`` holds ``samples`` (or the stream ends); returns it and whether it ended."""
    while not done and buffer.shape[1] < samples:
        block = next(blocks, None)
        if block is None:
            done = True
        else:
            buffer = np.concatenate([buffer, block], axis=1)
    return buffer, done


def load_audio(source: Any, sample_rate: int, channels: int) -> np.ndarray:
    """A whole sound as float32 ``(channels, samples)`` at ``sample_rate`` (for short clips; long ones stream)."""
    return np.concatenate(list(model_rate_blocks(source, sample_rate, channels)), axis=1)


class AudioTokenizer:
    """Waveforms <-> codec codes ``(n_q, frames)``; the codec is an adapter from ``codecs.py`` over the model
    (whichever ``model.config.model_type`` names). See the module docstring for windows and padding."""

    def __init__(self, model: Any, config: AudioTokenizerConfig, device: torch.device | str | None = None,
                 batch_size: int | None = None):
        kind = getattr(model.config, "model_type", None)
        if kind not in CODECS:
            raise OmnitokError(f"a {type(model).__name__} is not an audio codec omnitok reads ({', '.join(CODECS)})")
        choice = CODECS[kind].choice
        for name in ("bandwidth", "num_codebooks"):
            if name != choice and getattr(config, name) is not None:
                raise OmnitokError(f"a {kind} codec has one codebook; it takes no {name}" if choice is None else
                                   f"a {kind} codec's codebooks are chosen by {choice}, not by {name}")
        self.codec = CODECS[kind](model, getattr(config, choice) if choice else None)
        self.config = dataclasses.replace(config, **({choice: self.codec.setting} if choice else {}))
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size or media_batch_size(self.device, gpu=8)
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------- sizes

    @property
    def kind(self) -> str:
        return self.codec.kind

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def channels(self) -> int:
        return self.codec.channels

    @property
    def hop(self) -> int:
        return self.codec.hop

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.codec.codebook_sizes

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.codec.describe(), self.model.state_dict())
        return self._fingerprint

    # ---------------------------------------------------------------- reading

    def _model_rate_blocks(self, source: Any) -> Iterator[np.ndarray]:
        return model_rate_blocks(source, self.sample_rate, self.channels)

    def _windows(self, item: int, source: Any) -> Iterator[_Window]:
        """Cut the model-rate stream of one item into windows (see the module docstring)."""
        if self.codec.chunk is not None:
            yield from self._chunk_windows(item, source)
            return
        hop = self.hop
        chunk = max(hop, round(self.config.chunk_s * self.sample_rate / hop) * hop)
        context = round(self.config.context_s * self.sample_rate / hop) * hop
        buffer, buffer_start, done, i = np.zeros((self.channels, 0), np.float32), 0, False, 0
        blocks = self._model_rate_blocks(source)
        while True:
            start = i * chunk
            need_end = start + chunk + context if i else chunk + 2 * context  # first window: whole clip if short
            buffer, done = _fill(blocks, buffer, need_end + 1 - buffer_start, done)
            total = buffer_start + buffer.shape[1]  # samples seen so far (all of them once done)
            if i == 0 and done and total <= chunk + 2 * context:
                yield _Window(item, buffer, 0, math.ceil(total / hop), True)
                return
            w0 = max(0, start - context)
            w1 = min(total, start + chunk + context)
            last = done and start + chunk >= total
            keep = math.ceil((min(start + chunk, total) - start) / hop)
            yield _Window(item, buffer[:, w0 - buffer_start:w1 - buffer_start], (start - w0) // hop, keep, last)
            if last:
                return
            i += 1
            drop = max(0, (i * chunk - context) - buffer_start)  # keep only what later windows need
            buffer, buffer_start = buffer[:, drop:], buffer_start + drop

    def _chunk_windows(self, item: int, source: Any) -> Iterator[_Window]:
        """48 kHz: windows of whole model chunks (the model's chunks are independent, so this is exact)."""
        length, stride = self.codec.chunk
        per_window = max(1, round(self.config.chunk_s * self.sample_rate / stride))
        frames_per_chunk = math.ceil(length / self.hop)
        buffer, buffer_start, done, i = np.zeros((self.channels, 0), np.float32), 0, False, 0
        blocks = self._model_rate_blocks(source)
        while True:
            w0 = i * per_window * stride
            w1 = w0 + (per_window - 1) * stride + length
            buffer, done = _fill(blocks, buffer, w1 + 1 - buffer_start, done)
            total = buffer_start + buffer.shape[1]
            audio = buffer[:, w0 - buffer_start:min(w1, total) - buffer_start]
            chunks = max(1, math.ceil((audio.shape[1] - length) / stride) + 1) if audio.shape[1] > length else 1
            last = done and w1 >= total
            tail = (audio.shape[1] - (chunks - 1) * stride) if last else length
            keep = (chunks - 1) * frames_per_chunk + math.ceil(tail / self.hop) if last \
                else per_window * frames_per_chunk
            yield _Window(item, audio, 0, keep, last)
            if last:
                return
            i += 1
            drop = i * per_window * stride - buffer_start
            buffer, buffer_start = buffer[:, drop:], buffer_start + drop

    # ---------------------------------------------------------------- encoding

    @torch.inference_mode()
    def encode(self, audio: list[Any]) -> list[np.ndarray]:
        """Batch of sounds -> list of int64 ``(n_q, frames)`` codes."""
        pieces: dict[int, list[np.ndarray]] = defaultdict(list)
        pending: list[_Window] = []
        bucket = max(self.hop, round(self.config.bucket_s * self.sample_rate / self.hop) * self.hop)
        for item, source in enumerate(audio):
            clip = None
            for n, window in enumerate(self._windows(item, source)):
                if n == 0 and not window.last:  # a clip of several windows
                    clip = self.codec.clip_statistics(self._model_rate_blocks(source))
                window.clip = clip
                pending.append(window)
                if len(pending) >= self.batch_size:
                    self._run(pending, pieces, bucket)
                    pending = []
        if pending:
            self._run(pending, pieces, bucket)
        out = []
        for item in range(len(audio)):
            codes = np.concatenate(pieces[item], axis=1)
            if codes.shape[1] == 0:
                raise AudioError(f"{_name(audio[item])}: too short to give one frame of codes")
            out.append(codes)
        return out

    def _run(self, windows: list[_Window], pieces: dict[int, list[np.ndarray]], bucket: int) -> None:
        """Encode windows, batching those the codec allows to batch (``Codec.batch_key``); append each window's
        kept frames."""
        groups: dict[int, list[_Window]] = defaultdict(list)
        for w in windows:
            groups[self.codec.batch_key(w.audio.shape[1], bucket)].append(w)
        results: dict[int, np.ndarray] = {}
        for group in groups.values():
            longest = max(w.audio.shape[1] for w in group)
            batch = np.zeros((len(group), self.channels, longest), np.float32)
            for b, w in enumerate(group):
                batch[b, :, :w.audio.shape[1]] = w.audio
            x = self.codec.pad_to_frames(torch.from_numpy(batch).to(self.device))
            codes = self.codec.encode(x, [w.clip for w in group]).cpu().numpy()  # (B, n_q, T)
            for b, w in enumerate(group):
                results[id(w)] = codes[b, :, w.keep_from:w.keep_from + w.keep]
        for w in windows:  # in stream order, so an item's pieces concatenate in time order
            pieces[w.item].append(results[id(w)].astype(np.int64))

    # ---------------------------------------------------------------- decoding

    @torch.inference_mode()
    def decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Codes ``(n_q, frames)`` -> float32 ``(channels, frames * hop)`` waveforms at ``sample_rate``."""
        grids = [np.asarray(c) for c in codes]
        sizes = np.asarray(self.codebook_sizes)[:, None]
        for g in grids:
            if g.ndim != 2 or g.shape[0] != self.num_codebooks or g.shape[1] == 0:
                raise OmnitokError(f"audio codes must have shape ({self.num_codebooks}, frames>0), got {g.shape}")
            if g.min() < 0 or (g >= sizes).any():
                raise OmnitokError(f"audio codes must lie in [0, codebook size) for codebook sizes "
                                   f"{list(self.codebook_sizes)}")
        out: list[np.ndarray | None] = [None] * len(grids)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(grids):
            groups[g.shape[1]].append(i)
        for frames, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([grids[i] for i in chunk]).astype(np.int64)).to(self.device)
                for i, wave in zip(chunk, self.codec.decode(batch).float().cpu().numpy()):
                    out[i] = wave
        return out

    # ---------------------------------------------------------------- directory form

    def save(self, directory: str | Path) -> Path:
        return save_tokenizer_dir(self.model, self.config, directory)

    @classmethod
    def from_dir(cls, directory: str | Path, device: torch.device | str | None = None) -> AudioTokenizer:
        directory = Path(directory)
        info = read_part_info(directory, "audio")
        kind = info.get("type")
        if kind not in CODECS:
            raise OmnitokError(f"{directory}: unknown audio tokenizer type {kind!r} (this omnitok reads: "
                               f"{', '.join(CODECS)})")
        settings = {k: info[k] for k in ("bandwidth", "num_codebooks", "chunk_s", "context_s", "bucket_s")
                    if k in info}
        model = from_pretrained(model_class(kind), directory)
        return cls(model, AudioTokenizerConfig(**settings), device=device)


def save_tokenizer_dir(model: Any, config: AudioTokenizerConfig, directory: str | Path) -> Path:
    """Write an audio tokenizer directory (the transformers model's files and omnitok.json), training or not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    chosen = {k: v for k, v in (("bandwidth", config.bandwidth), ("num_codebooks", config.num_codebooks))
              if v is not None}
    write_part_info(directory, "audio", model.config.model_type, **chosen, chunk_s=config.chunk_s,
                    context_s=config.context_s, bucket_s=config.bucket_s)
    return directory
