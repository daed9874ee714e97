"""Overlap metrics for binary masks, in the conventions our reports name explicitly.

* per-image Dice / Jaccard: one value per image, empty prediction + empty reference = 1;
* global Dice: all pixels of all images pooled;
* paper (batch-pooled) Dice: the authors' smoothed Dice over each test batch, averaged over batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import InputError


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) pixel counts of two boolean masks of the same shape."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return tp, fp, fn, pred.size - tp - fp - fn


def scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, Jaccard, precision and recall from counts; an empty/empty case scores 1."""
    def ratio(num: float, den: float) -> float:
        return 1.0 if den == 0 else num / den

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    tp, fp, fn, _ = confusion(pred, ref)
    return scores(tp, fp, fn)["dice"]


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard (IoU) of two binary masks (1.0 when both are empty)."""
    tp, fp, fn, _ = confusion(pred, ref)
    return scores(tp, fp, fn)["jaccard"]


def paper_batch_dice(pred: np.ndarray, ref: np.ndarray, smooth: float = 1.0) -> float:
    """The authors' Dice on one batch: 2(I+1)/(|P|+|G|+1) over all pixels, 1 if both empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    inter = np.count_nonzero(pred & ref)
    p, g = np.count_nonzero(pred), np.count_nonzero(ref)
    if p == 0 and g == 0:
        return 1.0
    return 2 * (inter + smooth) / (p + g + smooth)


def summarize(preds: Iterable[np.ndarray], refs: Iterable[np.ndarray],
              paper_batch_size: int = 20) -> dict[str, float]:
    """Per-image mean ± sd Dice/Jaccard, global Dice and batch-pooled paper Dice of mask pairs."""
    per_dice, per_jac, batch_dice = [], [], []
    tot = np.zeros(3, dtype=np.int64)
    batch_p: list[np.ndarray] = []
    batch_r: list[np.ndarray] = []

    def flush() -> None:
        if batch_p:
            batch_dice.append(paper_batch_dice(np.concatenate(batch_p), np.concatenate(batch_r)))
            batch_p.clear()
            batch_r.clear()

    for p, r in zip(preds, refs, strict=True):
        tp, fp, fn, _ = confusion(p, r)
        s = scores(tp, fp, fn)
        per_dice.append(s["dice"])
        per_jac.append(s["jaccard"])
        tot += (tp, fp, fn)
        batch_p.append(np.asarray(p, bool).ravel())
        batch_r.append(np.asarray(r, bool).ravel())
        if len(batch_p) == paper_batch_size:
            flush()
    flush()
    if not per_dice:
        raise InputError("no images to score")
    g = scores(*tot.tolist())
    return {
        "n": len(per_dice),
        "dice": float(np.mean(per_dice)), "dice_sd": float(np.std(per_dice)),
        "jaccard": float(np.mean(per_jac)), "jaccard_sd": float(np.std(per_jac)),
        "global_dice": g["dice"], "global_jaccard": g["jaccard"],
        "paper_batch_dice": float(np.mean(batch_dice)),
    }
