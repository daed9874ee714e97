"""A small live plot for the Fine-tune widget: training loss and validation Dice against steps.

Painted with QPainter (no matplotlib/pyqtgraph import at widget start): a few hundred points are
redrawn in well under a millisecond, and the colours follow the widget's palette (napari themes).
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOUR = QColor(255, 150, 50)
DICE_COLOUR = QColor(80, 200, 255)


class TrainingPlot(QWidget):
    """Loss (left axis: per step faint, mean between validations bold, orange) and validation Dice
    (right axis 0..1, blue dots) against the step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("orange: training loss (left axis; faint per step, bold mean between validations); "
                        "blue: validation Dice (right axis, 0-1; the first point is the base model)")
        self.reset()

    def reset(self, total_steps: int = 0) -> None:
        """Clear the curves; ``total_steps`` sets the x range (grows if exceeded)."""
        self.loss: list[tuple[int, float]] = []
        self.mean_loss: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.total = max(0, int(total_steps))
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.loss.append((int(step), float(loss)))
            self.update()

    def add_mean_loss(self, step: int, loss: float) -> None:
        """The mean loss since the previous validation (drawn bold over the per-step loss)."""
        if math.isfinite(loss):
            self.mean_loss.append((int(step), float(loss)))
            self.update()

    def add_dice(self, step: int, dice: float) -> None:
        if math.isfinite(dice):
            self.dice.append((int(step), float(dice)))
            self.update()

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        fg = pal.color(pal.ColorRole.WindowText)
        grid = QColor(fg)
        grid.setAlpha(50)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        fm = p.fontMetrics()
        left, right, top, bottom = fm.horizontalAdvance("0.000") + 10, fm.horizontalAdvance("1.0") + 12, \
            fm.height() + 8, fm.height() + 8
        area = QRectF(left, top, max(10.0, self.width() - left - right), max(10.0, self.height() - top - bottom))

        x_max = max([self.total, 1] + [s for s, _ in self.loss] + [s for s, _ in self.dice])
        loss_max = max([v for _, v in self.loss], default=1.0) * 1.05 or 1.0

        def px(step: float) -> float:
            return area.left() + area.width() * step / x_max

        def py_loss(v: float) -> float:
            return area.bottom() - area.height() * min(v, loss_max) / loss_max

        def py_dice(v: float) -> float:
            return area.bottom() - area.height() * max(0.0, min(1.0, v))

        # frame, grid and tick labels
        p.setPen(QPen(grid, 1))
        for i in range(5):
            y = area.top() + area.height() * i / 4
            p.drawLine(QPointF(area.left(), y), QPointF(area.right(), y))
        p.setPen(QPen(fg, 1))
        p.drawRect(area)
        p.setPen(LOSS_COLOUR)
        for i in range(5):
            v = loss_max * (4 - i) / 4
            y = area.top() + area.height() * i / 4
            p.drawText(QRectF(0, y - fm.height() / 2, left - 4, fm.height()),
                       int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{v:.3g}")
        p.setPen(DICE_COLOUR)
        for i in range(5):
            y = area.top() + area.height() * i / 4
            p.drawText(QRectF(area.right() + 4, y - fm.height() / 2, right, fm.height()),
                       int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), f"{(4 - i) / 4:.2g}")
        p.setPen(fg)
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   int(Qt.AlignmentFlag.AlignHCenter), f"step (of {x_max})")
        p.drawText(QRectF(area.left(), 0, area.width(), top - 2),
                   int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom), self._title())

        # curves
        faint = QColor(LOSS_COLOUR)
        faint.setAlpha(110)
        for points, pen in ((self.loss, QPen(faint, 1.0)), (self.mean_loss, QPen(LOSS_COLOUR, 2.2))):
            if len(points) > 1:
                path = QPainterPath(QPointF(px(points[0][0]), py_loss(points[0][1])))
                for s, v in points[1:]:
                    path.lineTo(QPointF(px(s), py_loss(v)))
                p.setPen(pen)
                p.drawPath(path)
        if self.dice:
            p.setPen(QPen(DICE_COLOUR, 1.5))
            for (s0, v0), (s1, v1) in zip(self.dice, self.dice[1:]):
                p.drawLine(QPointF(px(s0), py_dice(v0)), QPointF(px(s1), py_dice(v1)))
            p.setBrush(DICE_COLOUR)
            for s, v in self.dice:
                p.drawEllipse(QPointF(px(s), py_dice(v)), 2.5, 2.5)
        p.end()

    def _title(self) -> str:
        parts = []
        if self.mean_loss or self.loss:
            parts.append(f"loss {(self.mean_loss or self.loss)[-1][1]:.3f}")
        if self.dice:
            parts.append(f"val Dice: before {self.dice[0][1]:.3f}, best {max(v for _, v in self.dice):.3f}, "
                         f"last {self.dice[-1][1]:.3f}")
        return "   ".join(parts) or "loss and validation Dice appear here while training"
