"""Optional training augmentation (off by default, for paper parity): flips, 90° rotations, intensity.

The ``--augment`` kinds of ``python -m training``, on the engine's :func:`napari_sdunet.augment.augment_pair`
(the same transforms fine-tuning uses), with a private generator per run so that runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from napari_sdunet.augment import augment_pair

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

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_pair(x, y, flips="flip" in self.kinds, rot90="rot90" in self.kinds,
                            intensity=self.strength if "intensity" in self.kinds else 0.0, gamma=True,
                            generator=self.g)

    def __repr__(self) -> str:
        return f"Augment({sorted(self.kinds)})"
