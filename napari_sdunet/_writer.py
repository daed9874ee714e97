"""napari writer for Labels layers: NIfTI (.nii.gz / .nii) with the source affine, or TIFF.

A layer made by the Segment widget (or read from NIfTI) carries ``nifti_affine`` / ``nifti_header``
in its metadata; they are written back so that the mask lines up with its scan. Otherwise the
affine is built from the layer's scale and translate. Files are written atomically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .io import is_nifti, suffix, write_image, write_nifti


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``path`` (.nii.gz, .nii, .tif, .tiff); return the written path."""
    arr = np.asarray(data)
    meta = attributes.get("metadata") or {}
    if is_nifti(path):
        out = write_nifti(path, arr, affine=meta.get("nifti_affine"), header=meta.get("nifti_header"),
                          spacing=tuple(attributes.get("scale") or ()) or None,
                          origin=tuple(attributes.get("translate") or ()) or None)
        return [str(out)]
    if suffix(path) in (".tif", ".tiff"):
        return [str(write_image(path, arr))]
    return []
