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
