"""Next-token loss over interleaved sequences, weighted per modality of the target token, with metrics per modality.

Every token of a document carries loss (text, specials, codes); padding (label -100) never does. Cross-entropy is
computed as ``logsumexp(logits) - logits[target]`` on one fp32 copy of the logits (no log-softmax tensor beside it),
and the optional z-loss (Chameleon used 1e-5) reuses the same logsumexp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnitok.tokenizers.layout import Modality, TokenLayout

IGNORE = -100
REPORTED = ("text", "special", "image", "audio")


@dataclass
class LossConfig:
    text: float = 1.0
    special: float = 1.0
    image: float = 1.0
    audio: float = 1.0
    z_loss: float = 0.0


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, layout: TokenLayout, cfg: LossConfig,
            normalizer: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``logits`` (B, T, V) predict ``labels`` (B, T), already shifted (label t is the token after input t).

    The loss is the weighted sum over tokens divided by ``normalizer`` (default: this batch's token count; data
    parallel training passes the global count over the world size, so averaging gradients across ranks gives the
    exact mean over all tokens). Also returns sums per modality (``{m}_loss``, ``{m}_tokens``, ``{m}_correct``),
    which callers add up across ranks and steps before dividing.
    """
    valid = labels != IGNORE  # (B, T)
    targets = labels.clamp(min=0)
    x = logits.float()  # the one fp32 copy (B, T, V)
    lse = torch.logsumexp(x, dim=-1)  # (B, T)
    ce = lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    modality = layout.modality_of(targets)  # (B, T) Modality codes
    weights = torch.tensor([cfg.text, cfg.special, cfg.image, cfg.audio, 0.0], device=ce.device)[modality] * valid
    count = valid.sum().clamp(min=1) if normalizer is None else normalizer
    loss = (weights * ce).sum() / count
    if cfg.z_loss:
        loss = loss + cfg.z_loss * (lse.pow(2) * valid).sum() / count
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets) & valid
        metrics: dict[str, torch.Tensor] = {}
        for name in REPORTED:
            mask = valid & (modality == Modality[name.upper()])
            metrics[f"{name}_loss"] = (ce * mask).sum()
            metrics[f"{name}_tokens"] = mask.sum()
            metrics[f"{name}_correct"] = (correct & mask).sum()
    return loss, metrics
