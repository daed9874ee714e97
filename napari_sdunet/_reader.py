"""napari reader for NIfTI (.nii, .nii.gz) and TIFF stacks.

NIfTI voxel spacing becomes the layer scale and the affine origin its translate (numpy axis order
z, y, x); the full affine and header are kept in the layer metadata (``nifti_affine``,
``nifti_header``) so that a mask drawn or predicted on it can be written back in the scan's space.
Integer files that look like label maps (no negative values, at most 64 distinct values in a
sample) open as Labels layers, everything else as Image layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .io import is_nifti, read_image, stem, suffix

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for NIfTI/TIFF paths, else None (napari then asks other readers)."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(is_nifti(p) or suffix(p) in (".tif", ".tiff") for p in paths):
        return None
    return read_layers


def looks_like_labels(arr: np.ndarray) -> bool:
    """Integer data with no negative values and few distinct values (tested on a sample)."""
    if arr.dtype == bool:
        return True
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return False
    step = max(1, arr.size // 2_000_000)
    sample = arr.reshape(-1)[::step]
    if sample.min() < 0:
        return False
    return len(np.unique(sample)) <= 64


def layer_data(path: str | Path) -> LayerData:
    """One file -> napari LayerData tuple."""
    vol = read_image(path)
    name = stem(path)
    data = vol.data
    kwargs: dict[str, Any] = {"name": name}
    if vol.affine is not None:
        kwargs["scale"] = list(vol.spacing or ())
        kwargs["translate"] = list(vol.origin or ())
        kwargs["metadata"] = {"nifti_affine": np.asarray(vol.affine), "nifti_header": vol.header,
                              "source_path": str(path)}
        kwargs["axis_labels"] = {2: ["y", "x"], 3: ["z", "y", "x"], 4: ["t", "z", "y", "x"]}[data.ndim]
    else:
        kwargs["metadata"] = {"source_path": str(path)}
        labels = [a.lower() for a in vol.axes if a != "C"] if vol.axes else None
        if labels and len(labels) == data.ndim - (1 if vol.axes.endswith("C") else 0):
            kwargs["axis_labels"] = labels
    if looks_like_labels(data) and not vol.axes.endswith("C"):
        return data.astype(np.uint8) if data.dtype == bool else data, kwargs, "labels"
    if vol.axes.endswith("C") and data.shape[-1] in (3, 4):
        kwargs["rgb"] = True
    elif "axis_labels" in kwargs and vol.axes.endswith("C"):
        kwargs.pop("axis_labels")
    return data, kwargs, "image"


def read_layers(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str) else list(path)
    return [layer_data(p) for p in paths]
