"""Test-set evaluation in the metric conventions of napari_sdunet.metrics (documented in RESULTS.md).

2-D tasks: per-image Dice/Jaccard (mean ± sd), global Dice, the paper's batch-pooled Dice, scored at
the reference size of the task (the preset's input size); a model trained at another input size is
fed resized images and its probabilities are resized back. CT: per-volume 3-D Dice at the volume's
own in-plane resolution (slices predicted at the model size, probabilities resized back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from napari_sdunet.inference import predict_prepared
from napari_sdunet.metrics import dice as dice_score
from napari_sdunet.metrics import jaccard as jaccard_score
from napari_sdunet.metrics import summarize
from napari_sdunet.preprocess import resize

from .datasets import SegDataset, ct_prep, volume_set


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, model_size: Sequence[int] | None,
                  batch_size: int = 16, flip_tta: bool = False,
                  should_stop: Callable[[], bool] | None = None, prep: dict[str, Any] | None = None) -> torch.Tensor:
    """Probabilities (N, 1, H, W) at the images' size, by the engine's
    :func:`~napari_sdunet.inference.predict_prepared` (the plugin's rule): inputs resized to
    ``model_size``, or ``prep`` when given (e.g. a ``mode: tiles`` model's)."""
    model.eval()
    dev = next(model.parameters()).device
    prep = prep or {"input_size": list(model_size) if model_size else None}
    out = []
    for i in range(0, len(images), batch_size):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("cancelled")
        x = images[i:i + batch_size]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        out.append(predict_prepared(model, x.to(dev), prep, flip_tta).cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_2d(model: torch.nn.Module, data: SegDataset, model_size: Sequence[int], flip_tta: bool = False,
                batch_size: int = 16, threshold: float = 0.5) -> dict[str, Any]:
    """Scores of ``model`` on a 2-D test set (see the module docstring)."""
    probs = predict_probs(model, data.images, model_size, batch_size, flip_tta)
    preds = (probs[:, 0] > threshold).numpy()
    refs = (data.masks[:, 0] > 0).numpy()
    res: dict[str, Any] = summarize(list(preds), list(refs), paper_batch_size=20)
    res["eval_size"] = list(data.images.shape[-2:])
    res["flip_tta"] = flip_tta
    return res


def evaluate_volumes(model: torch.nn.Module, volumes: list[tuple[str, np.ndarray, np.ndarray]],
                     model_size: Sequence[int], ct_window: Sequence[float], flip_tta: bool = False,
                     batch_size: int = 16, threshold: float = 0.5) -> dict[str, Any]:
    """Per-volume 3-D Dice/Jaccard (mean ± sd over volumes) + the 2-D slice summary at the model size."""
    per_vol = []
    slice_preds, slice_refs = [], []
    for vid, ct, mask in volumes:
        slices = volume_set(vid, ct, mask, ct_prep(model_size, ct_window))
        probs = predict_probs(model, slices.images, model_size, batch_size, flip_tta)
        slice_preds += list((probs[:, 0] > threshold).numpy())
        slice_refs += list((slices.masks[:, 0] > 0).numpy())
        full = resize(probs, tuple(mask.shape[-2:]))[:, 0].numpy() > threshold
        per_vol.append({"id": vid, "dice_3d": dice_score(full, mask), "jaccard_3d": jaccard_score(full, mask),
                        "slices": int(mask.shape[0])})
    d3 = [v["dice_3d"] for v in per_vol]
    j3 = [v["jaccard_3d"] for v in per_vol]
    res: dict[str, Any] = {
        "n_volumes": len(per_vol), "dice_3d": float(np.mean(d3)), "dice_3d_sd": float(np.std(d3)),
        "jaccard_3d": float(np.mean(j3)), "jaccard_3d_sd": float(np.std(j3)), "volumes": per_vol,
        "slices_2d": summarize(slice_preds, slice_refs, paper_batch_size=20), "ct_window": list(ct_window),
        "flip_tta": flip_tta,
    }
    return res
