"""Fully convolutional prediction of a large 2-D image in overlapping tiles, blended at the seams.

Why: a 2048x2048 micrograph with thousands of nuclei must not be shrunk to the network's training
size (the nuclei would vanish). The networks are fully convolutional, so they run at the image's
own pixel size on tiles; each tile's probabilities are weighted by a window that falls off linearly
over the overlap, so seams do not show, and tiles are run in small batches to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` in common."""
    if tile >= length:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(tile: Sequence[int], overlap: int) -> torch.Tensor:
    """(h, w) weights: 1 inside, a linear ramp to a small positive value over ``overlap`` at each side."""
    def ramp(n: int) -> torch.Tensor:
        w = torch.ones(n)
        k = min(overlap, n // 2)
        if k > 0:
            r = (torch.arange(k, dtype=torch.float32) + 1) / (k + 1)
            w[:k] = r
            w[n - k:] = r.flip(0)
        return w

    return ramp(int(tile[0]))[:, None] * ramp(int(tile[1]))[None, :]


def iter_tiled(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Sequence[int],
               overlap: int = 32, multiple: int = 16, batch_size: int = 4,
               ) -> Iterator[tuple[int, int, torch.Tensor | None]]:
    """Generator over the tiles of ``x`` (C, H, W): yields ``(done, n_tiles, None)`` after each batch
    of tiles and finally ``(n, n, probabilities (H, W))``.

    ``predict`` maps a batch (B, C, h, w) to probabilities (B, 1, h, w). Images smaller than a tile run
    in one piece, padded (reflect) to a multiple of ``multiple`` (the network's total down-sampling).
    """
    c, h, w = x.shape
    th = min(_round_up(int(tile[0]), multiple), _round_up(h, multiple))
    tw = min(_round_up(int(tile[1]), multiple), _round_up(w, multiple))
    ph, pw = max(th, h), max(tw, w)
    pad_h, pad_w = ph - h, pw - w
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x[None], (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode=mode)[0]
    ys, xs = tile_starts(ph, th, overlap), tile_starts(pw, tw, overlap)
    boxes = [(y0, x0) for y0 in ys for x0 in xs]
    weight = blend_window((th, tw), overlap if len(boxes) > 1 else 0).to(x.device)
    acc = torch.zeros((ph, pw), device=x.device)
    norm = torch.zeros((ph, pw), device=x.device)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        batch = torch.stack([x[:, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])
        prob = predict(batch)[:, 0].float()
        for (y0, x0), p in zip(chunk, prob):
            acc[y0:y0 + th, x0:x0 + tw] += p * weight
            norm[y0:y0 + th, x0:x0 + tw] += weight
        yield start + len(chunk), len(boxes), None
    out = acc / norm
    top, left = pad_h // 2, pad_w // 2
    yield len(boxes), len(boxes), out[top:top + h, left:left + w]


def predict_tiled(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Sequence[int],
                  overlap: int = 32, multiple: int = 16, batch_size: int = 4) -> torch.Tensor:
    """Probabilities (H, W) of ``x`` (C, H, W) from overlapping tiles (see :func:`iter_tiled`)."""
    *_, (_, _, result) = iter_tiled(predict, x, tile, overlap, multiple, batch_size)
    assert result is not None
    return result
