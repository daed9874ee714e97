"""Optional training augmentation (off by default, for paper parity): flips, 90° rotations, intensity.

Applied per sample to ``(image (C,H,W), mask (1,H,W))`` tensors. 90° rotations are only used on
square inputs (a rotation would change the shape of a 192x144 polyp frame).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

KINDS = ("flip", "rot90", "intensity")


class Augment:
    """Random flips / rot90 / brightness-contrast-gamma jitter, from a private generator."""

    def __init__(self, kinds: Iterable[str], seed: int = 0, strength: float = 0.15):
        self.kinds = set(kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {KINDS}")
        self.g = torch.Generator().manual_seed(seed)
        self.strength = strength

    def _coin(self) -> bool:
        return bool(torch.rand((), generator=self.g) < 0.5)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "flip" in self.kinds:
            if self._coin():
                x, y = x.flip(-1), y.flip(-1)
            if self._coin():
                x, y = x.flip(-2), y.flip(-2)
        if "rot90" in self.kinds and x.shape[-1] == x.shape[-2]:
            k = int(torch.randint(4, (), generator=self.g))
            x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
        if "intensity" in self.kinds:
            s = self.strength
            u = (torch.rand(3, generator=self.g) * 2 - 1) * s
            x = ((x - x.mean()) * (1 + u[0]) + x.mean() + u[1]).clamp(0, 1)
            x = x ** float(torch.exp(u[2]))
        return x.contiguous(), y.contiguous()

    def __repr__(self) -> str:
        return f"Augment({sorted(self.kinds)})"
