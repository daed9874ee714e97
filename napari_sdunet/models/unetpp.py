"""U-Net++ (nested U-Net) and SDNU-Net (U-Net++ with (Res)SDN nodes).

SDN placement follows the authors' NestedUnet (``sdn_n_layers`` = n): encoder X0,0 and X1,0
always, X[i,0] if n >= i; decoder X0,1 always, X0,2 if n >= 2, X0,3 if n >= 3, and X3,1 X2,2 X1,3
X0,4 if n >= 4 (depth 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import make_block, upsample2x
from .registry import SDN_PRESET, ArchSpec, register_arch


class UNetPlusPlus(SegmentationModel):
    """U-Net++ with nodes X[i,j] (i = level, j = column), output from X[0, depth].

    Node X[i,j] (j >= 1) takes concat(X[i,0..j-1], up(X[i+1,j-1])). Filters 32..512 by default.

    Args:
        sdn_nodes: nodes ``[i, j]`` whose block is an SDN block.
        other args: as :class:`napari_sdunet.models.unet.UNet`.
    """

    arch = "unetpp"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        depth: int = 4,
        base_filters: int = 32,
        sdn_nodes: Sequence[Sequence[int]] = (),
        sdn_state: int = 150,
        sdn_directions: Sequence[int] = (0, 2),
        sdn_residual: bool = True,
        sdn_impl: str = "auto",
    ):
        super().__init__()
        self._remember(dict(locals()))
        self.in_channels, self.depth = in_channels, depth
        nodes = {(int(i), int(j)) for i, j in sdn_nodes}
        valid = {(i, j) for i in range(depth + 1) for j in range(depth + 1 - i)}
        if not nodes <= valid:
            raise ValueError(f"SDN nodes {sorted(nodes - valid)} do not exist at depth {depth}")
        kw = dict(state=sdn_state, directions=tuple(sdn_directions), residual=sdn_residual, impl=sdn_impl)
        f = [base_filters * 2**i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2)
        self.up = upsample2x()
        self.nodes = nn.ModuleDict()
        for j in range(depth + 1):
            for i in range(depth + 1 - j):
                cin = (in_channels if i == 0 else f[i - 1]) if j == 0 else f[i] * j + f[i + 1]
                self.nodes[f"x{i}_{j}"] = make_block(cin, f[i], (i, j) in nodes, kw)
        self.head = nn.Conv2d(f[0], out_channels, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        L = self.depth
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(L + 1):
            grid[i, 0] = self.nodes[f"x{i}_0"](x if i == 0 else self.pool(grid[i - 1, 0]))
            # after a new encoder level, fill the diagonal that it completes
            for j in range(1, i + 1):
                r = i - j
                inputs = [grid[r, k] for k in range(j)] + [self.up(grid[r + 1, j - 1])]
                grid[r, j] = self.nodes[f"x{r}_{j}"](torch.cat(inputs, dim=1))
        return self.head(grid[0, L])

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The nodes X[i, j] with j >= 1 and the head."""
        out = []
        for name, p in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "head" or (parts[0] == "nodes" and not parts[1].endswith("_0")):
                out.append(p)
        return out


class SDNUNet(UNetPlusPlus):
    """SDNU-Net: U-Net++ with ResSDN nodes (same class, own name in the registry)."""

    arch = "sdnunet"


def unetpp_sdn_nodes(depth: int, n: int) -> list[list[int]]:
    """Nodes [i, j] that get SDN blocks in the authors' NestedUnet (``sdn_n_layers`` = n)."""
    nodes = [[0, 0], [1, 0]] + [[i, 0] for i in range(2, depth + 1) if n >= i]
    nodes += [[0, 1]] + [[0, j] for j in (2, 3) if n >= j and j <= depth]
    if n >= 4 and depth == 4:
        nodes += [[3, 1], [2, 2], [1, 3], [0, 4]]
    return nodes


def unetpp_sdn_placement(depth: int, n: int) -> dict[str, Any]:
    return {"sdn_nodes": unetpp_sdn_nodes(depth, n)}


register_arch(ArchSpec("unetpp", "U-Net++", UNetPlusPlus))
register_arch(ArchSpec("sdnunet", "SDNU-Net", SDNUNet, baseline="unetpp", sdn_placement=unetpp_sdn_placement,
                       preset_kwargs=SDN_PRESET))
