"""Turn a user's 2-D image into model input and a model output back into the image's frame.

The model's ``config.json`` records its preprocessing (input size, channels, intensity scaling or
CT window); these functions apply it, so users can bring images of any size, dtype and camera.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .tasks import WINDOW, intensity_rule, window_of

#: Full scales tried, in order, for integer (and float > 1) images: 8, 10, 12, 14 and 16 bit. A
#: 12-bit camera image stored as uint16 is scaled by 4095, so it looks like the 8-bit image the
#: models were trained on (x / 255), not contrast-stretched image by image.
BIT_DEPTH_SCALES = (255.0, 1023.0, 4095.0, 16383.0, 65535.0)


def check_image(image: np.ndarray, channel_axis: bool) -> np.ndarray:
    """Validate one 2-D image (H, W) or (H, W, C) and return it as a numpy array."""
    arr = np.asarray(image)
    if arr.size == 0:
        raise InputError("the image is empty")
    want = 3 if channel_axis else 2
    if arr.ndim != want:
        raise InputError(f"expected a {'(Y, X, C)' if channel_axis else '(Y, X)'} image, got shape {arr.shape}")
    if channel_axis and arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"the channel axis has {arr.shape[-1]} entries; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("the image contains NaN or infinite values")
    return arr


def normalize_intensity(arr: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """Scale intensities to float32 [0, 1] by the rule of the record's modality (:mod:`.tasks`).

    A windowing modality (CT) clips its HU window to [0, 1]; a record without a modality is
    windowed when it has a ``ct_window``. Otherwise intensities are scaled by bit depth: uint8 ->
    x / 255 (how every model was trained); bool -> {0, 1}; floats already in [0, 1] are kept; other
    non-negative data (uint16, int16, float 0..4095, ...) is divided by the smallest full scale that
    holds its maximum: the record's ``scale`` (the training data's, 255 by default), then the larger
    ones of :data:`BIT_DEPTH_SCALES`, so a 12- or 16-bit copy of an 8-bit image segments like the
    original. Only data that fits none (negative values, or above 65535) is stretched between its
    0.5 and 99.8 percentiles. Always float32: a float64 result would reach the network as double
    and fail against its float32 weights.
    """
    x = np.asarray(arr).astype(np.float32, copy=False)
    if intensity_rule(prep) == WINDOW:
        lo, hi = (np.float32(v) for v in window_of(prep))
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
    if arr.dtype == np.uint8:
        return x / np.float32(255.0)
    if arr.dtype == bool:
        return x
    lo, top = float(x.min()), float(x.max())
    if lo >= 0.0:
        if arr.dtype.kind == "f" and top <= 1.0:
            return x  # already in [0, 1]
        first = float(prep.get("scale") or BIT_DEPTH_SCALES[0])
        for scale in (first, *(s for s in BIT_DEPTH_SCALES if s > first)):
            if top <= scale:
                return x / np.float32(scale)
    p_lo, p_hi = (np.float32(v) for v in np.percentile(x, (0.5, 99.8)))
    if p_hi <= p_lo:
        return np.zeros_like(x)
    return np.clip((x - p_lo) / (p_hi - p_lo), 0.0, 1.0).astype(np.float32, copy=False)


def match_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(H, W[, C]) -> (channels, H, W): grey is repeated, alpha dropped, RGB averaged for 1 channel."""
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] == 4:
        x = x[..., :3]
    elif x.shape[-1] == 2:
        x = x[..., :1]
    if x.shape[-1] != channels:
        x = np.repeat(x, channels, axis=-1) if x.shape[-1] == 1 else x.mean(-1, keepdims=True)
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) with antialiasing when shrinking."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    shrink = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def to_model_input(image: np.ndarray, prep: dict[str, Any], channel_axis: bool | None = None,
                   ) -> torch.Tensor:
    """One 2-D image -> float32 tensor (C, h, w) at the model's input size."""
    if channel_axis is None:
        channel_axis = np.ndim(image) == 3
    arr = check_image(image, channel_axis)
    x = match_channels(normalize_intensity(arr, prep), int(prep.get("channels", 3)))
    t = torch.from_numpy(x.astype(np.float32, copy=False))[None]
    size = prep.get("input_size")
    if size:
        t = resize(t, (int(size[0]), int(size[1])))
    return t[0]


def to_image_frame(prob: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Probabilities (N, 1, h, w) -> (N, H, W) at the image's size (bilinear)."""
    return resize(prob, tuple(shape))[:, 0]


def mask_to_model(mask: np.ndarray, prep: dict[str, Any]) -> torch.Tensor:
    """A reference mask (H, W) -> float {0, 1} tensor (1, h, w) at the model's input size.

    Any non-zero value is foreground (negative label values too), as documented for masks.
    """
    t = torch.from_numpy((np.asarray(mask) != 0).astype(np.float32))[None, None]
    size = prep.get("input_size")
    if size:
        t = (resize(t, (int(size[0]), int(size[1]))) >= 0.5).float()
    return t[0]
