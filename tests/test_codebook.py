import itertools

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize

from omnitok.tokenizers.codebook import scale_dead_code_threshold

# 64 centres 3 apart: a code that is replaced by a vector of another centre jumps at least ~3
CENTRES = torch.tensor(list(itertools.product([-3.0, 0.0, 3.0], repeat=4))[:64])


def _batch(generator: torch.Generator, centres: torch.Tensor, size: int) -> torch.Tensor:
    picks = torch.randint(len(centres), (size,), generator=generator)
    return (centres[picks] + 0.05 * torch.randn(size, 4, generator=generator))[None]


def _train(vq: VectorQuantize, centres: torch.Tensor, steps: int, share: float | None, size: int = 96,
           seed: int = 0) -> list[int]:
    """Train on batches of ``size`` vectors around ``centres``; per step, how many codes jumped (moved > 1)."""
    g = torch.Generator().manual_seed(seed)
    jumped = []
    for _ in range(steps):
        before = vq.codebook.detach().clone()
        if share is not None:
            scale_dead_code_threshold(vq, share, size)
        vq(_batch(g, centres, size))
        jumped.append(int(((vq.codebook - before).norm(dim=-1) > 1.0).sum()))
    return jumped


def _vq(threshold: float) -> VectorQuantize:
    torch.manual_seed(0)
    return VectorQuantize(dim=4, codebook_size=64, decay=0.99, kmeans_init=True, kmeans_iters=10,
                          threshold_ema_dead_code=threshold, rotation_trick=False).train()


def test_codes_used_about_once_per_batch_are_kept():
    """96 vectors per batch over 64 codes: each code is used 1.5 times per batch. EnCodec's absolute count of 2
    replaces most codes by batch vectors at every step; a share of the uniform count leaves the codebook to its EMA
    updates and replaces only the odd code that k-means left without data."""
    jumped = _train(_vq(0.25), CENTRES, 100, share=0.25)
    assert jumped[0] == 64  # k-means initialisation
    assert sum(jumped[1:]) / 99 < 0.2

    churning = _train(_vq(2.0), CENTRES, 100, share=None)  # the absolute count the share replaces
    assert sum(churning[1:]) / 99 > 10


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_unused_codes_are_replaced_by_vectors_of_the_data(share):
    vq = _vq(share)
    _train(vq, CENTRES, 30, share=share)
    present = CENTRES[:32]  # the data now only covers half the centres: the other codes fall out of use
    _train(vq, present, 250, share=share)
    nearest = torch.cdist(vq.codebook, present).min(dim=1).values
    assert float(nearest.max()) < 2.0  # no code is left at a centre the data left (3 away from the others)


def test_no_replacement_at_share_zero():
    vq = _vq(0.0)
    _train(vq, CENTRES, 30, share=0.0)
    codebook = vq.codebook.detach().clone()
    _train(vq, CENTRES[:32], 100, share=0.0)
    far = torch.cdist(vq.codebook, CENTRES[:32]).min(dim=1).values > 2.0
    assert int(far.sum()) >= 16  # codes of the centres the data left stay where they were
    assert torch.allclose(vq.codebook[far], codebook[far], atol=0.5)
