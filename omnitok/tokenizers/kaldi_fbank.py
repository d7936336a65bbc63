"""Kaldi's log mel filterbank features (``compute-fbank-feats``), in torch.

X-Codec2's semantic encoder (a Wav2Vec2-BERT) takes these features; transformers computes them with
``torchaudio.compliance.kaldi.fbank``, and torchaudio is not something omnitok can depend on (its wheels break with
new torch releases). This is the same algorithm with Kaldi's defaults where X-Codec2 does not set them: frames with
``snip_edges`` (only whole frames), each frame's DC offset removed, pre-emphasis (the first sample against itself),
the Povey window (a Hann window to the power 0.85), zero-padded to a power of two, the power spectrum, triangular
filters evenly spaced on Kaldi's mel scale (``1127 ln(1 + f / 700)``) between ``low_freq`` and ``high_freq``, and the
log of each filter's energy floored at float32 epsilon. ``tests/test_codecs.py`` checks it against
``kaldi-native-fbank`` (Kaldi's own code, compiled).
"""

from __future__ import annotations

import math

import torch


def mel(f: torch.Tensor | float) -> torch.Tensor | float:
    return 1127.0 * (torch.log1p(f / 700.0) if isinstance(f, torch.Tensor) else math.log1p(f / 700.0))


def mel_banks(num_bins: int, fft_size: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """(num_bins, fft_size // 2 + 1) triangular filters over the power spectrum's bins (the Nyquist bin gets none,
    as in Kaldi)."""
    low, high = mel(low_freq), mel(high_freq)
    delta = (high - low) / (num_bins + 1)
    bins = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = low + bins * delta, low + (bins + 1) * delta, low + (bins + 2) * delta
    freqs = mel(torch.arange(fft_size // 2, dtype=torch.float64) * sample_rate / fft_size)[None, :]
    up, down = (freqs - left) / (center - left), (right - freqs) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1)).float()


def fbank(wave: torch.Tensor, sample_rate: float, num_mel_bins: int = 80, frame_length: int = 400,
          frame_shift: int = 160, preemphasis: float = 0.97, low_freq: float = 20.0,
          high_freq: float | None = None) -> torch.Tensor:
    """1-D waveform (Kaldi scale: 16-bit sample values) -> (frames, num_mel_bins) log mel energies."""
    wave = wave.float()
    if wave.shape[-1] < frame_length:
        return wave.new_zeros(0, num_mel_bins)
    frames = wave.unfold(0, frame_length, frame_shift)  # (T, frame_length): whole frames only (snip_edges)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    window = torch.hann_window(frame_length, periodic=False, dtype=torch.float64).pow(0.85).float().to(wave.device)
    fft_size = 1 << (frame_length - 1).bit_length()
    spectrum = torch.fft.rfft(frames * window, n=fft_size).abs().pow(2)  # (T, fft_size // 2 + 1)
    banks = mel_banks(num_mel_bins, fft_size, sample_rate, low_freq,
                      sample_rate / 2 if high_freq is None else high_freq).to(wave.device)
    energies = spectrum @ banks.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()
