"""Pieces shared by the napari-sdunet widgets: layer pickers, model and device combos, job runner.

Nothing here imports torch at module level; model listing and loading happen when a widget is used.
A job is a generator that yields ``(done, total, message)`` and returns its result; :class:`JobRunner`
runs it in a napari thread worker with a progress bar and a Cancel button, and turns the errors a
user can cause (bad input, corrupt checkpoint, missing device) into notifications, not tracebacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton

log = logging.getLogger("napari_sdunet")

DEVICES = ("auto", "cpu", "cuda", "mps")
BROWSE = "__browse__"


def notify_error(message: str) -> None:
    """A napari error notification (no traceback): for problems the user can fix."""
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def layers_of(viewer: napari.Viewer, kind: str) -> list[tuple[str, Any]]:
    """(name, layer) pairs of the viewer's layers of one kind ('image' or 'labels'), newest first."""
    import napari.layers as nl

    cls = {"image": nl.Image, "labels": nl.Labels}[kind]
    return [(layer.name, layer) for layer in reversed(list(viewer.layers)) if isinstance(layer, cls)]


class LayerCombo(ComboBox):
    """A combo of the viewer's layers of one kind, refreshed when layers are added, removed, renamed."""

    def __init__(self, viewer: napari.Viewer, kind: str, label: str, **kwargs: Any) -> None:
        self._viewer = viewer
        self._kind = kind
        super().__init__(label=label, choices=self._choices, nullable=False, **kwargs)
        ev = viewer.layers.events
        for signal in (ev.inserted, ev.removed, ev.moved, ev.reordered):
            signal.connect(self._refresh)
        ev.inserted.connect(self._watch_name)

    def _choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return layers_of(self._viewer, self._kind)

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh)

    def _refresh(self, _event: Any = None) -> None:
        try:
            self.reset_choices()
        except RuntimeError:  # the Qt widget was deleted with the viewer
            pass


def model_choices() -> list[tuple[str, str]]:
    """(label, reference) of every shipped and user model; references go to ``load_model``."""
    from ..zoo import list_pretrained, list_user_models, user_models_dir

    out = [(f"{n} (shipped)", n) for n in list_pretrained()]
    out += [(f"{n} (yours)", str(user_models_dir() / n)) for n in list_user_models()]
    return out


class ModelPicker(Container):
    """Shipped models, the user's (fine-tuned) models, or any checkpoint folder; can refresh.

    ``value`` is a model name or a checkpoint folder, ready for :func:`napari_sdunet.inference.load_model`.
    """

    def __init__(self, label: str = "model") -> None:
        self._extra: list[tuple[str, str]] = []
        self.combo = ComboBox(label=label, choices=self._choices, nullable=True)
        self.refresh_button = PushButton(text="Refresh")
        self.folder = FileEdit(label="checkpoint", mode="d", tooltip="a checkpoint folder (config.json + "
                               "model.safetensors) to add to the model list")
        super().__init__(widgets=[self.combo, self.refresh_button, self.folder], labels=True)
        self.refresh_button.changed.connect(self.refresh)
        self.folder.changed.connect(self._folder_chosen)
        self.refresh()

    def _choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        try:
            listed = model_choices()
        except Exception as e:  # a broken models folder must not break the widget
            log.warning("cannot list models: %s", e)
            listed = []
        return listed + [c for c in self._extra if c not in listed]

    def listed(self) -> list[tuple[str, str]]:
        """(label, reference) of the models offered, in combo order."""
        return self._choices()

    def refresh(self, _event: Any = None) -> None:
        """List the models again (e.g. after fine-tuning saved a new one)."""
        keep = self.combo.value
        self.combo.reset_choices()
        if keep is not None and keep in [c[1] for c in self._choices()]:
            self.combo.value = keep

    def _folder_chosen(self, _event: Any = None) -> None:
        path = Path(self.folder.value).expanduser()
        if not str(self.folder.value) or str(self.folder.value) == "." or not path.is_dir():
            return
        ref = str(path.resolve())
        entry = (f"{path.name} (folder)", ref)
        if entry not in self._extra:
            self._extra.append(entry)
        self.refresh()
        self.combo.value = ref

    def add_folder(self, folder: str | Path) -> None:
        """Add a checkpoint folder to the list and select it."""
        self.folder.value = Path(folder)
        self._folder_chosen()

    @property
    def model(self) -> str | None:
        return self.combo.value


def device_combo() -> ComboBox:
    """auto (cuda, then mps, then cpu), cpu, cuda or mps; an unavailable choice is reported on use."""
    return ComboBox(label="device", choices=list(DEVICES), value="auto",
                    tooltip="auto picks CUDA, then Apple MPS, then the CPU")


class Failure:
    """What a job returns when it stops on a user-fixable error."""

    def __init__(self, message: str) -> None:
        self.message = message


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input/model/device rather than a bug in napari-sdunet."""
    return (ValueError, OSError, MemoryError, RuntimeError, KeyError)


def _guarded(job: Callable[..., Generator], args: tuple, kwargs: dict) -> Generator:
    try:
        result = yield from job(*args, **kwargs)
    except expected_errors() as e:
        log.debug("job failed", exc_info=True)
        text = str(e) or type(e).__name__
        if "out of memory" in text.lower():
            text = f"out of memory ({text.splitlines()[0]}); lower the batch size or use the CPU"
        return Failure(text)
    return result


def avoid_triton_without_cuda() -> None:
    """Keep torch from loading triton inside napari on machines without CUDA.

    torch imports triton lazily whenever it is installed (torch._dynamo, e.g. from Adam.step).
    Without CUDA it has nothing to do, and loading its LLVM after a Mesa llvmpipe GL context has
    loaded another LLVM crashes the whole process (seen under Xvfb). Marked absent, torch skips it.
    """
    import sys

    if "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        sys.modules["triton"] = None  # type: ignore[assignment]


class JobRunner(Container):
    """Progress bar, status line and Cancel button for one job at a time in a thread worker."""

    def __init__(self, run_button: PushButton) -> None:
        self.run_button = run_button
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0, visible=True)
        self.status = Label(label="status", value="ready")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        super().__init__(widgets=[self.progress, self.cancel_button, self.status], labels=True)
        self.cancel_button.changed.connect(self.cancel)
        self.worker: Any = None
        self.last_result: Any = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Callable[..., Generator], *args: Any,
              on_result: Callable[[Any], None], **kwargs: Any) -> Any:
        """Run ``job(*args, **kwargs)`` in a thread; ``on_result`` gets its return value (main thread)."""
        from napari.qt.threading import create_worker

        if self.running:
            notify_info("a job is already running; wait or press Cancel")
            return None
        avoid_triton_without_cuda()
        worker = create_worker(_guarded, job, args, kwargs, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(result, on_result))
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.last_result = None
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "starting..."
        worker.start()
        return worker

    def cancel(self, _event: Any = None) -> None:
        if self.worker is not None:
            self.status.value = "cancelling..."
            self.worker.quit()

    def _on_progress(self, item: Any) -> None:
        done, total, message = item
        if total:
            self.progress.max = max(int(total), 1)
            self.progress.value = min(int(done), int(total))
        self.status.value = message

    def _on_returned(self, result: Any, on_result: Callable[[Any], None]) -> None:
        self.last_result = result
        if isinstance(result, Failure):
            self.status.value = f"failed: {result.message}"
            notify_error(result.message)
            return
        try:
            on_result(result)
        except expected_errors() as e:
            self.status.value = f"failed: {e}"
            notify_error(str(e))

    def _on_aborted(self) -> None:
        self.status.value = "cancelled"
        self.progress.value = 0
        self.last_result = "cancelled"

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
