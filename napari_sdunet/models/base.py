"""Base class of the four networks: any input size, constructor config kept for checkpoints."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationModel(nn.Module):
    """Pads the input to a multiple of ``2**depth``, runs :meth:`forward_padded`, crops back.

    Subclasses set ``arch`` and call ``self._remember(locals())`` so that ``self.config`` holds the
    exact constructor arguments (what a checkpoint's ``config.json`` stores).
    """

    arch: str = ""
    depth: int
    in_channels: int

    def _remember(self, kwargs: dict[str, Any]) -> None:
        cfg = {k: v for k, v in kwargs.items() if k not in ("self", "__class__")}
        for k, v in cfg.items():
            if isinstance(v, tuple):
                cfg[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        self.config = cfg

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.forward_padded(x)
        return y[..., :h, :w]
