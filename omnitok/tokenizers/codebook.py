"""Codebook health: how much of a codebook is used (``usage_stats``, what trainers log and evaluation reports), and
dead-code replacement for vector-quantize-pytorch codebooks scaled to the batch (the VQ-GAN and the codec).

vector-quantize-pytorch, like EnCodec, replaces a code by a vector of the batch when the EMA of its uses per batch
falls below an absolute count (EnCodec: 2). That count was set for EnCodec's batches of ~4800 frames and 1024 codes,
where a code is used 4.7 times per batch on average. A CPU batch of 8 half-second clips holds 300 frames for 256
codes (1.2 uses per code), and a VQ-GAN batch of 32 images at 16x16 holds 8192 vectors for 16384 codes (0.5): there a
count of 2 is above every code's use, nearly every code is replaced at every step by a random vector of the current
batch, the codebooks never settle, and the exported codebook is a sample of the last batch.

So the threshold is a share of a uniformly used code's count (vectors per batch / codebook size), set per batch. A
replaced code restarts at the uniform count: it has about 140 steps (EMA decay 0.99, share 0.25) to be used before it
is replaced again, not one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from vector_quantize_pytorch import VectorQuantize


def usage_stats(codes: np.ndarray | torch.Tensor, codebook_size: int) -> dict:
    """Fraction of the codebook used, the perplexity (exp of the entropy) of the code histogram, and the counts."""
    codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    counts = np.bincount(codes.reshape(-1).astype(np.int64), minlength=codebook_size).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "counts": counts}


def scale_dead_code_threshold(vq: VectorQuantize, share: float, vectors: int) -> None:
    """Replace codes of ``vq`` whose EMA use falls below ``share`` of a uniform code's in batches of ``vectors``."""
    codebook = vq._codebook
    uniform = vectors / codebook.codebook_size
    codebook.threshold_ema_dead_code = share * uniform
    codebook.reset_cluster_size = uniform
