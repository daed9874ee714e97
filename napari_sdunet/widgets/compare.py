"""The "Compare" widget: TP / FP / FN overlay and Dice, Jaccard, precision, recall per slice and overall.

Colours follow Figure 1 of the paper: true positives white, false positives red, false negatives
blue. Any non-zero label counts as foreground (instance labels are fine). The overlay is a Labels
layer the widget owns; the user's layers are only read. Metrics are recomputed when either layer
is edited (data and paint events, debounced).
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton, Table

from ..metrics import ROW_COLUMNS, metric_rows
from ._common import LayerCombo, layers_of, notify_error

#: overlay values and colours (RGBA): 1 TP white, 2 FP red, 3 FN blue.
TP, FP, FN = 1, 2, 3
COLORS = {TP: (1.0, 1.0, 1.0, 1.0), FP: (1.0, 0.0, 0.0, 1.0), FN: (0.0, 0.3, 1.0, 1.0)}
#: table columns: the four scores, then the pixel counts (see :func:`napari_sdunet.metrics.metric_rows`)
COLUMNS = list(ROW_COLUMNS)


def fixed(value: Any, decimals: int = 4) -> Any:
    """Scores as fixed decimals ('0.0257', never '2.570e-02'); counts and text unchanged."""
    if isinstance(value, (float, np.floating)):
        return "nan" if not np.isfinite(value) else f"{float(value):.{decimals}f}"
    return value


def overlay_codes(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """uint8 map: 0 TN, 1 TP, 2 FP, 3 FN (non-zero = foreground in both inputs)."""
    p = np.asarray(pred) != 0
    r = np.asarray(ref) != 0
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    out = np.zeros(p.shape, dtype=np.uint8)
    out[p & r] = TP
    out[p & ~r] = FP
    out[~p & r] = FN
    return out


class CompareWidget(Container):
    """Plugins > napari-sdunet > Compare."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.reference = LayerCombo(viewer, "labels", "reference")
        self.prediction = LayerCombo(viewer, "labels", "prediction")
        self.live = CheckBox(text="update on edits", value=True)
        self.button = PushButton(text="Compare")
        self.summary = Label(label="", value="pick a reference and a prediction")
        self.table = Table(value={"data": [], "index": [], "columns": COLUMNS})
        self.table.read_only = True
        self.table.min_height = 220  # room for a few per-slice rows
        self._plain_cells()
        self.export_path = FileEdit(label="table file", mode="w", filter="*.csv", value="",
                                    tooltip="a .csv file for the table (scores with four fixed decimals)")
        self.export_button = PushButton(text="Save table")
        super().__init__(widgets=[self.reference, self.prediction, self.live, self.button, self.summary,
                                  self.table, self.export_path, self.export_button], labels=True)
        self._rows: tuple[list[str], list[list[Any]]] = ([], [])
        self.export_button.changed.connect(self._export_clicked)
        self.overlay: Any = None
        self._watched: list[Any] = []
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.update)
        self.button.changed.connect(self.compare)
        self.reference.changed.connect(self._rewatch)
        self.prediction.changed.connect(self._rewatch)
        viewer.layers.events.removed.connect(self._layer_removed)
        viewer.layers.events.inserted.connect(self._default_choice)
        self._default_choice()

    def _plain_cells(self) -> None:
        """Show the cells as the widget formats them: magicgui's table delegate re-reads numbers and
        writes anything below 0.1 in scientific notation (0.0257 -> 2.570e-02)."""
        from qtpy.QtWidgets import QStyledItemDelegate, QTableWidget

        view = self.table.native
        if not isinstance(view, QTableWidget):
            view = view.findChild(QTableWidget)
        if view is not None:
            self._delegate = QStyledItemDelegate(view)
            view.setItemDelegate(self._delegate)

    def displayed_cells(self) -> list[list[str]]:
        """The cell texts as they appear on screen (for tests and scripts)."""
        from qtpy.QtCore import QLocale
        from qtpy.QtWidgets import QTableWidget

        view = self.table.native
        if not isinstance(view, QTableWidget):
            view = view.findChild(QTableWidget)
        delegate = view.itemDelegate()
        return [[delegate.displayText(view.item(r, c).data(0), QLocale()) for c in range(view.columnCount())]
                for r in range(view.rowCount())]

    def _default_choice(self, _event: Any = None) -> None:
        """Propose a prediction different from the reference when there are two Labels layers."""
        labels = [layer for _, layer in layers_of(self.viewer, "labels") if layer is not self.overlay]
        if len(labels) >= 2 and self.reference.value is self.prediction.value:
            self.reference.value = labels[-1]  # oldest: usually the loaded ground truth
            self.prediction.value = labels[0]  # newest: usually the model's mask

    # ---------------------------------------------------------------- wiring edits
    def _rewatch(self, _event: Any = None) -> None:
        for layer in self._watched:
            for ev in (layer.events.data, layer.events.paint, layer.events.labels_update):
                try:
                    ev.disconnect(self._schedule)
                except (TypeError, RuntimeError, ValueError):
                    pass
        self._watched = []
        for layer in (self.reference.value, self.prediction.value):
            if layer is not None and layer is not self.overlay and layer not in self._watched:
                layer.events.data.connect(self._schedule)
                layer.events.paint.connect(self._schedule)
                layer.events.labels_update.connect(self._schedule)
                self._watched.append(layer)

    def _schedule(self, _event: Any = None) -> None:
        if self.live.value and self.overlay is not None:
            self._timer.start()

    def _layer_removed(self, event: Any) -> None:
        if event.value is self.overlay:
            self.overlay = None

    # ---------------------------------------------------------------- computing
    def compare(self, _event: Any = None) -> bool:
        """Build (or refresh) the overlay and the table; False (with a notification) if impossible."""
        ref, pred = self.reference.value, self.prediction.value
        if ref is None or pred is None:
            notify_error("Compare: choose a reference and a prediction Labels layer")
            return False
        if ref is pred:
            notify_error("Compare: the reference and the prediction are the same layer")
            return False
        if np.shape(ref.data) != np.shape(pred.data):
            notify_error(f"Compare: shapes differ: {ref.name} {tuple(np.shape(ref.data))} vs "
                         f"{pred.name} {tuple(np.shape(pred.data))}")
            return False
        self._rewatch()
        return self.update()

    def update(self, _event: Any = None) -> bool:
        """Recompute overlay and metrics from the current layer data."""
        from napari.utils.colormaps import DirectLabelColormap

        ref, pred = self.reference.value, self.prediction.value
        if ref is None or pred is None or ref is pred:
            return False
        try:
            codes = overlay_codes(pred.data, ref.data)
            scored, n_empty = metric_rows(pred.data, ref.data)
        except ValueError as e:
            notify_error(f"Compare: {e}")
            return False
        if self.overlay is None or self.overlay not in self.viewer.layers:
            cmap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), **COLORS})
            self.overlay = self.viewer.add_labels(
                codes, name=f"TP/FP/FN [{pred.name} vs {ref.name}]", colormap=cmap, opacity=0.7,
                scale=ref.scale, translate=ref.translate, axis_labels=getattr(ref, "axis_labels", None))
            self.overlay.editable = False
            self._rewatch()
        else:
            self.overlay.data = codes
        index = [r["row"] for r in scored]
        shown = [[fixed(r[c]) for c in COLUMNS] for r in scored]  # no 1e-05 in the table
        self.table.value = {"data": shown, "index": index, "columns": COLUMNS}
        self._rows = (index, shown)
        overall = {c: scored[-1][c] for c in COLUMNS}
        self.overlay.name = f"TP/FP/FN [{pred.name} vs {ref.name}] Dice {fixed(overall['dice'], 3)}"
        self.summary.value = (f"Dice {fixed(overall['dice'])}  Jaccard {fixed(overall['jaccard'])}  "
                              f"precision {fixed(overall['precision'])}  recall {fixed(overall['recall'])}"
                              + (f"  ({n_empty} slice(s) empty in both not listed)" if n_empty else ""))
        self.metrics = overall
        return True

    # ---------------------------------------------------------------- export
    def export_csv(self, path: Any) -> Any:
        """Write the table (one row per slice/frame, then overall) as CSV with fixed decimals."""
        import csv
        from pathlib import Path

        index, rows = self._rows
        if not rows:
            raise ValueError("nothing to save yet: press Compare first")
        path = Path(path).expanduser()
        if path.suffix.lower() != ".csv":
            path = path.with_suffix(".csv")
        ref, pred = self.reference.value, self.prediction.value
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["reference", "prediction", "rows", *COLUMNS])
            for name, row in zip(index, rows):
                w.writerow([getattr(ref, "name", ""), getattr(pred, "name", ""), name, *[fixed(v) for v in row]])
        return path

    def _export_clicked(self, _event: Any = None) -> None:
        from ._common import notify_info

        value = str(self.export_path.value or "")
        if not value or value == ".":
            notify_error("Compare: choose a table file (.csv) first")
            return
        try:
            path = self.export_csv(value)
        except (OSError, ValueError) as e:
            notify_error(f"Compare: cannot save the table: {e}")
            return
        notify_info(f"Compare: table saved to {path}")
