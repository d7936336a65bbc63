"""Next-token loss over interleaved sequences, weighted per modality of the target token, with metrics per modality.

Every token of a document carries loss (text, specials, codes); padding (label -100) never does. Cross-entropy is
``logsumexp(logits) - logits[target]``, computed over ``chunk_rows`` rows at a time so that no full-size fp32 copy of
the logits ever exists: the forward keeps only the logits autograd holds anyway plus one fp32 value per row (the
logsumexp), and the backward recomputes each chunk's softmax and writes the gradient ``softmax * (g_lse + g_ce) -
onehot * g_ce`` straight into one gradient tensor in the logits' dtype. The argmax for accuracy comes from the same
pass; the optional z-loss (Chameleon used 1e-5) reuses the logsumexp. With bf16 logits (8 x 1024 x 64k) the loss's
peak memory is half that of the previous version, which kept ``exp(logits - max)`` in fp32 for the backward
(``python -m benchmarks.loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import IGNORE, TOKEN_KINDS, Modality, TokenLayout


@dataclass
class LossConfig:
    text: float = 1.0
    special: float = 1.0
    image: float = 1.0
    audio: float = 1.0
    z_loss: float = 0.0
    chunk_rows: int = 1024  # cross-entropy rows per chunk: one (chunk_rows, vocab) fp32 temporary at a time

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise OmnitokError("loss.chunk_rows must be at least 1")


class _CrossEntropy(torch.autograd.Function):
    """(N, V) logits (any float dtype), (N,) targets -> lse (N,), ce (N,) in fp32 and argmax (N,), ``chunk`` rows at
    a time; the backward recomputes each chunk's softmax from the saved logits and the row's logsumexp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ce = torch.empty_like(lse)
        argmax = torch.empty(n, dtype=torch.long, device=logits.device)
        for s in range(0, n, chunk):
            x, t = logits[s:s + chunk], targets[s:s + chunk]  # (c, V), (c,)
            top, argmax[s:s + chunk] = x.max(dim=-1)
            top = top.float()
            lse[s:s + chunk] = top + torch.log(torch.exp(x - top[:, None]).sum(-1))  # (c, V) fp32, freed here
            ce[s:s + chunk] = lse[s:s + chunk] - x.gather(-1, t[:, None]).squeeze(-1).float()
        ctx.save_for_backward(logits, lse, targets)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(argmax)
        return lse, ce, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse: torch.Tensor, g_ce: torch.Tensor, _):
        logits, lse, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        coef = g_lse + g_ce  # (N,)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = slice(s, s + ctx.chunk)
            p = torch.exp(logits[e].float() - lse[e, None]).mul_(coef[e, None])  # softmax * coef, (c, V) fp32
            p.scatter_add_(-1, targets[e, None], -g_ce[e, None])
            grad[e] = p
        return grad, None, None


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
    lse, ce, argmax = _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), cfg.chunk_rows)
    lse, ce, argmax = lse.view_as(targets), ce.view_as(targets), argmax.view_as(targets)  # (B, T)
    modality = layout.modality_of(targets)  # (B, T) Modality codes
    per_kind = [getattr(cfg, m.label, 0.0) for m in Modality]  # reserved ids have no weight: they carry no loss
    weights = torch.tensor(per_kind, device=ce.device)[modality] * valid
    count = valid.sum().clamp(min=1) if normalizer is None else normalizer
    loss = (weights * ce).sum() / count
    if cfg.z_loss:
        loss = loss + cfg.z_loss * (lse.pow(2) * valid).sum() / count
    with torch.no_grad():
        correct = (argmax == targets) & valid
        metrics: dict[str, torch.Tensor] = {}
        for name in TOKEN_KINDS:
            mask = valid & (modality == Modality[name.upper()])
            metrics[f"{name}_loss"] = (ce * mask).sum()
            metrics[f"{name}_tokens"] = mask.sum()
            metrics[f"{name}_correct"] = (correct & mask).sum()
    return loss, metrics
