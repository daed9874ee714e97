"""The "Fine-tune" widget: train a model further on image + corrected-Labels layer pairs.

The user corrects a prediction with napari's brushes, picks the (image, labels) pairs, the base
model and a few settings, and presses Fine-tune. The engine (:func:`napari_sdunet.finetune.finetune`,
the same training loop as ``training/``) runs in a thread; the widget plots the loss and the
validation Dice live, can cancel (nothing is saved then), and writes the new model to the user
models folder, where the model lists of this and every other napari-sdunet widget pick it up at once
(and after a restart). Layers are copied when the run starts, so painting during training is safe.
Closing the viewer cancels a run and waits until the training thread has stopped (nothing is saved).
"""

from __future__ import annotations

import datetime as _dt
import math
import queue
import re
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)

from ..axes import propose_layer_axes
from ..events import Progress
from ._common import JobRunner, LayerCombo, ModelPicker, device_combo, notify_error

LR_CHOICES = [("1e-5", 1e-5), ("3e-5", 3e-5), ("1e-4", 1e-4), ("3e-4", 3e-4), ("1e-3", 1e-3), ("3e-3", 3e-3)]

if TYPE_CHECKING:
    from ..finetune import FinetuneConfig


def parse_frames(text: str) -> list[int]:
    """'0, 4-6' -> [0, 4, 5, 6] (frames the user marks as checked even if their labels are empty)."""
    out: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"cannot read frames {text!r}: use numbers and ranges such as 0, 4-6")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"frame range {part} runs backwards")
        out.update(range(a, b + 1))
    return sorted(out)


def labelled_count(labels: Any) -> int:
    """Slices/frames of a Labels layer's data with any painted pixel (a 2-D layer counts as 1)."""
    arr = np.asarray(labels)
    if arr.ndim <= 2:
        return 1
    return int(np.count_nonzero(arr.reshape(-1, *arr.shape[-2:]).any(axis=(1, 2))))


class PairRow(Container):
    """One training pair: image layer, its corrected Labels layer, optional marked frames."""

    def __init__(self, viewer: napari.viewer.Viewer, number: int) -> None:
        self.image_combo = LayerCombo(viewer, "image", "image")
        self.labels_combo = LayerCombo(viewer, "labels", "labels")
        self.frames = LineEdit(label="also frames", value="",
                               tooltip="stacks/videos: slices or frames to use even though their labels are "
                                       "empty (checked, nothing there), e.g. 0, 4-6")
        self.info = Label(label="", value="")
        self.remove_button = PushButton(text="Remove pair")
        super().__init__(widgets=[self.image_combo, self.labels_combo, self.frames, self.info, self.remove_button],
                         labels=True, label=f"pair {number}")
        for w in (self.image_combo, self.labels_combo, self.frames):
            w.changed.connect(self.update_info)
        self.update_info()

    def update_info(self, _event: Any = None) -> None:
        image, labels = self.image_combo.value, self.labels_combo.value
        if image is None or labels is None:
            self.info.value = "choose an image and its corrected labels"
            return
        axes = propose_layer_axes(image)
        from ..inference import spatial_shape

        spatial = spatial_shape(np.shape(image.data), axes) if axes else tuple(np.shape(image.data))
        if tuple(np.shape(labels.data)) != spatial:
            self.info.value = f"labels shape {tuple(np.shape(labels.data))} ≠ image {spatial}: pick matching layers"
            return
        try:
            n = labelled_count(labels.data)
        except (TypeError, ValueError):
            n = 0
        self.info.value = f"axes {axes or '?'}: {n} labelled frame(s)"

    def item(self) -> Any:
        """A :class:`~napari_sdunet.finetune.LabelledImage` with copies of the layers' data."""
        from ..finetune import LabelledImage

        image, labels = self.image_combo.value, self.labels_combo.value
        if image is None or labels is None:
            raise ValueError(f"{self.label}: choose an image layer and a Labels layer")
        if getattr(image, "multiscale", False) or getattr(labels, "multiscale", False):
            raise ValueError(f"{self.label}: multiscale layers cannot be used; add one level as its own layer")
        axes = propose_layer_axes(image)
        if not axes:
            raise ValueError(f"{self.label}: cannot tell the axes of {image.name} (shape {np.shape(image.data)})")
        return LabelledImage(np.array(image.data, copy=True), np.array(labels.data, copy=True), axes,
                             frames=parse_frames(self.frames.value), name=f"{image.name} / {labels.name}")


class FinetuneRunner(JobRunner):
    """The shared job runner, with Cancel that asks the training loop to stop (so nothing is saved)."""

    def __init__(self, run_button: PushButton, viewer: napari.viewer.Viewer | None = None) -> None:
        self.stop_event = threading.Event()
        super().__init__(run_button, viewer)

    def cancel(self, _event: Any = None) -> None:
        """Stop after the current step; the run then reports that it saved nothing."""
        if self.worker is not None:
            self.status.value = "cancelling (after the current step)..."
            self.stop_event.set()

    def _stop_job(self) -> None:  # closing the viewer: stop training and the relay at once
        self.stop_event.set()
        super()._stop_job()


def finetune_job(stop: threading.Event, reports: list, base: str, items: list, output: str,
                 val_items: list | None, config: FinetuneConfig, device: str = "auto", overwrite: bool = False,
                 ) -> Generator[Progress, None, Any]:
    """Run :func:`~napari_sdunet.finetune.finetune` in a helper thread and relay its progress.

    Training reports (``Progress``) are appended to ``reports`` for the plot; the yielded ``"status"``
    reports (``step`` of ``total_steps``, ``message``) drive the progress bar (steps, or seconds of
    the time budget when that ends the run first) and the status line (step, loss, held-out Dice).
    However this generator ends (result, error, or closed by the worker on cancel), the training
    thread is stopped and joined.
    """
    from ..finetune import finetune

    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}
    budget = config.time_budget_s

    def target() -> None:
        try:
            box["result"] = finetune(base, items, output, config, val_data=val_items, device=device,
                                     overwrite=overwrite, should_stop=stop.is_set, on_progress=q.put)
        except BaseException as e:  # handed to the worker thread, which reports it
            box["error"] = e

    thread = threading.Thread(target=target, name="napari-sdunet-finetune", daemon=True)
    thread.start()
    t0 = time.perf_counter()
    done, total, status, loss, val, best = 0, 0, "starting...", math.nan, math.nan, math.nan
    try:
        while thread.is_alive() or not q.empty():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is not None and item.kind == "status":
                status = item.message
            elif item is not None:
                reports.append(item)
                done, total = item.step, item.total_steps
                if item.kind == "step":
                    loss = item.loss
                elif item.kind == "val":
                    val = item.val_dice
                    best = item.best_val_dice
                if item.kind != "done" and done > 0:
                    status = (f"step {done}: loss {loss:.4f}, held-out Dice {val:.3f} (best {best:.3f})"
                              + (f", {time.perf_counter() - t0:.0f} of {budget:.0f} s" if budget else ""))
            elapsed = time.perf_counter() - t0
            if budget and (not total or elapsed / budget > done / max(total, 1)):
                yield Progress("status", int(elapsed), int(budget), message=status)  # the budget ends it first
            else:
                yield Progress("status", done, total, message=status)
    finally:
        if thread.is_alive():  # closed early (cancel, viewer closing): stop training
            stop.set()
        thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class FinetuneWidget(Container):
    """Plugins > napari-sdunet > Fine-tune."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        from ..finetune import FinetuneConfig

        d = FinetuneConfig()  # the defaults of the CLI and the benchmarks too

        self.viewer = viewer
        self.pairs = Container(widgets=[], labels=False)
        self.add_pair_button = PushButton(text="Add pair")
        self.models = ModelPicker(label="base model")
        self.length_unit = ComboBox(label="train for", choices=["steps", "epochs"], value="steps")
        self.length = SpinBox(label="how many", min=1, max=100_000, value=d.steps,
                              tooltip="at most this many; the time budget or no better held-out Dice may stop "
                                      "the run earlier (the best held-out weights are kept)")
        self.time_budget = SpinBox(label="time budget (s)", min=0, max=86_400, step=30,
                                   value=int(d.time_budget_s),
                                   tooltip="the whole run (preparing, training, measuring, saving) ends within "
                                           "about this many seconds; 0: no limit")
        self.lr = ComboBox(label="learning rate", choices=LR_CHOICES, value=d.lr)
        self.batch_size = SpinBox(label="batch size", min=1, max=256, value=d.batch_size)
        self.trainable = ComboBox(label="train", choices=[("all weights", "all"), ("decoder only", "decoder")],
                                  value="all")
        self.augment = CheckBox(text="augment (flips, rotations, intensity; CT: zoom, intensity)", value=True)
        self.freeze_bn = CheckBox(text="keep the base model's BatchNorm statistics", value=True,
                                  tooltip="recommended for a few frames; untick when the new images look very "
                                          "different (other stain, camera) and you have many labelled frames")
        self.val_mode = ComboBox(label="validation", value="end",
                                 choices=[("the last frames (fraction)", "end"), ("random frames (fraction)", "random"),
                                          ("a chosen pair", "pair")],
                                 tooltip="frames held out to measure Dice and keep the best weights; in a video the "
                                         "last frames are less alike the training frames than random ones")
        self.val_fraction = FloatSpinBox(label="fraction", min=0.0, max=0.9, step=0.05, value=d.val_fraction)
        self.val_pair = SpinBox(label="pair number", min=1, max=1, value=1, visible=False)
        self.device = device_combo()
        self.model_name = LineEdit(label="new model name", value="",
                             tooltip="folder name in the user models folder; empty: <base>-ft-<date-time>")
        self.overwrite = CheckBox(text="replace a model of that name", value=False)
        self.run_button = PushButton(text="Fine-tune")
        self.runner = FinetuneRunner(self.run_button, viewer)
        self.result = Label(label="result", value="")
        self.result.native.setWordWrap(True)
        super().__init__(widgets=[
            self.pairs, self.add_pair_button, self.models, self.length_unit, self.length, self.time_budget, self.lr,
            self.batch_size, self.trainable, self.augment, self.freeze_bn, self.val_mode, self.val_fraction,
            self.val_pair,
            self.device, self.model_name, self.overwrite, self.run_button, self.runner, self.result,
        ], labels=True)
        from .finetune_plot import TrainingPlot

        self.plot = TrainingPlot()
        self.native.layout().addWidget(self.plot)
        self._reports: list = []
        self._shown = 0
        self._fixed_x = True
        self.last_result: Any = None
        self.add_pair_button.changed.connect(self.add_pair)
        self.val_mode.changed.connect(self._val_mode_changed)
        self.add_pair()

    # ---------------------------------------------------------------- pairs
    def add_pair(self, _event: Any = None) -> PairRow:
        row = PairRow(self.viewer, len(self.pairs) + 1)
        row.remove_button.changed.connect(lambda _e=None, r=row: self.remove_pair(r))
        row.image_combo.changed.connect(self._follow_first_image)
        self.pairs.append(row)
        self._renumber()
        self._follow_first_image()
        return row

    def _follow_first_image(self, _event: Any = None) -> None:
        """The base model follows the first pair's image layer (see Segment), unless picked by hand."""
        if len(self.pairs):
            self.models.follow(self.pairs[0].image_combo.value)

    def remove_pair(self, row: PairRow) -> None:
        if len(self.pairs) <= 1:
            notify_error("Fine-tune: at least one pair is needed")
            return
        self.pairs.remove(row)
        self._renumber()
        self._follow_first_image()

    def _renumber(self) -> None:
        for i, row in enumerate(self.pairs, 1):
            row.label = f"pair {i}"
            row.remove_button.text = f"Remove pair {i}"
        self.val_pair.max = max(1, len(self.pairs))

    def _val_mode_changed(self, _event: Any = None) -> None:
        pair = self.val_mode.value == "pair"
        self.val_pair.visible = pair
        self.val_fraction.visible = not pair

    # ---------------------------------------------------------------- running
    def _output(self, base: str) -> str:
        from ..zoo import user_models_dir

        name = self.model_name.value.strip()
        if not name:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{base.rstrip('/').split('/')[-1]}-ft-{stamp}"
        if "/" in name or "\\" in name or name.startswith(".") or name in ("", ".."):
            raise ValueError(f"the model name {name!r} must be a plain folder name (no '/', not starting with '.')")
        return str(user_models_dir() / name)

    def run(self, _event: Any = None) -> Any:
        """Start fine-tuning; returns the worker, or None when the input was refused (with a message)."""
        if self.runner.running:
            notify_error("Fine-tune: a run is in progress; wait or press Cancel")
            return None
        base = self.models.model
        if base is None:
            notify_error("Fine-tune: choose the base model (or a checkpoint folder)")
            return None
        try:
            items = [row.item() for row in self.pairs]
            val_items = None
            if self.val_mode.value == "pair":
                k = int(self.val_pair.value) - 1
                if len(items) < 2:
                    raise ValueError("validation on a chosen pair needs at least two pairs")
                val_items = [items.pop(k)]
            output = self._output(base)
        except ValueError as e:
            notify_error(f"Fine-tune: {e}")
            return None
        n = int(self.length.value)
        from ..finetune import FinetuneConfig

        config = FinetuneConfig(
            steps=n if self.length_unit.value == "steps" else None,
            epochs=n if self.length_unit.value == "epochs" else None,
            lr=float(self.lr.value), batch_size=int(self.batch_size.value),
            trainable=self.trainable.value, augment=bool(self.augment.value),
            freeze_bn=bool(self.freeze_bn.value),
            val_fraction=float(self.val_fraction.value) if val_items is None else 0.0,
            val_split="random" if self.val_mode.value == "random" else "end",
            time_budget_s=float(self.time_budget.value) or None)
        self.runner.stop_event = threading.Event()
        self._reports = []
        self._shown = 0
        self._fixed_x = config.time_budget_s is None  # with a time budget the x axis grows with the run
        self.plot.reset(n if config.steps and self._fixed_x else 0)
        self.result.value = ""
        self.last_result = None
        worker = self.runner.start(finetune_job, self.runner.stop_event, self._reports, base, items, output,
                                   val_items, config, self.device.value, bool(self.overwrite.value),
                                   on_result=self._finished)
        if worker is not None:
            worker.yielded.connect(self._update_plot)
        return worker

    def _update_plot(self, _item: Any = None) -> None:
        new = self._reports[self._shown:]
        self._shown += len(new)
        for p in new:
            if self._fixed_x and p.total_steps and p.total_steps != self.plot.total:
                self.plot.total = p.total_steps
            if p.kind == "step":
                self.plot.add_loss(p.step, p.loss)
            elif p.kind == "val":
                self.plot.add_dice(p.step, p.val_dice)
                if p.step > 0:
                    self.plot.add_mean_loss(p.step, p.loss)

    def _finished(self, result: Any) -> None:
        self._update_plot()
        self.last_result = result
        self.runner.progress.value = self.runner.progress.max  # the run is over, whatever ended it
        if result.cancelled:
            self.runner.status.value = "cancelled: nothing was saved"
            self.result.value = "cancelled"
            return
        where = "held-out" if result.dice_on == "validation" else "training (no frame held out)"
        verdict = ("" if result.dice_after > result.dice_before else
                   "\nno gain: try more labelled frames, more time or another learning rate")
        kept = (f"kept step {result.best_step}" if result.best_step else
                "kept the base weights (no step beat them)")
        self.result.value = (f"Dice on {result.n_val or result.n_train} {where} frame(s): "
                             f"before {result.dice_before:.3f} → after {result.dice_after:.3f}\n"
                             f"saved as {result.path.name} (your models)\n"
                             f"{result.steps} steps in {result.total_seconds:.0f} s, {kept}\n"
                             f"stopped by {result.stopped_by}{verdict}")
        self.result.tooltip = str(result.path)
        self.runner.status.value = f"done: saved {result.path.name}"  # the zoo signal refreshed the pickers
