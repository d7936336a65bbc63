"""The VQ-GAN image tokenizer model: encoder, vector quantizer, decoder. Plain ``nn.Module``s.

The architecture is the taming-transformers VQGAN family that Chameleon, LlamaGen and Janus share (ResNet blocks
with GroupNorm(32) and swish, asymmetric-pad strided-conv downsampling, nearest upsampling + conv, a middle block
of ResNet-attention-ResNet). Parameter names follow transformers' ``JanusVQVAE`` (``encoder.down.{i}.block.{j}``,
``decoder.up.{i}`` with ``up.0`` the lowest resolution), so Hugging Face directories load by name and the other
formats map onto these names in ``image_import.py``.

Quantizer: the codebook lives in vector-quantize-pytorch's ``VectorQuantize`` (EMA updates, k-means init and
dead-code replacement while training). Inference looks codes up with the reference formula
``|z|^2 + |e|^2 - 2 z.e`` in fp32 so that codes are bit-identical to the models we import:
- ``l2_normalized_codes`` (LlamaGen / Janus VQ-16): z and codebook are l2-normalised before the lookup, and the
  decoder sees the normalised entry. The codebook is kept unit-norm (its canonical form), as LlamaGen initialises
  it and as vector-quantize-pytorch's cosine codebook maintains it.
- plain Euclidean lookup (Chameleon's VQGAN, 8192 x 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from omnitok.errors import OmnitokError
from omnitok.tokenizers.codebook import scale_dead_code_threshold


@dataclass
class VQGANConfig:
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)  # one downsampling between levels: 5 levels -> /16
    num_res_blocks: int = 2
    level_attention: bool = True  # attention after each ResNet block of the lowest level (LlamaGen, Janus)
    latent_channels: int = 256  # encoder output / decoder input channels ("z_channels")
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_normalized_codes: bool = True
    has_decoder: bool = True  # False for encoder-only checkpoints (transformers' ChameleonVQVAE)
    in_channels: int = 3
    out_channels: int = 3
    dropout: float = 0.0
    # Training-time quantizer settings (vector-quantize-pytorch); they do not change inference.
    ema_decay: float = 0.99
    commitment_weight: float = 0.25
    dead_code_share: float = 0.25  # a code used less than this share of a uniform code (EMA) is replaced by a batch
    # vector (omnitok.tokenizers.codebook); 0: never

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(self.channel_multipliers)
        if not self.channel_multipliers:
            raise OmnitokError("VQGAN config: channel_multipliers must not be empty")
        for c in [self.base_channels * m for m in self.channel_multipliers]:
            if c % 32:
                raise OmnitokError(f"VQGAN config: level channels must be multiples of 32 (GroupNorm), got {c}")
        if self.latent_channels % 32:
            raise OmnitokError("VQGAN config: latent_channels must be a multiple of 32 (GroupNorm)")
        if self.codebook_size < 2 or self.codebook_dim < 1 or self.num_res_blocks < 1:
            raise OmnitokError("VQGAN config: codebook_size >= 2, codebook_dim >= 1 and num_res_blocks >= 1")
        if self.dead_code_share < 0:
            raise OmnitokError("VQGAN config: dead_code_share must be >= 0 (0: never replace codes)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    """silu, in place when no gradient is needed: at 256 px a full-width activation is ~0.5 GB per batch of 16, and
    the allocation it saves is a measurable part of CPU decoding time."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, 1, c, h * w).transpose(-1, -2)  # (B, 1, HW, C)
        k = self.k(y).reshape(b, 1, c, h * w).transpose(-1, -2)
        v = self.v(y).reshape(b, 1, c, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C) as the reference
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResNet blocks (each followed by attention where enabled) and an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention: bool, dropout: float,
                 resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout)
                                   for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(blocks)) if attention else nn.ModuleList()
        if resample is Downsample:
            self.downsample = Downsample(out_channels)
        elif resample is Upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        mult, ch, n = cfg.channel_multipliers, cfg.base_channels, len(cfg.channel_multipliers)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        ins = (1, *mult)
        self.down = nn.ModuleList(
            Level(ch * ins[i], ch * mult[i], cfg.num_res_blocks, cfg.level_attention and i == n - 1, cfg.dropout,
                  Downsample if i != n - 1 else None)
            for i in range(n))
        self.mid = MidBlock(ch * mult[-1], cfg.dropout)
        self.norm_out = _norm(ch * mult[-1])
        self.conv_out = nn.Conv2d(ch * mult[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, latent, H/ds, W/ds)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        mult, ch, n = cfg.channel_multipliers, cfg.base_channels, len(cfg.channel_multipliers)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch * mult[-1], 3, padding=1)
        self.mid = MidBlock(ch * mult[-1], cfg.dropout)
        levels, block_in = [], ch * mult[-1]
        for i in reversed(range(n)):  # up[0] is the lowest resolution
            levels.append(Level(block_in, ch * mult[i], cfg.num_res_blocks + 1, cfg.level_attention and i == n - 1,
                                cfg.dropout, Upsample if i != 0 else None))
            block_in = ch * mult[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch * mult[0])
        self.conv_out = nn.Conv2d(ch * mult[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent, h, w) -> (B, 3, h*ds, w*ds)
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """Codebook lookup: exact reference arithmetic at inference, vector-quantize-pytorch's EMA codebook in training."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.l2, self.dead_code_share = cfg.l2_normalized_codes, cfg.dead_code_share
        # threshold_ema_dead_code > 0 turns dead-code replacement on; its count is set for each batch in forward
        self.vq = VectorQuantize(dim=cfg.codebook_dim, codebook_size=cfg.codebook_size, use_cosine_sim=self.l2,
                                 decay=cfg.ema_decay, commitment_weight=cfg.commitment_weight, kmeans_init=True,
                                 kmeans_iters=10, threshold_ema_dead_code=cfg.dead_code_share,
                                 rotation_trick=False)

    @property
    def codebook(self) -> torch.Tensor:  # (K, d); unit-norm rows in l2 mode
        return self.vq._codebook.embed[0]

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> codes (B, h, w): nearest codebook entry, distances in fp32 even under autocast."""
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*h*w, d)
            if self.l2:
                flat = F.normalize(flat, p=2, dim=-1)
            e = self.codebook.float()  # (K, d)
            dist = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, e.T)
            return dist.argmin(1).reshape(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> (B, d, h, w) codebook vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training path: (B, d, h, w) -> quantized (straight-through), codes (B, h, w), commitment loss."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        scale_dead_code_threshold(self.vq, self.dead_code_share, b * h * w)
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, codes, loss = self.vq(flat.float())
        return quantized.reshape(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype), codes.reshape(b, h, w), loss


class VQGAN(nn.Module):
    """Images in [-1, 1] <-> code grids. ``encode``: (B, 3, H, W) -> (B, H/ds, W/ds); ``decode``: the inverse."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.codebook_dim, 1)
        self.quantize = Quantizer(cfg)
        if cfg.has_decoder:
            self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.latent_channels, 1)
            self.decoder = Decoder(cfg)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.lookup(self.quant_conv(self.encoder(pixels)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.config.has_decoder:
            raise OmnitokError("this image tokenizer has no decoder (transformers' ChameleonVQVAE holds the encoder "
                               "only); import Chameleon's original vqgan.ckpt to decode images")
        return self.decoder(self.post_quant_conv(self.quantize.embed(codes)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: reconstruction (B, 3, H, W), codes (B, h, w), quantizer loss."""
        quantized, codes, vq_loss = self.quantize(self.quant_conv(self.encoder(pixels)))
        return self.decoder(self.post_quant_conv(quantized)), codes, vq_loss

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, for the adaptive GAN weight of Esser et al."""
        return self.decoder.conv_out.weight
