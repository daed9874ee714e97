"""Which model suits an image layer: the rules behind the preselected model of Segment and Fine-tune.

In order of preference:

1. the model that last segmented this layer, else the last one used for this kind of layer
   (remembered across restarts, :mod:`napari_sdunet.settings`), if it is still there;
2. otherwise the layer's task by a rule on the layer itself (:func:`task_of_layer`): a 3-D volume,
   HU-range values or a NIfTI source -> liver CT; a colour video or a reddish colour frame ->
   polyps (colonoscopy); anything else (grey, fluorescence, stained tissue) -> nuclei (microscopy);
3. and for that task the shipped model with the best validation Dice recorded in its ``config.json``
   (:func:`napari_sdunet.zoo.best_shipped_for_task`).

The R/B rule was measured on the data: CVC-ClinicDB frames have mean red/blue 1.51-3.65, the
stained DSB2018 images 0.68-1.26, fluorescence images are grey (R = G = B) or dark.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..axes import propose_axes

#: mean red / mean blue at or above which a colour frame counts as colonoscopy
RED_OVER_BLUE = 1.4
#: values this far below zero (and above) are Hounsfield units, not intensities
HU_LOW, HU_HIGH = -200.0, 200.0


def _sample(data: Any, max_values: int = 2_000_000) -> np.ndarray:
    """A strided subsample of ``data`` (numpy, dask or zarr) small enough to look at quickly."""
    shape = tuple(np.shape(data))
    if not shape:
        return np.asarray(data)
    size = int(np.prod(shape))
    if size <= max_values:
        return np.asarray(data)
    step = int(np.ceil((size / max_values) ** (1.0 / max(1, len(shape) - (1 if shape[-1] in (3, 4) else 0)))))
    index = tuple(slice(None, None, step) if (i < len(shape) - 1 or shape[-1] not in (3, 4)) else slice(None)
                  for i in range(len(shape)))
    return np.asarray(data[index])


def _is_nifti(layer: Any) -> bool:
    meta = getattr(layer, "metadata", None) or {}
    if any(str(k).startswith("nifti_") for k in meta):
        return True
    path = str(getattr(getattr(layer, "source", None), "path", None) or "").lower()
    return path.endswith((".nii", ".nii.gz"))


def task_of_layer(layer: Any) -> tuple[str | None, str]:
    """``(task, why)`` for an image layer by the rule above; ``(None, why)`` when there is no data."""
    if layer is None:
        return None, "no image layer"
    shape = tuple(np.shape(layer.data))
    if not shape or 0 in shape:
        return None, "empty layer"
    rgb = bool(getattr(layer, "rgb", False))
    if _is_nifti(layer):
        return "liver", "NIfTI source"
    sample = _sample(layer.data)
    if sample.size and np.issubdtype(sample.dtype, np.number) and not rgb:
        finite = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
        if finite.size and float(finite.min()) <= HU_LOW and float(finite.max()) >= HU_HIGH:
            return "liver", "values in the Hounsfield range"
    colour = propose_axes(shape, rgb=rgb).endswith("C")  # the axes box's rule: one idea of colour
    if not colour and len(shape) >= 3:
        return "liver", f"{len(shape)}-D volume"
    if colour:
        rgbv = sample[..., :3].astype(np.float64)
        r, g, b = (float(rgbv[..., i].mean()) for i in range(3))
        spread = float(np.abs(rgbv[..., 0] - rgbv[..., 2]).mean() + np.abs(rgbv[..., 0] - rgbv[..., 1]).mean())
        if spread < 1e-3 * max(1.0, float(np.abs(rgbv).max())):
            return "nuclei", "grey image (microscopy)"
        if (r + 1e-6) / (b + 1e-6) >= RED_OVER_BLUE:
            video = len(shape) == 4
            return "polyps", ("colour video (colonoscopy)" if video else "reddish colour frame (colonoscopy)")
        return "nuclei", "stained tissue colours (microscopy)"
    return "nuclei", f"{len(shape)}-D grey image (microscopy)"


def preselect(layer: Any, available: list[str]) -> tuple[str | None, str]:
    """``(model_ref, why)``: the model to preselect for ``layer`` among the ``available`` references."""
    from pathlib import Path

    from ..settings import remembered
    from ..zoo import best_shipped_for_task, list_pretrained

    task, why_task = task_of_layer(layer)
    if layer is not None:
        ref, why = remembered(layer, task)
        if ref is not None and (ref in available or (Path(ref) / "config.json").is_file()):
            return ref, why  # a listed model, or a checkpoint folder chosen by hand that still exists
    if task is not None:
        best = best_shipped_for_task(task)
        if best is not None and best in available:
            return best, f"{task}: {why_task}; best-validating shipped {task} model"
    shipped = [n for n in list_pretrained() if n in available]
    if shipped:
        from ..zoo import summary_of

        def val(name: str) -> float:
            v = summary_of(name)["val_dice"]
            return -1.0 if v is None else v

        best = max(shipped, key=val)
        return best, ("no image layer yet: the best-validating shipped model" if layer is None
                      else "no rule applies: the best-validating shipped model")
    return (available[0], "the first model listed") if available else (None, "no model available")
