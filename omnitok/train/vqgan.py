"""``omnitok image-tokenizer train``: train a VQ-GAN image tokenizer (taming-transformers / LlamaGen recipe).

Losses: L1 + L2 reconstruction, LPIPS perceptual loss (when VGG16 and LPIPS weights are given), the quantizer's
commitment loss with an EMA codebook (k-means initialised, dead codes replaced from the batch, by
vector-quantize-pytorch), and from ``disc_start`` on a PatchGAN discriminator with hinge loss whose generator term
is scaled by the adaptive weight of Esser et al. (gradient-norm ratio at the decoder's last layer).

The output directory is an image tokenizer directory (``config.json``, ``model.safetensors``, ``omnitok.json``,
rewritten at every checkpoint and at the end) with the training record beside it: ``checkpoints/`` (resumable,
kill-safe), ``samples/`` (PNG grids of held-out originals over reconstructions), ``tb/`` (TensorBoard),
``losses.jsonl`` (every step), ``eval.jsonl`` and ``errors.jsonl`` (images that could not be read).

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run
would have, and with the restored RNG state reproduces its losses.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from omnitok.config import build, to_dict
from omnitok.device import autocast, default_device
from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object, write_json_atomic
from omnitok.tokenizers.image import ImageError, ImagePreprocessConfig, load_image, resize, save_tokenizer_dir
from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
from omnitok.train.checkpoint import latest_checkpoint, save_checkpoint
from omnitok.train.lpips import LPIPS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class PerceptualConfig:
    vgg16: str | None = None  # torchvision VGG16 weights file
    lpips: str | None = None  # LPIPS VGG linear heads file
    weight: float = 1.0


@dataclass
class GANConfig:
    weight: float = 0.5
    start: int = 5000  # generator and discriminator losses join from this step on
    lr: float = 1e-4
    layers: int = 3
    channels: int = 64


@dataclass
class VQGANTrainConfig:
    model: VQGANConfig = field(default_factory=VQGANConfig)
    preprocess: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    steps: int = 10000
    batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    flip: bool = True  # random horizontal flips
    holdout: int = 16  # images kept out of training for evaluation
    eval_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preprocess.resize != "crop":
            raise OmnitokError("training batches need equal sizes: preprocess.resize must be 'crop'")
        if self.steps < 1 or self.batch_size < 1 or self.holdout < 1:
            raise OmnitokError("steps, batch_size and holdout must be at least 1")
        self.betas = tuple(self.betas)


# ---------------------------------------------------------------- data


def list_images(sources: list[str | Path]) -> list[tuple[str, str | None]]:
    """Image files under directories, and image members of tar shards: ``(path, member or None)``, sorted."""
    items: list[tuple[str, str | None]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            items += [(str(p), None) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file() and path.suffix == ".tar":
            with tarfile.open(path) as tar:
                items += [(str(path), m.name) for m in tar.getmembers()
                          if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise OmnitokError(f"{source} is neither a directory of images nor a .tar shard")
    if not items:
        raise OmnitokError(f"no images found in {', '.join(map(str, sources))}")
    return sorted(items)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``(index, flip)`` -> ``(index, uint8 (H, W, 3) array or the error message)``."""

    def __init__(self, items: list[tuple[str, str | None]], preprocess: ImagePreprocessConfig, multiple: int):
        self.items, self.preprocess, self.multiple = items, preprocess, multiple

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[int, np.ndarray | str]:
        index, flip = key
        path, member = self.items[index]
        try:
            if member is None:
                source: Any = path
            else:
                with tarfile.open(path) as tar:
                    source = tar.extractfile(member).read()
            array = resize(load_image(source, self.preprocess.max_pixels), self.preprocess, self.multiple)
        except ImageError as e:
            return index, str(e)
        return index, np.ascontiguousarray(array[:, ::-1]) if flip else array


class StepBatches(torch.utils.data.Sampler):
    """Batches for steps ``start+1 .. steps``: epoch permutations seeded by (seed, epoch), flips by (seed, step)."""

    def __init__(self, train: np.ndarray, batch: int, seed: int, start: int, steps: int, flip: bool):
        self.train, self.batch, self.seed, self.start, self.steps, self.flip = train, batch, seed, start, steps, flip

    def batch_for(self, step: int) -> list[tuple[int, bool]]:
        n = len(self.train)
        out = []
        for k in range((step - 1) * self.batch, step * self.batch):
            epoch, pos = divmod(k, n)
            order = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
            out.append(int(self.train[order[pos]]))
        flips = np.random.default_rng([self.seed, 2, step]).random(self.batch) < 0.5
        return [(i, bool(f and self.flip)) for i, f in zip(out, flips)]

    def __iter__(self):
        for step in range(self.start + 1, self.steps + 1):
            yield self.batch_for(step)

    def __len__(self) -> int:
        return self.steps - self.start


def _collate(batch: list[tuple[int, np.ndarray | str]]) -> tuple[torch.Tensor, list[str]]:
    good = [a for _, a in batch if isinstance(a, np.ndarray)]
    errors = [a for _, a in batch if isinstance(a, str)]
    pixels = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).float() / 127.5 - 1.0 if good else None
    return pixels, errors


# ---------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.; the taming-transformers NLayerDiscriminator): a grid of real/fake logits."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.GroupNorm(32 if channels * mult % 32 == 0 else 1, channels * mult), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # DCGAN initialisation, as taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.main(x)


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d nll / d W|| / ||d g_loss / d W|| at the decoder's last layer (Esser et al. 2021, eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model: VQGAN, pixels: torch.Tensor, device: torch.device, batch: int = 16) -> tuple[dict, torch.Tensor]:
    """PSNR / SSIM of reconstructions through the inference path (exact lookup), codebook usage and perplexity."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    was_training = model.training
    model.eval()
    recs, codes = [], []
    for start in range(0, len(pixels), batch):
        x = pixels[start:start + batch].to(device)
        with autocast(device):
            c = model.encode(x)
            recs.append(model.decode(c).float().clamp(-1, 1).cpu())
        codes.append(c.cpu().reshape(-1))
    model.train(was_training)
    rec, codes = torch.cat(recs), torch.cat(codes)
    target, pred = (pixels + 1) / 2, (rec + 1) / 2
    counts = torch.bincount(codes, minlength=model.config.codebook_size).float()
    p = counts[counts > 0] / counts.sum()
    metrics = {
        "psnr": float(peak_signal_noise_ratio(pred, target, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(pred, target, data_range=1.0)),
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
    }
    return metrics, rec


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8) -> np.ndarray:
    """uint8 image: a row of originals over a row of reconstructions, per group of ``columns`` images."""
    n = min(len(originals), columns)
    rows = [originals[:n], reconstructions[:n]]
    tiles = [torch.cat(list(((r + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)), dim=2) for r in rows]  # (3,H,nW)
    grid = torch.cat(tiles, dim=1)  # (3, 2H, nW)
    return grid.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- training


def _lr(cfg: VQGANTrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def train_vqgan(sources: list[str | Path], out: str | Path, cfg: VQGANTrainConfig, resume: bool = False,
                device: torch.device | str | None = None) -> dict:
    """Train (or resume) and return the last evaluation metrics."""
    out = Path(out)
    device = torch.device(device) if device is not None else default_device()
    start, state = 0, None
    if resume:
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise OmnitokError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        saved = build(VQGANTrainConfig, read_json_object(ckpt / "state.json", f"{ckpt} has no state.json")["config"])
        if to_dict(saved) | {"steps": 0} != to_dict(cfg) | {"steps": 0}:
            raise OmnitokError(f"--resume: the config differs from the one {ckpt} was trained with (only 'steps' "
                               "may change)")
        state = torch.load(ckpt / "training.pt", map_location="cpu", weights_only=True)
        start = state["step"]
    elif (out / "checkpoints").exists():
        raise OmnitokError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")

    torch.manual_seed(cfg.seed)
    items = list_images(sources)
    if len(items) <= cfg.holdout:
        raise OmnitokError(f"{len(items)} images are too few: {cfg.holdout} are held out for evaluation")
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(items))
    holdout_idx, train_idx = order[:cfg.holdout], order[cfg.holdout:]
    dataset = ImageFiles(items, cfg.preprocess, cfg.model.downsample)
    held = [dataset[(int(i), False)][1] for i in holdout_idx]
    held_pixels = _collate([(0, a) for a in held])[0]
    if held_pixels is None:
        raise OmnitokError("none of the held-out images could be read")

    model = VQGAN(cfg.model).to(device).train()
    disc = PatchDiscriminator(cfg.gan.layers, cfg.gan.channels).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.gan.lr, betas=cfg.betas, weight_decay=0.0)
    lpips = None
    if cfg.perceptual.vgg16 and cfg.perceptual.lpips:
        lpips = LPIPS.from_files(cfg.perceptual.vgg16, cfg.perceptual.lpips).to(device)
    elif cfg.perceptual.weight > 0:
        tqdm.write("no perceptual.vgg16 / perceptual.lpips weights given: training without the perceptual loss")
    if state is not None:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        disc.load_state_dict(load_file(str(ckpt / "discriminator.safetensors")))
        opt.load_state_dict(state["opt"])
        disc_opt.load_state_dict(state["disc_opt"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(train_idx, cfg.batch_size, cfg.seed, start, cfg.steps, cfg.flip),
        collate_fn=_collate, num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed))  # its own generator: the global RNG stream stays resumable
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    out.mkdir(parents=True, exist_ok=True)
    losses_file = open(out / "losses.jsonl", "a")  # noqa: SIM115 (closed in finally)
    errors_file = open(out / "errors.jsonl", "a")  # noqa: SIM115
    skipped = state["skipped"] if state else 0
    metrics: dict = {}

    def checkpoint(step: int) -> None:
        def write(d: Path) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
            save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(d / "discriminator.safetensors"))
            rng = {"rng": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state()
            torch.save({"step": step, "skipped": skipped, "opt": opt.state_dict(), "disc_opt": disc_opt.state_dict(),
                        **rng}, d / "training.pt")
            write_json_atomic(d / "state.json", {"step": step, "config": to_dict(cfg)})

        save_checkpoint(out / "checkpoints", step, write, cfg.keep_checkpoints)
        save_tokenizer_dir(model, cfg.preprocess, out)

    def run_eval(step: int) -> dict:
        m, rec = evaluate(model, held_pixels, device)
        grid = comparison_grid(held_pixels, rec)
        (out / "samples").mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(grid).save(out / "samples" / f"step_{step:08d}.png")
        writer.add_image("eval/originals_over_reconstructions", grid, step, dataformats="HWC")
        for k, v in m.items():
            writer.add_scalar(f"eval/{k}", v, step)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        return m

    try:
        if start == 0:
            metrics = run_eval(0)
        progress = tqdm(loader, total=cfg.steps - start, initial=0, desc="vqgan", unit="step")
        for step, (pixels, errors) in enumerate(progress, start=start + 1):
            for e in errors:
                errors_file.write(json.dumps({"step": step, "error": e}) + "\n")
            if pixels is None:
                skipped += 1
                continue
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            x = pixels.to(device)
            gan_on = step > cfg.gan.start and cfg.gan.weight > 0
            with autocast(device):
                rec, codes, vq_loss = model(x)
                l1 = (x - rec).abs().mean()
                l2 = ((x - rec) ** 2).mean()
                nll = cfg.l1_weight * l1 + cfg.l2_weight * l2
                perceptual = lpips(x, rec).mean() if lpips is not None else torch.zeros((), device=device)
                nll = nll + cfg.perceptual.weight * perceptual
                if gan_on:
                    g_loss = -disc(rec).mean()
                    g_weight = adaptive_gan_weight(nll, g_loss, model.last_layer) * cfg.gan.weight
                else:
                    g_loss, g_weight = torch.zeros((), device=device), torch.zeros((), device=device)
                loss = nll + g_weight * g_loss + vq_loss
            if not torch.isfinite(loss):
                skipped += 1
                tqdm.write(f"step {step}: non-finite loss, step skipped ({skipped} so far)")
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            d_loss = torch.zeros(())
            if gan_on:
                with autocast(device):
                    d_loss = (F.relu(1.0 - disc(x)).mean() + F.relu(1.0 + disc(rec.detach())).mean()) / 2
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            record = {"step": step, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(),
                      "perceptual": perceptual.item(), "vq": vq_loss.item(), "g": g_loss.item(),
                      "g_weight": float(g_weight), "d": d_loss.item(), "grad_norm": grad_norm.item(),
                      "codes_in_batch": int(codes.unique().numel())}
            losses_file.write(json.dumps(record) + "\n")
            for k in ("loss", "l1", "l2", "perceptual", "vq", "g", "d", "grad_norm", "codes_in_batch"):
                writer.add_scalar(f"train/{k}", record[k], step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{metrics.get('psnr', math.nan):.2f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = run_eval(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
    finally:
        losses_file.close()
        errors_file.close()
        writer.close()
    return metrics


def load_train_config(path: str | Path | None, overrides: list[str]) -> VQGANTrainConfig:
    from omnitok.config import apply_overrides, load_config_file

    return build(VQGANTrainConfig, apply_overrides(load_config_file(path), overrides))
