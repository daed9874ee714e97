"""The Compare widget: overlay colours and metrics on a hand-made case, live updates, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sdunet.widgets import CompareWidget
from napari_sdunet.widgets.compare import COLUMNS, FN, FP, TP, fixed, overlay_codes


def _case():
    """10x10 reference with a 4x4 square; prediction shifted right by 2: TP 8, FP 8, FN 8."""
    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 4:8] = 7  # any non-zero label counts
    return ref, pred


def test_overlay_codes_by_hand():
    ref, pred = _case()
    codes = overlay_codes(pred, ref)
    assert codes[3, 4] == TP and codes[3, 7] == FP and codes[3, 2] == FN and codes[0, 0] == 0
    assert [(codes == v).sum() for v in (TP, FP, FN)] == [8, 8, 8]
    with pytest.raises(ValueError, match="differs"):
        overlay_codes(pred, ref[:5])


def test_table_rows_are_the_metrics_modules(make_napari_viewer, errors):
    """The widget shows napari_sdunet.metrics.metric_rows, formatted: it computes nothing itself."""
    from napari_sdunet.metrics import metric_rows

    ref, pred = _case()
    ref3 = np.stack([ref, np.zeros_like(ref), ref])
    pred3 = np.stack([pred, np.zeros_like(pred), ref])
    viewer = make_napari_viewer()
    viewer.add_labels(ref3, name="truth")
    viewer.add_labels(pred3, name="model")
    w = CompareWidget(viewer)
    assert w.compare()
    rows, n_empty = metric_rows(pred3, ref3)
    assert w.table.row_headers == tuple(r["row"] for r in rows) == ("slice 0", "slice 2", "overall")
    assert w.displayed_cells() == [[str(fixed(r[c])) for c in COLUMNS] for r in rows]
    assert "1 slice(s) empty in both not listed" in w.summary.value and n_empty == 1


def test_compare_widget_overlay_colours_table_and_live_update(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    ref, pred = _case()
    ref_layer = viewer.add_labels(ref, name="truth", scale=(2.0, 3.0))
    pred_layer = viewer.add_labels(pred, name="model", scale=(2.0, 3.0))
    w = CompareWidget(viewer)
    assert w.reference.value is ref_layer and w.prediction.value is pred_layer  # proposed: oldest vs newest
    assert w.compare()
    overlay = w.overlay
    assert overlay is viewer.layers[-1] and np.allclose(overlay.scale, (2.0, 3.0))
    colours = overlay.colormap.map(np.array([TP, FP, FN]))
    np.testing.assert_allclose(colours[0], [1, 1, 1, 1], atol=1e-6)  # white
    np.testing.assert_allclose(colours[1][:3], [1, 0, 0], atol=1e-6)  # red
    assert colours[2][2] == 1 and colours[2][0] == 0  # blue
    assert w.table.row_headers == ("overall",) and w.metrics["dice"] == 0.5
    assert "Dice 0.5000" in w.summary.value
    assert np.array_equal(ref_layer.data, ref) and np.array_equal(pred_layer.data, pred)  # only read
    # the user corrects the prediction with the brush: a paint event updates the metrics
    pred_layer.paint((3, 2), 7, refresh=True)  # fills FN pixels around (3, 2)
    qtbot.waitUntil(lambda: w.metrics["recall"] > 0.5, timeout=5000)
    assert w.metrics["FN"] < 8
    # replacing the data (data event) updates too
    pred_layer.data = ref.copy()
    qtbot.waitUntil(lambda: w.metrics["dice"] == 1.0, timeout=5000)
    assert (overlay.data == FP).sum() == 0 and len(viewer.layers) == 3
    assert errors == []


def test_compare_3d_rows(make_napari_viewer):
    viewer = make_napari_viewer()
    ref, pred = _case()
    viewer.add_labels(np.stack([ref] * 3), name="truth")
    viewer.add_labels(np.stack([pred, ref, np.zeros_like(ref)]), name="model")
    w = CompareWidget(viewer)
    assert w.compare()
    assert w.table.row_headers == ("slice 0", "slice 1", "slice 2", "overall")
    # overall pools the slices: TP 8 + 16 + 0, FP 8 + 0 + 0, FN 8 + 0 + 16 -> Dice 48 / 80
    assert [row[0] for row in w.table.data] == ["0.5000", "1.0000", "0.0000", "0.6000"]
    assert w.metrics["dice"] == 0.6
    assert list(w.table.data[3][4:]) == [24, 8, 24]


def test_compare_mismatched_shapes_notifies(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="a")
    viewer.add_labels(np.zeros((12, 10), np.uint8), name="b")
    w = CompareWidget(viewer)
    assert not w.compare()
    assert len(errors) == 1 and "shapes differ" in errors[0] and len(viewer.layers) == 2


def test_small_scores_are_fixed_decimals_in_table_layer_name_and_export(make_napari_viewer, tmp_path, errors):
    """Dice 0.0257 is shown as 0.0257 (never 2.570e-02): table, summary, overlay name, CSV export."""
    import csv

    ref = np.zeros((100, 100), np.uint8)
    ref[:, :39] = 1  # 3900 pixels
    pred = np.zeros((100, 100), np.uint8)
    pred[:1, :51] = 1  # 51 pixels, of which 39 are TP -> Dice 2*39 / 3951 = 0.0197
    viewer = make_napari_viewer()
    viewer.add_labels(ref, name="truth")
    viewer.add_labels(pred, name="model")
    w = CompareWidget(viewer)
    assert w.compare()
    cells = [str(c) for row in w.table.data for c in row]
    assert "0.0197" in cells and not any("e-" in c for c in cells)
    shown = [c for row in w.displayed_cells() for c in row]  # what the screen shows, not just the data
    assert shown[:4] == ["0.0197", "0.0100", "0.7647", "0.0100"] and not any("e-" in c for c in shown)
    assert "Dice 0.0197" in w.summary.value and "e-" not in w.summary.value
    assert w.overlay.name.endswith("Dice 0.020") and "e-" not in w.overlay.name
    with pytest.raises(ValueError, match="nothing to save"):
        CompareWidget(make_napari_viewer()).export_csv(tmp_path / "none.csv")
    w.export_path.value = tmp_path / "table"
    w.export_button.changed.emit(True)
    rows = list(csv.reader(open(tmp_path / "table.csv")))
    assert rows[0] == ["reference", "prediction", "rows", "dice", "jaccard", "precision", "recall", "TP", "FP", "FN"]
    assert rows[1][:4] == ["truth", "model", "overall", "0.0197"] and rows[1][7:] == ["39", "12", "3861"]
    assert not any("e-" in c for r in rows for c in r) and errors == []
