"""Spatially Dependent Network (SDN) layer and its residual (gated) variant.

The layer is project-in (3x3 conv + tanh) -> sequential directional GRU sweeps -> project-out
(1x1 conv), as in the authors' code (see ``docs/architecture.md``). Each sweep updates one line at
a time from the three neighbours on the previous, already-updated line and the cell's own prior
value. The line-by-line recurrence is computed by a pluggable *sweep implementation* (see
:mod:`napari_sdunet.models.sdn.sweep`), so fast CPU/GPU paths can replace the plain loop while keeping
the same math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .sweep import sweep

#: Direction codes: 0 left->right, 1 right->left, 2 top->bottom, 3 bottom->top.
DIRECTIONS = (0, 1, 2, 3)


class SDNCell(nn.Module):
    """Weights of one directional GRU cell (3 neighbours in, own prior as hidden state).

    ``weight_in`` is (3S, 3S): rows are the gates [r, z, n], columns the taps [i-1, i, i+1].
    ``weight_prior`` is (3S, S). Initialised U(-1/sqrt(S), 1/sqrt(S)) like the authors' cell.
    """

    def __init__(self, state: int):
        super().__init__()
        self.state = state
        self.weight_in = nn.Parameter(torch.empty(3 * state, 3 * state))
        self.bias_in = nn.Parameter(torch.empty(3 * state))
        self.weight_prior = nn.Parameter(torch.empty(3 * state, state))
        self.bias_prior = nn.Parameter(torch.empty(3 * state))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.state)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class SDN(nn.Module):
    """SDN layer: ``conv(k) -> tanh -> sweeps over `directions` -> conv1x1``.

    Args:
        in_channels, out_channels: channel counts of input and output.
        state: state size S (150 in the paper).
        directions: sweep directions, applied one after another (paper: (0, 2)).
        kernel_size: kernel of the project-in conv (3 in the paper).
        impl: sweep implementation name, or "auto" (see :func:`napari_sdunet.models.sdn.sweep.sweep`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        state: int = 150,
        directions: Sequence[int] = (0, 2),
        kernel_size: int = 3,
        impl: str = "auto",
    ):
        super().__init__()
        directions = tuple(int(d) for d in directions)
        if not directions or any(d not in DIRECTIONS for d in directions):
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions}")
        self.directions = directions
        self.impl = impl
        self.project_in = nn.Conv2d(in_channels, state, kernel_size, padding=kernel_size // 2)
        self.cells = nn.ModuleList(SDNCell(state) for _ in directions)
        self.project_out = nn.Conv2d(state, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.tanh(self.project_in(x))
        channels_last = s.dim() == 4 and not s.is_contiguous() and s.is_contiguous(memory_format=torch.channels_last)
        for direction, cell in zip(self.directions, self.cells):
            s = sweep(
                s,
                cell.weight_in,
                cell.bias_in,
                cell.weight_prior,
                cell.bias_prior,
                direction,
                impl=self.impl,
            )
        if channels_last:
            # the last sweep's lines-major layout seen as NCHW has no memory format: the 1x1 conv
            # would make it NCHW-contiguous (a transposing copy); this one is a copy of whole rows
            s = s.contiguous(memory_format=torch.channels_last)
        return self.project_out(s)


class ResSDN(nn.Module):
    """Gated residual SDN: ``y = g * conv(x) + (1 - g) * sdn(x)``, g a learned sigmoid gate.

    The SDN produces 2*out channels: the SDN path and the gate logits.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        state: int = 150,
        directions: Sequence[int] = (0, 2),
        kernel_size: int = 3,
        impl: str = "auto",
    ):
        super().__init__()
        self.sdn = SDN(in_channels, 2 * out_channels, state, directions, kernel_size, impl)
        self.cnn = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    @torch.no_grad()
    def open_gate(self, bias: float) -> None:
        """Gate weights 0 and gate bias ``bias``: ``g = sigmoid(bias)`` everywhere (0.95 for 3).

        A network warm-started from its baseline then starts as the baseline (the copied conv) and
        learns how much SDN to mix in.
        """
        out = self.sdn.project_out
        half = out.out_channels // 2
        out.weight[half:].zero_()
        out.bias[half:].fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sdn_out, gate = self.sdn(x).chunk(2, dim=1)
        gate = torch.sigmoid(gate)
        return gate * self.cnn(x) + (1 - gate) * sdn_out
