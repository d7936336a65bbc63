"""``omnitok image-tokenizer train``: train a VQ-GAN image tokenizer (taming-transformers / LlamaGen recipe).

Losses: L1 + L2 reconstruction, LPIPS perceptual loss (when VGG16 and LPIPS weights are given), the quantizer's
commitment loss with an EMA codebook (k-means initialised, dead codes replaced from the batch, by
vector-quantize-pytorch), and from ``disc_start`` on a PatchGAN discriminator with hinge loss whose generator term
is scaled by the adaptive weight of Esser et al. (gradient-norm ratio at the decoder's last layer).

The output directory is an image tokenizer directory (``config.json``, ``model.safetensors``, ``omnitok.json``,
rewritten at every checkpoint and at the end) with the training record beside it in the harness's run-directory
layout (``omnitok.train.harness``: ``checkpoints/``, ``train.jsonl``, ``eval.jsonl``, ``errors.jsonl`` for images that
could not be read, ``tb/``, ``loss.png``) and ``samples/`` (PNG grids of held-out originals over reconstructions).

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run
would have, and with the restored RNG state reproduces its losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from omnitok import distributed
from omnitok.config import build, to_dict
from omnitok.data.media import ImageFiles, list_images
from omnitok.device import autocast, default_device
from omnitok.errors import OmnitokError
from omnitok.tokenizers.codebook import usage_stats
from omnitok.tokenizers.image import ImagePreprocessConfig, model_input, pixels_to_uint8, save_tokenizer_dir
from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
from omnitok.train import harness
from omnitok.train.harness import ModuleTask, RunSettings
from omnitok.train.lpips import LPIPS


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
class VQGANTrainConfig(RunSettings):
    steps: int = 10000
    model: VQGANConfig = field(default_factory=VQGANConfig)
    preprocess: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    flip: bool = True  # random horizontal flips
    holdout: int = 16  # images kept out of training for evaluation
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.preprocess.resize != "crop":
            raise OmnitokError("training batches need equal sizes: preprocess.resize must be 'crop'")
        self.check_run_settings()
        if self.batch_size < 1 or self.holdout < 1:
            raise OmnitokError("batch_size and holdout must be at least 1")
        self.betas = tuple(self.betas)


# ---------------------------------------------------------------- data


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
    pixels = model_input(np.stack(good)) if good else None
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
    usage = usage_stats(codes, model.config.codebook_size)
    metrics = {
        "psnr": float(peak_signal_noise_ratio(pred, target, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(pred, target, data_range=1.0)),
        "codebook_usage": usage["usage"],
        "perplexity": usage["perplexity"],
    }
    return metrics, rec


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8) -> np.ndarray:
    """uint8 image: a row of originals over a row of reconstructions, per group of ``columns`` images."""
    n = min(len(originals), columns)
    rows = [originals[:n], reconstructions[:n]]
    tiles = [torch.cat(list(pixels_to_uint8(r)), dim=1) for r in rows]  # (H, nW, 3) each
    return torch.cat(tiles, dim=0).numpy()  # (2H, nW, 3)


# ---------------------------------------------------------------- training


class VQGANTask(ModuleTask):
    """The VQ-GAN as a task of the training harness (``omnitok.train.harness``)."""

    shown = ("psnr",)

    def __init__(self, sources: list[str | Path], cfg: VQGANTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        items = list_images(sources)
        if len(items) <= cfg.holdout:
            raise OmnitokError(f"{len(items)} images are too few: {cfg.holdout} are held out for evaluation")
        order = np.random.default_rng([cfg.seed, 0]).permutation(len(items))
        self.holdout_idx, self.train_idx = order[:cfg.holdout], order[cfg.holdout:]
        self.dataset = ImageFiles(items, cfg.preprocess, cfg.model.downsample)
        held = [self.dataset[(int(i), False)][1] for i in self.holdout_idx]
        self.held = _collate([(0, a) for a in held])[0]
        if self.held is None:
            raise OmnitokError("none of the held-out images could be read")
        self.model = VQGAN(cfg.model).to(device).train()
        self.disc = PatchDiscriminator(cfg.gan.layers, cfg.gan.channels).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.gan.lr, betas=cfg.betas, weight_decay=0.0)
        self.lpips = None
        if cfg.perceptual.vgg16 and cfg.perceptual.lpips:
            self.lpips = LPIPS.from_files(cfg.perceptual.vgg16, cfg.perceptual.lpips).to(device)
        elif cfg.perceptual.weight > 0:
            tqdm.write("no perceptual.vgg16 / perceptual.lpips weights given: training without the perceptual loss")

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "discriminator": self.disc}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.opt, "discriminator": self.disc_opt}

    def batches(self, start: int, steps: int):
        cfg = self.cfg
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=StepBatches(self.train_idx, cfg.batch_size, cfg.seed, start, steps, cfg.flip),
            collate_fn=_collate, num_workers=cfg.num_workers, worker_init_fn=harness.ignore_stop_signals,
            generator=torch.Generator().manual_seed(cfg.seed)))  # its own generator: the global RNG stays resumable

    def train_step(self, step: int, pixels: torch.Tensor) -> dict[str, float] | None:
        cfg, device, model, disc = self.cfg, self.device, self.model, self.disc
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = pixels.to(device)
        gan_on = step > cfg.gan.start and cfg.gan.weight > 0
        zero = torch.zeros((), device=device)
        with autocast(device):
            rec, codes, vq_loss = model(x)
            l1 = (x - rec).abs().mean()
            l2 = ((x - rec) ** 2).mean()
            perceptual = self.lpips(x, rec).mean() if self.lpips is not None else zero
            nll = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.perceptual.weight * perceptual
            if gan_on:
                g_loss = -disc(rec).mean()
                g_weight = adaptive_gan_weight(nll, g_loss, model.last_layer) * cfg.gan.weight
            else:
                g_loss, g_weight = zero, zero
            loss = nll + g_weight * g_loss + vq_loss
        if not torch.isfinite(loss):
            return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        d_loss = zero
        if gan_on:
            with autocast(device):
                d_loss = (F.relu(1.0 - disc(x)).mean() + F.relu(1.0 + disc(rec.detach())).mean()) / 2
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
        return {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "perceptual": perceptual.item(),
                "vq": vq_loss.item(), "g": g_loss.item(), "g_weight": float(g_weight), "d": d_loss.item(),
                "grad_norm": grad_norm.item(), "codes_in_batch": int(codes.unique().numel())}

    def evaluate(self, step: int, out: Path, writer) -> dict[str, float]:
        from PIL import Image

        metrics, rec = evaluate(self.model, self.held, self.device)
        grid = comparison_grid(self.held, rec)
        (out / "samples").mkdir(exist_ok=True)
        Image.fromarray(grid).save(out / "samples" / f"step_{step:08d}.png")
        writer.add_image("eval/originals_over_reconstructions", grid, step, dataformats="HWC")
        return metrics

    def export(self, out: Path) -> None:
        save_tokenizer_dir(self.model, self.cfg.preprocess, out)


def train_vqgan(sources: list[str | Path], out: str | Path, cfg: VQGANTrainConfig, resume: bool = False,
                device: torch.device | str | None = None) -> dict:
    """Train (or resume) and return the last evaluation metrics."""
    device = torch.device(device) if device is not None else default_device()
    task = VQGANTask(sources, cfg, device)
    return harness.run(task, cfg, to_dict(cfg), Path(out), world=distributed.single(device), resume=resume,
                      desc="vqgan").eval


def load_train_config(path: str | Path | None, overrides: list[str]) -> VQGANTrainConfig:
    from omnitok.config import apply_overrides, load_config_file

    return build(VQGANTrainConfig, apply_overrides(load_config_file(path), overrides))
