"""Next-token loss over interleaved sequences, weighted per modality of the target token, with metrics per modality.

Every token of a document carries loss (text, specials, codes); padding (label -100) never does. Cross-entropy is
``logsumexp(logits) - logits[target]`` on one fp32 copy of the logits: a small autograd function keeps no log-softmax
tensor, writes the gradient (softmax - one-hot, scaled) straight into the one gradient tensor autograd needs anyway,
and yields the argmax for accuracy from the same pass. The optional z-loss (Chameleon used 1e-5) reuses the
logsumexp. Measured on CPU, (8, 512, 5184) logits: 2x faster than autograd through logsumexp and gather.
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


class _CrossEntropy(torch.autograd.Function):
    """(N, V) logits (any float dtype), (N,) targets -> lse (N,), ce (N,), argmax (N,) in fp32.

    The forward keeps ``exp(logits - max)`` (fp32: the one full-size copy) and the backward turns it, in place, into
    the gradient ``softmax * (g_lse + g_ce) - onehot * g_ce``; the logits themselves are not kept.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        top, argmax = logits.max(dim=-1)  # (N,)
        top = top.float()
        e = torch.exp(logits - top[:, None])  # (N, V) fp32 (bf16 - fp32 promotes)
        total = e.sum(-1)
        lse = top + torch.log(total)
        ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1).float()
        ctx.save_for_backward(e, total, targets)
        ctx.dtype = logits.dtype
        ctx.mark_non_differentiable(argmax)
        return lse, ce, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse: torch.Tensor, g_ce: torch.Tensor, _):
        e, total, targets = ctx.saved_tensors
        grad = e.mul_(((g_lse + g_ce) / total)[:, None])  # softmax * coef, in the saved buffer
        grad.scatter_add_(-1, targets[:, None], -g_ce[:, None])
        return grad.to(ctx.dtype), None


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
    lse, ce, argmax = _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    lse, ce, argmax = lse.view_as(targets), ce.view_as(targets), argmax.view_as(targets)  # (B, T)
    modality = layout.modality_of(targets)  # (B, T) Modality codes
    weights = torch.tensor([cfg.text, cfg.special, cfg.image, cfg.audio, 0.0], device=ce.device)[modality] * valid
    count = valid.sum().clamp(min=1) if normalizer is None else normalizer
    loss = (weights * ce).sum() / count
    if cfg.z_loss:
        loss = loss + cfg.z_loss * (lse.pow(2) * valid).sum() / count
    with torch.no_grad():
        correct = (argmax == targets) & valid
        metrics: dict[str, torch.Tensor] = {}
        for name in REPORTED:
            mask = valid & (modality == Modality[name.upper()])
            metrics[f"{name}_loss"] = (ce * mask).sum()
            metrics[f"{name}_tokens"] = mask.sum()
            metrics[f"{name}_correct"] = (correct & mask).sum()
    return loss, metrics
