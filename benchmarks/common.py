"""What the benchmarks share: best-of timing, real photos, the default device, a quiet stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two samples differ (the shorter one's length when one continues the other)."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else i


@contextlib.contextmanager
def model_passes() -> Iterator[dict]:
    """Counts the sampler's forward passes (prefills, one-token steps, SJD windows) into ``["passes"]`` and the
    seconds spent in them into ``["seconds"]`` (each pass timed to its end on a GPU, which costs nothing: the sampler
    reads its picks right after). The rest of a sampling call's time is the sampler's own work between passes
    (grammar, guidance, filtering, draws), which a GPU waits through."""
    from omnitok.model.decoder import Decoder

    seen = {"passes": 0, "seconds": 0.0}

    def timed_pass(original):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seen["seconds"] += time.perf_counter() - start
            seen["passes"] += 1
            return out
        return run

    with mock.patch.object(Decoder, "forward", timed_pass(Decoder.forward)), \
            mock.patch.object(Decoder, "decode", timed_pass(Decoder.decode)):
        yield seen


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


def weights_bound(model: torch.nn.Module, device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """The memory-bandwidth bound of a decoding pass, which reads every weight once: (the device's copy bandwidth in
    bytes/s, a 256 MiB copy's read plus write, best of ``repeats``; the seconds reading ``model``'s weights takes at
    that bandwidth)."""
    big = torch.ones(256 * 2 ** 20 // 4, dtype=torch.float32, device=device)  # far beyond any cache
    dst = torch.empty_like(big)
    bandwidth = 2 * big.numel() * 4 / timed(lambda: dst.copy_(big), repeats, device)
    return bandwidth, sum(p.numel() * p.element_size() for p in model.parameters()) / bandwidth


def top_kernels(fn: Callable[[], object], device: torch.device, steps: int = 8, top: int = 10) -> list[dict]:
    """Where ``fn``'s time goes on ``device``, by ``torch.profiler`` over ``steps`` calls: the ``top`` GPU kernels
    (on a CPU, operators) by their own time, each with its microseconds and its calls per call of ``fn`` (on a GPU
    the kernels a CUDA graph replays count too)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)

    def own(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=own, reverse=True)[:top]
    return [{"name": e.key[:120], "us": own(e) / steps, "calls": e.count / steps} for e in events if own(e) > 0]


def photos(n: int, size: int) -> list[np.ndarray]:
    """``n`` of scikit-image's sample photos, resized to ``size`` x ``size`` RGB."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    return [np.asarray(Image.fromarray(sources[i % len(sources)]).convert("RGB").resize((size, size)))
            for i in range(n)]


def photo_pairs(folder: Path, n: int) -> Path:
    """``n`` JPEG crops (2/3 of a side, random place) of scikit-image's sample photos with ``.txt`` captions."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    folder.mkdir(parents=True)
    for i in range(n):
        p = sources[i % len(sources)]
        y, x = rng.integers(0, p.shape[0] // 3), rng.integers(0, p.shape[1] // 3)
        Image.fromarray(p[y:y + 2 * p.shape[0] // 3, x:x + 2 * p.shape[1] // 3]).save(folder / f"{i:04d}.jpg",
                                                                                        quality=92)
        (folder / f"{i:04d}.txt").write_text(f"photo {i}")
    return folder


def tokenizer_dir(root: Path, arch: str, size: int = 256, audio: bool = False) -> Path:
    """A tokenizer with random weights: a small text tokenizer, a VQ-GAN (``tiny``, or Janus / LlamaGen widths) at
    ``size`` px, and with ``audio`` a 24 kHz EnCodec at 1.5 kbps. Returns its directory."""
    from omnitok.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
    from omnitok.tokenizers.audio_import import encodec_model
    from omnitok.tokenizers.image import ImagePreprocessConfig, ImageTokenizer
    from omnitok.tokenizers.multimodal import assemble
    from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
    from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, train_text_tokenizer

    torch.manual_seed(0)
    widths = {"janus": dict(base_channels=128, num_res_blocks=2, latent_channels=256),
              "tiny": dict(base_channels=32, num_res_blocks=1, latent_channels=64)}[arch]
    (root / "text.txt").write_text("\n".join(f"photo {i} of a cat, a cup and a rocket; tone {i}" for i in range(2000)))
    train_text_tokenizer([root / "text.txt"], root / "text", TextTokenizerTrainConfig(vocab_size=300))
    ImageTokenizer(VQGAN(VQGANConfig(**widths)), ImagePreprocessConfig(image_size=size), device="cpu").save(
        root / "image")
    if audio:
        codec = encodec_model("24khz").eval()
        for layer in codec.quantizer.layers:  # random EnCodec codebooks are zeros; any spread works for timing
            layer.codebook.embed.normal_(0, 0.1)
        AudioTokenizer(codec, AudioTokenizerConfig(bandwidth=1.5), device="cpu").save(root / "audio")
    assemble(root / "text", root / "tok", image=root / "image", audio=root / "audio" if audio else None)
    return root / "tok"


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


def plain_loop_tokens_per_s(model: torch.nn.Module, batches: list, optim, tokens_per_batch: int,
                            device: torch.device = torch.device("cpu"), bf16: bool = False) -> float:
    """Tokens/s of a plain PyTorch loop (cross-entropy over the batch's labels, torch AdamW on the trainable
    parameters, gradient clipping) over ``batches`` already in memory, on ``device`` (``bf16``: under bf16 autocast,
    PyTorch's mixed precision, where omnitok trains with DeepSpeed's bf16): the first half warms up, the second is
    timed, as the measured window of an omnitok run."""
    import torch.nn.functional as F

    model.to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)

    def step(batch) -> None:  # the same inputs (packed position ids when documents are isolated) and labels
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch.model_inputs(device)).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.to(device).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, optim.grad_clip)
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    measured = len(batches) // 2
    for batch in batches[:measured]:
        step(batch)
    sync()
    start = time.perf_counter()
    for batch in batches[measured:]:
        step(batch)
    sync()
    return (len(batches) - measured) * tokens_per_batch / (time.perf_counter() - start)
