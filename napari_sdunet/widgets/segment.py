"""The "Segment" widget: run a model on an image layer and add the mask as a new Labels layer.

The axes of the layer are never guessed silently: the axes combo proposes one from the layer
(``rgb``, ndim) and shows it; the user may change it before pressing Segment. The work runs in a
thread worker (progress bar, Cancel); results go to new layers that carry the source's scale,
translate, axis labels and NIfTI affine/header (so the mask can be saved back in the scan's space).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton, SpinBox

from ..axes import AXES, propose_layer_axes
from ..devices import PRECISIONS
from ..events import Progress, status
from ..tasks import DEFAULT_CT_WINDOW, MODALITIES, WINDOW, intensity_rule
from ._common import JobRunner, LayerCombo, ModelPicker, device_combo, notify_error


def modality_choices() -> list[tuple[str, str | None]]:
    """The modality combo's (label, value) pairs: the model's own preprocessing, then each registered modality."""
    return [("from the model", None)] + [(m.label, m.name) for m in MODALITIES.values()]


def output_layer_kwargs(layer: Any, axes: str) -> dict[str, Any]:
    """scale/translate/axis_labels/metadata of ``layer`` for a result that drops the colour axis."""
    keep = list(range(layer.ndim))
    if axes.endswith("C") and not getattr(layer, "rgb", False):
        keep = keep[:-1]  # the colour axis is a layer dimension here: drop its entry
    kwargs: dict[str, Any] = {
        "scale": [layer.scale[i] for i in keep],
        "translate": [layer.translate[i] for i in keep],
    }
    labels = getattr(layer, "axis_labels", None)
    if labels is not None:
        kwargs["axis_labels"] = [labels[i] for i in keep]
    meta = {k: v for k, v in (layer.metadata or {}).items() if k.startswith("nifti_")}
    kwargs["metadata"] = meta
    return kwargs


def segment_job(model_ref: str, device: str, data: Any, axes: str, modality: str | None,
                ct_window: tuple[float, float] | None, batch_size: int, tta: bool, scale: float = 1.0,
                affine: Any = None, precision: str = "auto") -> Generator[Progress, None, tuple[str, np.ndarray]]:
    """Load the model (cached), then segment ``data`` batch by batch, yielding progress.

    A NIfTI volume (``affine`` given, axes ZYX) is turned into the orientation the model learnt from
    first, and the probabilities are turned back to the layer's own storage (as the CLI does).
    """
    from ..devices import pick_precision
    from ..inference import iter_predict, load_model, model_orientation

    yield status(f"loading {model_ref} ...")
    loaded = load_model(model_ref, device)
    back = None
    if affine is not None and axes == "ZYX":
        from ..io import reorient

        data, back = reorient(np.asarray(data), np.asarray(affine), model_orientation(loaded))
    gen = iter_predict(loaded, data, axes, batch_size=batch_size, modality=modality,
                       ct_window=ct_window, tta=tta, scale=scale, precision=precision)
    where = f"{loaded.device}, {'bf16' if pick_precision(precision, loaded.device) is not None else 'fp32'}"
    try:
        while True:
            p = next(gen)
            p.message = f"{loaded.name} on {where}: {p.step}/{p.total_steps} frame(s)"
            yield p
    except StopIteration as stop:
        prob = stop.value
        return loaded.name, (back(prob) if back is not None else prob)


class SegmentWidget(Container):
    """Plugins > napari-sdunet > Segment."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.image = LayerCombo(viewer, "image", "image")
        self.axes = ComboBox(label="axes", choices=list(AXES), nullable=True,
                             tooltip="how the layer's dimensions are laid out: Y, X image plane, C colour, "
                                     "Z slices, T frames (Z and T are segmented slice by slice)")
        self.axes_hint = Label(label="", value="")
        self.models = ModelPicker()
        self.modality = ComboBox(label="modality", choices=modality_choices(), value=None)
        self.ct_lo = FloatSpinBox(label="HU window low", min=-3000, max=3000, step=10,
                                  value=DEFAULT_CT_WINDOW[0])
        self.ct_hi = FloatSpinBox(label="HU window high", min=-3000, max=3000, step=10,
                                  value=DEFAULT_CT_WINDOW[1])
        self.device = device_combo()
        self.precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto",
                                  tooltip="auto: bf16 on CPUs with fast bf16 (Intel AMX, AVX512-BF16; 2-4x faster), "
                                          "fp32 elsewhere; fp32: the exact float32 result")
        self.scale = FloatSpinBox(label="object scale", min=0.05, max=20.0, step=0.25, value=1.0,
                                  tooltip="resize the image by this factor before a native-resolution model sees "
                                          "it: 2 when your objects are half the size of the training data's, "
                                          "0.5 when twice (models that infer in tiles at native scale only)")
        self.threshold = FloatSpinBox(label="threshold", min=0.01, max=0.99, step=0.05, value=0.5)
        self.batch_size = SpinBox(label="batch size", min=1, max=256, value=8)
        self.tta = CheckBox(text="test-time flips (4x slower)", value=False)
        self.add_prob = CheckBox(text="add probability layer", value=False)
        self.run_button = PushButton(text="Segment")
        self.runner = JobRunner(self.run_button, viewer)
        super().__init__(widgets=[
            self.image, self.axes, self.axes_hint, self.models, self.modality, self.ct_lo, self.ct_hi,
            self.device, self.precision, self.scale, self.threshold, self.batch_size, self.tta, self.add_prob,
            self.run_button, self.runner,
        ], labels=True)
        self.image.changed.connect(self._image_changed)
        self.models.combo.changed.connect(self._model_changed)
        self.modality.changed.connect(self._update_window_enabled)
        self.run_button.changed.connect(self.run)
        self._image_changed()
        self._model_changed()

    # ---------------------------------------------------------------- reactions
    def _image_changed(self, _event: Any = None) -> None:
        layer = self.image.value
        self.models.follow(layer)  # the model that suits this layer, unless one was picked by hand
        if layer is None:
            self.axes_hint.value = "no image layer"
            return
        proposal = propose_layer_axes(layer)
        self.axes.value = proposal or None
        shape = tuple(np.shape(layer.data))
        why = ("RGB layer" if getattr(layer, "rgb", False)
               else "last axis read as colour" if proposal.endswith("C") else f"{len(shape)}-D layer")
        self.axes_hint.value = (f"shape {shape}: proposed {proposal} ({why}); change if wrong" if proposal
                                else f"shape {shape}: choose the axes")

    def _model_changed(self, _event: Any = None) -> None:
        """Show the model's CT window, so the user sees (and can edit) what will be applied."""
        ref = self.models.model
        if ref is None:
            self.scale.enabled = False
            self._update_window_enabled()
            return
        try:
            from ..checkpoint import read_config
            from ..zoo import resolve_model

            prep = read_config(resolve_model(ref)).get("preprocessing") or {}
        except ValueError:
            prep = {}
        window = prep.get("ct_window")
        if window:
            self.ct_lo.value, self.ct_hi.value = float(window[0]), float(window[1])
        self._model_prep = prep
        self.scale.enabled = prep.get("mode") == "tiles"  # resize-mode models fix the scale themselves
        self._update_window_enabled()

    def _update_window_enabled(self, _event: Any = None) -> None:
        modality = self.modality.value
        if modality is None:
            on = intensity_rule(getattr(self, "_model_prep", {})) == WINDOW
        else:
            on = MODALITIES[modality].rule == WINDOW
        self.ct_lo.enabled = self.ct_hi.enabled = on
        self._update_tta_enabled()

    def _update_tta_enabled(self) -> None:
        """Test-time flips only where a mirrored image means the same (not CT: the anatomy has a side)."""
        from ..inference import tta_flips_allowed

        allowed = tta_flips_allowed({"preprocessing": getattr(self, "_model_prep", {})}, self.modality.value)
        self.tta.enabled = allowed
        if not allowed:
            self.tta.value = False
        self.tta.tooltip = ("average the predictions of the image and its mirror images" if allowed else
                            "off for CT: its slices have a side (the liver is on the patient's right), so a "
                            "mirrored slice shows an anatomy the model never saw")

    # ---------------------------------------------------------------- running
    def progress_value(self) -> int:
        """Frames done in the current run (for tests and scripts)."""
        return int(self.runner.progress.value)

    def _validate(self) -> tuple[Any, str, str] | None:
        layer = self.image.value
        if layer is None:
            notify_error("Segment: choose an image layer first")
            return None
        if getattr(layer, "multiscale", False):
            notify_error(f"Segment: {layer.name} is multiscale; segment one of its levels as its own layer")
            return None
        if self.models.model is None:
            notify_error("Segment: choose a model (or a checkpoint folder)")
            return None
        axes = self.axes.value
        if not axes:
            notify_error(f"Segment: choose the axes of {layer.name} (shape {tuple(np.shape(layer.data))})")
            return None
        if len(axes) != np.ndim(layer.data):
            notify_error(f"Segment: {layer.name} has {np.ndim(layer.data)} dimensions, shape "
                         f"{tuple(np.shape(layer.data))}, but axes {axes} need {len(axes)}")
            return None
        return layer, axes, self.models.model

    def run(self, _event: Any = None) -> Any:
        """Start segmenting the chosen layer; returns the worker (None if the input was refused)."""
        checked = self._validate()
        if checked is None:
            return None
        layer, axes, model_ref = checked
        window = (self.ct_lo.value, self.ct_hi.value) if self.ct_lo.enabled else None
        source = {"name": layer.name, **output_layer_kwargs(layer, axes)}
        scale = float(self.scale.value) if self.scale.enabled else 1.0
        affine = (layer.metadata or {}).get("nifti_affine")
        return self.runner.start(
            segment_job, model_ref, self.device.value, layer.data, axes, self.modality.value, window,
            int(self.batch_size.value), bool(self.tta.value), scale, affine, str(self.precision.value),
            on_result=lambda result: self._segmented(result, source, float(self.threshold.value), layer, model_ref),
        )

    def _segmented(self, result: tuple[str, np.ndarray], source: dict[str, Any], threshold: float,
                   layer: Any, model_ref: str) -> None:
        from ..settings import remember
        from ._preselect import task_of_layer

        self._add_layers(result, source, threshold)
        remember(layer, task_of_layer(layer)[0], model_ref)  # preselected next time, also after a restart

    def _add_layers(self, result: tuple[str, np.ndarray], source: dict[str, Any], threshold: float) -> None:
        from ..inference import to_labels

        model_name, prob = result
        kwargs = {k: v for k, v in source.items() if k != "name"}
        mask = to_labels(prob, threshold)
        labels = self.viewer.add_labels(mask, name=f"{model_name} mask [{source['name']}]", **kwargs)
        labels.metadata = {**labels.metadata, "napari_sdunet": {"model": model_name, "threshold": threshold}}
        if self.add_prob.value:
            self.viewer.add_image(prob, name=f"{model_name} probability [{source['name']}]", colormap="magma",
                                  contrast_limits=(0.0, 1.0), blending="additive", opacity=0.6, **kwargs)
        self.runner.status.value = (f"done: {labels.name}, foreground {100.0 * float(mask.mean()):.2f} %")
