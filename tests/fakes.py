"""Tiny media tokenizers that follow the protocols exactly, for testing the templates before the real ones exist.

Both are exact on their own output: ``encode(decode(codes)) == codes``, so a document built from decoded media
round-trips bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from omnitok.tokenizers.protocol import fingerprint, write_part_info


class FakeImageTokenizer:
    """Each ``patch x patch`` block becomes the index of its nearest palette colour."""

    def __init__(self, codebook_size: int = 64, max_grid_side: int = 8, patch: int = 4, seed: int = 0):
        self.codebook_size, self.max_grid_side, self.patch, self.seed = codebook_size, max_grid_side, patch, seed
        self.palette = np.random.default_rng(seed).integers(0, 256, (codebook_size, 3)).astype(np.uint8)

    @property
    def fingerprint(self) -> str:
        return fingerprint({"type": "fake", "patch": self.patch}, blobs=[self.palette.tobytes()])

    def encode(self, images):
        out = []
        for img in images:
            img = np.asarray(img, dtype=np.float32)
            rows, cols = img.shape[0] // self.patch, img.shape[1] // self.patch
            blocks = img[: rows * self.patch, : cols * self.patch].reshape(rows, self.patch, cols, self.patch, 3)
            mean = blocks.mean(axis=(1, 3))  # (rows, cols, 3)
            dist = ((mean[:, :, None, :] - self.palette[None, None].astype(np.float32)) ** 2).sum(-1)
            out.append(dist.argmin(-1))
        return out

    def decode(self, codes):
        return [np.repeat(np.repeat(self.palette[c], self.patch, 0), self.patch, 1) for c in codes]

    def save(self, directory):
        write_part_info(directory, "image", "fake")
        cfg = {"codebook_size": self.codebook_size, "max_grid_side": self.max_grid_side, "patch": self.patch,
               "seed": self.seed}
        (Path(directory) / "config.json").write_text(json.dumps(cfg))

    @classmethod
    def from_dir(cls, directory):
        return cls(**json.loads((Path(directory) / "config.json").read_text()))


class FakeAudioTokenizer:
    """Each frame of ``hop`` samples is one level in [-0.5, 0.5); codebook q holds base-``codebook_size`` digit q."""

    def __init__(self, codebook_size: int = 16, num_codebooks: int = 3, hop: int = 8, sample_rate: int = 800):
        self.codebook_size, self.num_codebooks, self.hop, self.sample_rate = codebook_size, num_codebooks, hop, \
            sample_rate

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.num_codebooks

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def fingerprint(self) -> str:
        return fingerprint({"type": "fake", "k": self.codebook_size, "q": self.num_codebooks, "hop": self.hop})

    def encode(self, audio):
        out = []
        levels = self.codebook_size ** self.num_codebooks
        for wave, sr in audio:
            assert sr == self.sample_rate
            wave = np.asarray(wave, dtype=np.float64).reshape(-1)
            frames = wave[: len(wave) // self.hop * self.hop].reshape(-1, self.hop).mean(1)
            level = np.clip(np.round((frames + 0.5) * levels), 0, levels - 1).astype(np.int64)
            digits = [(level // self.codebook_size ** (self.num_codebooks - 1 - q)) % self.codebook_size
                      for q in range(self.num_codebooks)]
            out.append(np.stack(digits))  # (n_q, frames)
        return out

    def decode(self, codes):
        levels = self.codebook_size ** self.num_codebooks
        out = []
        for c in codes:
            level = sum(c[q].astype(np.int64) * self.codebook_size ** (self.num_codebooks - 1 - q)
                        for q in range(self.num_codebooks))
            out.append(np.repeat(level / levels - 0.5, self.hop).astype(np.float32)[None])  # (1, samples)
        return out

    def save(self, directory):
        write_part_info(directory, "audio", "fake")
        cfg = {"codebook_size": self.codebook_size, "num_codebooks": self.num_codebooks, "hop": self.hop,
               "sample_rate": self.sample_rate}
        (Path(directory) / "config.json").write_text(json.dumps(cfg))

    @classmethod
    def from_dir(cls, directory):
        return cls(**json.loads((Path(directory) / "config.json").read_text()))
