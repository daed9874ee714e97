"""The authors' style of SDN sweep, kept as the benchmark baseline (spec §1.5 and §4).

Per step it slices the current and previous line out of the NCHW state, computes the prior term for
that line (not hoisted), runs the GRU update and, at the end, stacks the lines back. Same math as
every other implementation. Importing this module registers it as ``impl="naive"`` (never used by
``impl="auto"``); the package itself never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_sdunet.models.sdn.sweep import gru_update, neighbours3, register_sweep


def sweep_naive(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                b_h: torch.Tensor, direction: int) -> torch.Tensor:
    """Sweep an NCHW tensor (B, S, H, W) in ``direction`` (0..3), one whole line per Python step."""
    if direction not in (0, 1, 2, 3):
        raise ValueError(f"direction must be 0..3, got {direction}")
    axis = 3 if direction in (0, 1) else 2
    n = x.shape[axis]
    order = range(n) if direction in (0, 2) else range(n - 1, -1, -1)
    out: dict[int, torch.Tensor] = {}
    prev = None
    for d in order:
        h = x.select(axis, d).transpose(1, 2)  # (B, L, S): the line, features last
        if prev is None:
            new = h
        else:
            a = F.linear(neighbours3(prev), w_in, b_in)
            c = F.linear(h, w_h, b_h)  # prior term, per step as in the authors' code
            new = gru_update(a, c, h)
        out[d] = new
        prev = new
    return torch.stack([out[d].transpose(1, 2) for d in range(n)], dim=axis)


def _naive_lines(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                 b_h: torch.Tensor) -> torch.Tensor:
    """Lines-major adapter (T, B, L, S) <-> NCHW direction 0, for the registry."""
    x = lines.permute(1, 3, 2, 0)  # (B, S, L, T): lines are columns
    return sweep_naive(x, w_in, b_in, w_h, b_h, 0).permute(3, 0, 2, 1)


register_sweep("naive", _naive_lines)
