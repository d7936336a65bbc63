"""What the benchmarks share: best-of timing, real photos, the default device, a quiet stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` runs after one warm-up (best-of suppresses noise from other processes)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def photos(n: int, size: int) -> list[np.ndarray]:
    """``n`` of scikit-image's sample photos, resized to ``size`` x ``size`` RGB."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    return [np.asarray(Image.fromarray(sources[i % len(sources)]).convert("RGB").resize((size, size)))
            for i in range(n)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """No progress bars inside a measurement."""
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = stderr
