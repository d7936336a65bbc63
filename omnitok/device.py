"""Device and dtype are chosen here and nowhere else (docs/ARCHITECTURE.md, Which module owns what)."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for convolutions and matmuls on GPU; full fp32 on CPU (bf16 is slower there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def media_batch_size(device: torch.device, gpu: int) -> int:
    """Windows or images per forward pass. On CPU one at a time is fastest for long sequences (measured for
    EnCodec: stacking eight 10 s clips costs 2x the compute per second of audio, activations falling out of
    cache); GPUs want batches."""
    return gpu if device.type == "cuda" else 1
