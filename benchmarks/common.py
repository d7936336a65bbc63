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


def plain_loop_tokens_per_s(model: torch.nn.Module, batches: list, optim, tokens_per_batch: int) -> float:
    """Tokens/s of a plain PyTorch loop (cross-entropy over the batch's labels, torch AdamW on the trainable
    parameters, gradient clipping) over ``batches`` already in memory: the first half warms up, the second is timed,
    as the measured window of an omnitok run."""
    import torch.nn.functional as F

    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)

    def step(batch) -> None:  # the same inputs (packed position ids when documents are isolated) and labels
        logits = model(**batch.model_inputs(torch.device("cpu"))).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, optim.grad_clip)
        opt.step()

    measured = len(batches) // 2
    for batch in batches[:measured]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[measured:]:
        step(batch)
    return (len(batches) - measured) * tokens_per_batch / (time.perf_counter() - start)
