"""Overlap metrics for binary masks, in the conventions our reports name explicitly.

* per-image Dice / Jaccard: one value per image, empty prediction + empty reference = 1;
* global Dice: all pixels of all images pooled;
* paper (batch-pooled) Dice: the authors' smoothed Dice over each test batch, averaged over batches;
* per-slice rows: the scores of each slice/frame (first axis) of a volume, then the whole.

Pure numpy, so the Compare widget, ``napari-sdunet evaluate`` and the benchmarks score alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


#: The scores :func:`scores` gives, in the order tables show them; rows add the counts TP, FP, FN.
SCORE_NAMES = ("dice", "jaccard", "precision", "recall")
ROW_COLUMNS = (*SCORE_NAMES, "TP", "FP", "FN")


def slice_confusion(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(TP, FP, FN) per slice along the first axis, shape (n, 3); non-zero is foreground."""
    p = np.asarray(pred) != 0
    r = np.asarray(ref) != 0
    if p.shape != r.shape:
        raise InputError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if p.ndim < 3:
        raise InputError(f"slices need a 3-D or larger mask, got shape {p.shape}")
    p = p.reshape(p.shape[0], -1)
    r = r.reshape(r.shape[0], -1)
    return np.stack([np.count_nonzero(p & r, axis=1), np.count_nonzero(p & ~r, axis=1),
                     np.count_nonzero(~p & r, axis=1)], axis=1).astype(np.int64)


def score_row(name: str, tp: int, fp: int, fn: int) -> dict[str, Any]:
    """One table row: its name (``"slice 3"``, ``"overall"``), the four scores and the counts."""
    return {"row": name, **scores(tp, fp, fn), "TP": int(tp), "FP": int(fp), "FN": int(fn)}


def metric_rows(pred: np.ndarray, ref: np.ndarray, per_slice: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Rows of :func:`score_row`: one per slice (3-D+ masks) with foreground in either mask, then
    ``"overall"`` (all pixels pooled). Also returns how many slices were empty in both and left
    out (their scores would all be 1 and bury the slices that matter)."""
    rows: list[dict[str, Any]] = []
    n_empty = 0
    if np.ndim(pred) >= 3:
        counts = slice_confusion(pred, ref)
        if per_slice:
            for k, (tp, fp, fn) in enumerate(counts.tolist()):
                if tp + fp + fn == 0:
                    n_empty += 1
                else:
                    rows.append(score_row(f"slice {k}", tp, fp, fn))
        total = counts.sum(axis=0).tolist()
    else:
        p = np.asarray(pred) != 0
        r = np.asarray(ref) != 0
        if p.shape != r.shape:
            raise InputError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
        total = [int(np.count_nonzero(p & r)), int(np.count_nonzero(p & ~r)), int(np.count_nonzero(~p & r))]
    rows.append(score_row("overall", *total))
    return rows, n_empty


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
