"""U-Net and SDU-Net (U-Net with (Res)SDN blocks), after the authors' PL-bolts-style U-Net.

SDN placement follows the authors' code, not the paper's figure (see docs/architecture.md): with
``sdn_n_layers`` = n, Down *i* gets an SDN block if i <= n, so encoder levels 1..n+1; Up *i* gets one
if i <= n, so decoder levels L-1 .. L-1-n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationModel
from .blocks import make_block, upsample2x
from .registry import SDN_PRESET, ArchSpec, register_arch


class Up(nn.Module):
    """Bilinear x2 + 1x1 conv (f -> f/2), pad to the skip, concat [skip, up], block (f -> f/2)."""

    def __init__(self, channels: int, sdn: bool, sdn_kwargs: dict):
        super().__init__()
        self.up = nn.Sequential(upsample2x(), nn.Conv2d(channels, channels // 2, 1))
        self.block = make_block(channels, channels // 2, sdn, sdn_kwargs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.block(torch.cat([skip, x], dim=1))


class UNet(SegmentationModel):
    """U-Net with optional SDN blocks.

    Args:
        in_channels, out_channels: image channels and output logits.
        depth: number of poolings L.
        base_filters: filters at level 0 (doubling per level).
        sdn_encoder_levels: levels 1..L whose encoder block is an SDN block.
        sdn_decoder_levels: levels 0..L-1 whose decoder block is an SDN block.
        sdn_state, sdn_directions, sdn_residual, sdn_impl: SDN layer settings.
    """

    arch = "unet"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        depth: int = 4,
        base_filters: int = 32,
        sdn_encoder_levels: Sequence[int] = (),
        sdn_decoder_levels: Sequence[int] = (),
        sdn_state: int = 150,
        sdn_directions: Sequence[int] = (0, 2),
        sdn_residual: bool = True,
        sdn_impl: str = "auto",
    ):
        super().__init__()
        self._remember(dict(locals()))
        self.in_channels, self.depth = in_channels, depth
        enc, dec = set(sdn_encoder_levels), set(sdn_decoder_levels)
        if not enc <= set(range(1, depth + 1)) or not dec <= set(range(depth)):
            raise ValueError(f"SDN levels out of range for depth {depth}: encoder {enc}, decoder {dec}")
        kw = dict(state=sdn_state, directions=tuple(sdn_directions), residual=sdn_residual, impl=sdn_impl)
        f = [base_filters * 2**i for i in range(depth + 1)]
        self.inc = make_block(in_channels, f[0], False, kw)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), make_block(f[i], f[i + 1], i + 1 in enc, kw)) for i in range(depth)
        )
        # ups[k] produces level depth-1-k from level depth-k
        self.ups = nn.ModuleList(Up(f[lvl + 1], lvl in dec, kw) for lvl in range(depth - 1, -1, -1))
        self.head = nn.Conv2d(f[0], out_channels, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The up-steps and the head."""
        return [p for name, p in self.named_parameters() if name.split(".")[0] in ("ups", "head")]


class SDUNet(UNet):
    """SDU-Net: U-Net with ResSDN blocks (same class, own name in the registry)."""

    arch = "sdunet"


def unet_sdn_levels(depth: int, n: int) -> tuple[list[int], list[int]]:
    """Encoder and decoder levels that get SDN blocks in the authors' U-Net (``sdn_n_layers`` = n)."""
    enc = [i + 1 for i in range(depth) if i <= n]
    dec = [depth - 1 - i for i in range(depth) if i <= n]
    return enc, dec


def unet_sdn_placement(depth: int, n: int) -> dict[str, Any]:
    enc, dec = unet_sdn_levels(depth, n)
    return {"sdn_encoder_levels": enc, "sdn_decoder_levels": dec}


register_arch(ArchSpec("unet", "U-Net", UNet))
register_arch(ArchSpec("sdunet", "SDU-Net", SDUNet, baseline="unet", sdn_placement=unet_sdn_placement,
                       preset_kwargs=SDN_PRESET))
