"""Loss of the paper's recipe: 0.5 * BCE + (1 - soft Dice), Dice per sample then averaged."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample soft Dice of sigmoid(logits) against {0,1} targets, shape (B,)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * BCE-with-logits (mean over pixels) + (1 - mean per-sample soft Dice)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return 0.5 * bce + (1 - soft_dice(logits, target).mean())


def hard_dice(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample Dice of thresholded probabilities (B,), empty prediction + empty target = 1."""
    p = (probs > threshold).flatten(1)
    t = (target > 0.5).flatten(1)
    inter = (p & t).sum(1).float()
    den = (p.sum(1) + t.sum(1)).float()
    return torch.where(den > 0, 2 * inter / den.clamp_min(1), torch.ones_like(den))
