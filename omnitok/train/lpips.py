"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant), written here so no package download is needed.

Weights come from two local files the user provides:
- VGG16 ImageNet weights in torchvision's layout (``vgg16-397923af.pth``: ``features.{0,2,5,...,28}.weight|bias``;
  the classifier keys are ignored),
- the LPIPS linear heads (``vgg.pth`` of the lpips package, v0.1: ``lin{0..4}.model.1.weight`` of shape
  ``(1, C, 1, 1)``).
Both are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omnitok.errors import OmnitokError
from omnitok.weights import torch_load_state

# torchvision vgg16 "features" (configuration D): conv widths, "M" = max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in "features"
_WIDTHS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers[:30])  # up to relu5_3; the last pool is never used


class LPIPS(nn.Module):
    """``forward(x, y)``: images in [-1, 1], (B, 3, H, W) each -> (B,) perceptual distances."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _WIDTHS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg16: str | Path, lpips_heads: str | Path) -> LPIPS:
        model = cls()
        vgg = torch_load_state(vgg16)
        feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        missing = [k for k in model.features.state_dict() if k not in feats]
        if missing:
            raise OmnitokError(f"{vgg16} is not torchvision VGG16 weights (missing features.{missing[0]})")
        model.features.load_state_dict({k: feats[k] for k in model.features.state_dict()})
        heads = torch_load_state(lpips_heads)
        for i, lin in enumerate(model.lins):
            key = f"lin{i}.model.1.weight"
            if key not in heads or heads[key].shape != lin.weight.shape:
                raise OmnitokError(f"{lpips_heads} is not LPIPS VGG linear heads ({key} missing or mis-shaped)")
            lin.weight.data.copy_(heads[key])
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        tap = iter(_TAPS)
        next_tap = next(tap)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == next_tap:
                a, b = h.chunk(2)
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise channels
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[k]((a - b) ** 2).mean(dim=(1, 2, 3))
                k += 1
                next_tap = next(tap, None)
                if next_tap is None:
                    break
        return total

