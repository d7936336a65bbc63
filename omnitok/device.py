"""Device and dtype are chosen here and nowhere else (docs/ARCHITECTURE.md, Which module owns what)."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    """What a model runs in for sampling and media coding: bf16 on a GPU (half the bytes each decoding step reads),
    fp32 on a CPU (bf16 matmuls are slower there, and the tests' exactness is measured in fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``model_dtype`` for convolutions and matmuls on GPU; full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=model_dtype(device))
    return contextlib.nullcontext()


def media_batch_size(device: torch.device, gpu: int) -> int:
    """Windows or images per forward pass. On CPU one at a time is fastest for long sequences (measured for
    EnCodec: stacking eight 10 s clips costs 2x the compute per second of audio, activations falling out of
    cache); GPUs want batches."""
    return gpu if device.type == "cuda" else 1
