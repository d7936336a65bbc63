"""Device and dtype are chosen here and nowhere else (STYLE.md rule 6)."""

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
