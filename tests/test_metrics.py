import numpy as np
import pytest

from napari_sdunet import metrics


def test_hand_made_case():
    ref = np.zeros((4, 4), bool)
    ref[:2, :2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True  # 4 px, 2 overlap
    tp, fp, fn, tn = metrics.confusion(pred, ref)
    assert (tp, fp, fn, tn) == (2, 2, 2, 10)
    s = metrics.scores(tp, fp, fn)
    assert s["dice"] == pytest.approx(0.5) and s["jaccard"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)


def test_empty_empty_is_one_and_shape_mismatch_raises():
    z = np.zeros((3, 3), bool)
    assert metrics.dice(z, z) == 1.0 and metrics.jaccard(z, z) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(z, np.zeros((3, 4), bool))


def test_summary_conventions_differ_as_documented():
    big = np.ones((10, 10), bool)
    small_ref = np.zeros((10, 10), bool)
    small_ref[0, 0] = True
    small_pred = np.zeros((10, 10), bool)  # missed the tiny object
    s = metrics.summarize([big, small_pred], [big, small_ref], paper_batch_size=2)
    assert s["dice"] == pytest.approx(0.5)  # per image: 1 and 0
    assert s["global_dice"] == pytest.approx(200 / 201)  # pooled pixels hide the miss
    assert s["paper_batch_dice"] == pytest.approx(2 * 101 / 202)


def _square_case():
    """10x10 reference with a 4x4 square; prediction shifted right by 2: TP 8, FP 8, FN 8."""
    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.int32)
    pred[2:6, 4:8] = 7  # any non-zero label counts
    return ref, pred


def test_metric_rows_2d_is_one_overall_row():
    ref, pred = _square_case()
    rows, n_empty = metrics.metric_rows(pred, ref)
    assert n_empty == 0 and [r["row"] for r in rows] == ["overall"]
    row = rows[0]
    assert list(row) == ["row", *metrics.ROW_COLUMNS]
    assert (row["TP"], row["FP"], row["FN"]) == (8, 8, 8)
    assert row["dice"] == 0.5 and row["jaccard"] == pytest.approx(1 / 3) and row["precision"] == row["recall"] == 0.5


def test_metric_rows_per_slice_by_hand():
    ref, pred = _square_case()
    ref3 = np.stack([ref, np.zeros_like(ref), ref, ref])
    pred3 = np.stack([pred, np.zeros_like(pred), ref, np.zeros_like(ref)])
    rows, n_empty = metrics.metric_rows(pred3, ref3)
    assert [r["row"] for r in rows] == ["slice 0", "slice 2", "slice 3", "overall"] and n_empty == 1
    assert [r["dice"] for r in rows[:3]] == [0.5, 1.0, 0.0]
    # overall pools the pixels: TP 8 + 16 + 0, FP 8, FN 8 + 16 -> Dice 48 / 80
    assert (rows[-1]["TP"], rows[-1]["FP"], rows[-1]["FN"]) == (24, 8, 24) and rows[-1]["dice"] == 0.6
    assert rows[-1] == metrics.score_row("overall", *metrics.confusion(pred3, ref3)[:3])
    only_total, n = metrics.metric_rows(pred3, ref3, per_slice=False)
    assert only_total == rows[-1:] and n == 0
    # a 4-D (frames of colour-less slices) mask: a slice is everything under the first axis
    rows4, _ = metrics.metric_rows(pred3[:, None], ref3[:, None])
    assert rows4 == rows


def test_slice_confusion_checks_its_input():
    counts = metrics.slice_confusion(np.ones((2, 3, 3)), np.zeros((2, 3, 3)))
    assert counts.tolist() == [[0, 9, 0], [0, 9, 0]]
    with pytest.raises(metrics.InputError, match="differs"):
        metrics.slice_confusion(np.ones((2, 3, 3)), np.ones((2, 3, 4)))
    with pytest.raises(metrics.InputError, match="3-D"):
        metrics.slice_confusion(np.ones((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="differs"):
        metrics.metric_rows(np.ones((3, 3)), np.ones((3, 4)))
