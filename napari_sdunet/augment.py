"""Paired image/mask augmentation, shared by training from scratch and fine-tuning.

Flips, 90° rotations (square inputs only: a rotation would change a 192x144 frame's shape) and a
brightness / contrast (optionally gamma) jitter, applied to ``(image (C,H,W), mask (1,H,W))`` tensors.
Random numbers come from ``generator`` (reproducible per run) or, when it is None, from torch's
global RNG, which the training loop seeds.
"""

from __future__ import annotations

from typing import Any

import torch


def augment_pair(x: torch.Tensor, y: torch.Tensor, *, flips: bool = True, rot90: bool = True,
                 intensity: float = 0.0, gamma: bool = False, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random draw applied to image and mask alike (intensity changes touch the image only)."""
    g = generator
    if flips:
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
    if rot90 and x.shape[-1] == x.shape[-2]:
        k = int(torch.randint(0, 4, (), generator=g))
        if k:
            x, y = x.rot90(k, (-2, -1)), y.rot90(k, (-2, -1))
    if intensity > 0:
        u = (torch.rand(3 if gamma else 2, generator=g) * 2 - 1) * intensity
        x = ((x - x.mean()) * (1 + u[0]) + x.mean() + u[1]).clamp(0, 1)
        if gamma:
            x = x ** float(torch.exp(u[2]))
    return x.contiguous(), y.contiguous()


class Augmented:
    """A dataset of ``(x, y)`` tensors, augmented on the fly with :func:`augment_pair`."""

    def __init__(self, base: Any, flips: bool = True, rot90: bool = True, intensity: float = 0.1,
                 gamma: bool = False, generator: torch.Generator | None = None) -> None:
        self.base = base
        self.options = dict(flips=flips, rot90=rot90, intensity=intensity, gamma=gamma, generator=generator)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return augment_pair(x, y, **self.options)
