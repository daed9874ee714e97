"""Slow, obviously-correct SDN sweep: one cell at a time, indices exactly as in the spec.

Used by the tests and benchmarks as ground truth. Never use it for real work.
"""

from __future__ import annotations

import torch


def sweep_reference(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                    b_h: torch.Tensor, direction: int) -> torch.Tensor:
    """Cell-by-cell sweep of an NCHW tensor ``x`` (B, S, H, W) in one direction (0..3)."""
    B, S, H, W = x.shape
    horizontal = direction in (0, 1)
    n_steps, length = (W, H) if horizontal else (H, W)
    order = range(n_steps) if direction in (0, 2) else range(n_steps - 1, -1, -1)
    back = -1 if direction in (0, 2) else 1  # where the previous line lies

    def cell(tensor_or_grid, line: int, pos: int):
        # (B, S) value at line index `line`, position `pos` along the line
        if horizontal:
            return tensor_or_grid[:, :, pos, line]
        return tensor_or_grid[:, :, line, pos]

    zero = x.new_zeros(B, S)
    new: dict[tuple[int, int], torch.Tensor] = {}
    first = True
    for d in order:
        for i in range(length):
            h = cell(x, d, i)
            if first:
                new[d, i] = h
                continue
            taps = [new[d + back, k] if 0 <= k < length else zero for k in (i - 1, i, i + 1)]
            u = torch.cat(taps, dim=1)
            a = u @ w_in.T + b_in
            c = h @ w_h.T + b_h
            r = torch.sigmoid(a[:, :S] + c[:, :S])
            z = torch.sigmoid(a[:, S:2 * S] + c[:, S:2 * S])
            n = torch.tanh(a[:, 2 * S:] + r * c[:, 2 * S:])
            new[d, i] = z * n + (1 - z) * h
        first = False
    rows = []
    for r_ in range(H):
        rows.append(torch.stack([new[(c_, r_) if horizontal else (r_, c_)] for c_ in range(W)], dim=-1))
    return torch.stack(rows, dim=-2)
