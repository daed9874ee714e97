"""Pieces shared by the napari-sdunet widgets: layer pickers, model and device combos, job runner.

Nothing here imports torch at module level; model listing and loading happen when a widget is used.
A job is a generator that yields :class:`~napari_sdunet.events.Progress` reports and returns its
result; :class:`JobRunner` runs it in a napari thread worker with a progress bar and a Cancel
button, and turns the errors a user can cause (bad input, corrupt checkpoint, missing device)
into notifications, not tracebacks.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton

from ..devices import DEVICES

log = logging.getLogger("napari_sdunet")

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
    """(label, reference) of every shipped and user model; references go to ``load_model``. Each label
    names the model's task and the Dice its ``config.json`` records (:func:`napari_sdunet.zoo.describe`)."""
    from ..zoo import describe, list_pretrained, list_user_models, summary_of, user_models_dir

    out = [(describe(n, summary_of(n), "shipped"), n) for n in list_pretrained()]
    for n in list_user_models():
        folder = user_models_dir() / n
        out.append((describe(n, summary_of(folder), "yours"), str(folder)))
    return out


#: every live model picker, refreshed together when a model is saved (:func:`refresh_pickers`)
_PICKERS: weakref.WeakSet = weakref.WeakSet()
_RELAY: Any = None


def refresh_pickers() -> None:
    """List the models again in every model picker of every widget (in every viewer)."""
    for picker in list(_PICKERS):
        try:
            picker.refresh()
        except RuntimeError:  # its Qt widget was deleted with its viewer
            _PICKERS.discard(picker)


def _listen_to_the_zoo() -> None:
    """Subscribe the pickers to :func:`napari_sdunet.zoo.on_models_changed` once. A model may be saved
    in a worker thread: a Qt signal of an object made here (the GUI thread) brings the refresh back."""
    global _RELAY
    if _RELAY is not None:
        return
    from qtpy.QtCore import QObject, Signal

    from ..zoo import on_models_changed

    class Relay(QObject):
        changed = Signal()

    _RELAY = Relay()
    _RELAY.changed.connect(refresh_pickers)
    on_models_changed(lambda _folder: _RELAY.changed.emit())


class ModelPicker(Container):
    """Shipped models, the user's (fine-tuned) models, or any checkpoint folder; can refresh.

    ``value`` is a model name or a checkpoint folder, ready for :func:`napari_sdunet.inference.load_model`.
    :meth:`follow` preselects the model that suits an image layer (:mod:`._preselect`) until the user
    picks one by hand; ``why`` says why the current model was chosen.
    """

    def __init__(self, label: str = "model") -> None:
        self._extra: list[tuple[str, str]] = []
        self._programmatic = 0
        self.manual = False  # the user picked the model by hand: preselection stops following layers
        self.combo = ComboBox(label=label, choices=self._choices, nullable=True)
        self.why = Label(label="", value="")
        self.why.native.setWordWrap(True)  # reasons can be long; never widen the dock for them
        self.refresh_button = PushButton(text="Refresh")
        self.folder = FileEdit(label="checkpoint", mode="d", tooltip="a checkpoint folder (config.json + "
                               "model.safetensors) to add to the model list")
        super().__init__(widgets=[self.combo, self.why, self.refresh_button, self.folder], labels=True)
        self.refresh_button.changed.connect(self.refresh)
        self.folder.changed.connect(self._folder_chosen)
        self.combo.changed.connect(self._user_changed)
        self.refresh()
        if self.combo.value is None:  # never start empty while models exist
            self.follow(None)
        _PICKERS.add(self)
        _listen_to_the_zoo()

    def _choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        try:
            listed = model_choices()
        except Exception as e:  # a broken models folder must not break the widget
            log.warning("cannot list models: %s", e)
            listed = []
        return listed + [c for c in self._extra if c[1] not in [r for _, r in listed]]

    def listed(self) -> list[tuple[str, str]]:
        """(label, reference) of the models offered, in combo order."""
        return self._choices()

    def _set(self, value: str | None) -> None:
        """Set the combo without counting it as the user's choice."""
        self._programmatic += 1
        try:
            self.combo.value = value
        finally:
            self._programmatic -= 1

    def _user_changed(self, _event: Any = None) -> None:
        if not self._programmatic:
            self.manual = self.combo.value is not None
            self.why.value = "chosen by hand" if self.manual else ""

    def refresh(self, _event: Any = None) -> None:
        """List the models again (e.g. after fine-tuning saved a new one); the choice is kept."""
        keep = self.combo.value
        self._programmatic += 1
        try:
            self.combo.reset_choices()
            if keep is not None and keep in [c[1] for c in self._choices()]:
                self.combo.value = keep
        finally:
            self._programmatic -= 1

    def follow(self, layer: Any) -> None:
        """Preselect the model that suits ``layer`` (see :mod:`._preselect`), unless picked by hand."""
        if self.manual:
            return
        from ._preselect import preselect

        refs = [ref for _, ref in self._choices()]
        try:
            ref, why = preselect(layer, refs)
        except Exception as e:  # a rule must never break the widget
            log.warning("cannot preselect a model: %s", e)
            ref, why = (refs[0], "the first model listed") if refs else (None, "")
        if ref is not None and ref not in refs and Path(ref).is_dir():
            self._add_extra(Path(ref))
        if ref is not None:
            self._set(ref)
        self.why.value = why

    def _add_extra(self, path: Path) -> str:
        ref = str(path.resolve())
        entry = (f"{path.name} (folder)", ref)
        if ref not in [r for _, r in self._extra]:
            self._extra.append(entry)
        self.refresh()
        return ref

    def _folder_chosen(self, _event: Any = None) -> None:
        path = Path(self.folder.value).expanduser()
        if not str(self.folder.value) or str(self.folder.value) == "." or not path.is_dir():
            return
        ref = self._add_extra(path)
        self.combo.value = ref  # the user's choice
        self.manual = True
        self.why.value = "chosen by hand"

    def add_folder(self, folder: str | Path) -> None:
        """Add a checkpoint folder to the list and select it (as the user's choice)."""
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
    """Errors that mean bad input / model / device / memory rather than a bug in napari-sdunet.

    The package's own errors (:mod:`napari_sdunet.errors`), ``ValueError`` (``pick_device``), file
    errors and running out of memory. Anything else is a bug: :func:`bug_message` words it.
    """
    import sys

    from ..errors import SdunetError

    out: list[type[BaseException]] = [SdunetError, ValueError, OSError, MemoryError]
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if isinstance(oom, type):
        out.append(oom)
    return tuple(out)


def bug_message(e: BaseException) -> str:
    """One line for the viewer about an unexpected error (the traceback goes to the log only)."""
    text = str(e).splitlines()[0] if str(e) else ""
    if "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return f"out of memory ({text}); lower the batch size or use the CPU"
    return (f"internal error ({type(e).__name__}: {text[:200]}); this is a bug in napari-sdunet, please report "
            "it with the log (napari's console)")


#: what a job returns when it was stopped (Cancel, or its viewer closing)
CANCELLED = "cancelled"


def _guarded(job: Callable[..., Generator], args: tuple, kwargs: dict, stop: Any = None,
             ended: Any = None) -> Generator:
    """Run ``job`` turning user-fixable errors into a :class:`Failure`.

    ``stop`` (a threading.Event) ends the job at its next progress report: the job's generator is
    closed (so its ``finally`` blocks run in this thread) and :data:`CANCELLED` is returned.
    ``ended`` is set once the job has stopped, however it stopped (result, error, cancel).
    """
    gen = job(*args, **kwargs)
    try:
        item = next(gen)
        while True:
            if stop is not None and stop.is_set():
                gen.close()
                return CANCELLED
            yield item
            item = next(gen)
    except StopIteration as done:
        return done.value
    except expected_errors() as e:
        log.debug("job failed", exc_info=True)
        text = str(e) or type(e).__name__
        if "out of memory" in text.lower():
            text = f"out of memory ({text.splitlines()[0]}); lower the batch size or use the CPU"
        return Failure(text)
    except Exception as e:  # a bug: say so in one line, keep the traceback in the log
        log.exception("job failed unexpectedly")
        return Failure(bug_message(e))
    finally:
        gen.close()
        if ended is not None:
            ended.set()


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


#: how long closing a viewer waits for a running job to stop (a fine-tuning step, a batch of frames)
CLOSE_WAIT_S = 120.0


class _CloseWatcher:
    """Calls ``on_close`` when the viewer's main window gets its Close event, before napari tears it down."""

    def __init__(self, viewer: napari.Viewer, on_close: Callable[[], None]) -> None:
        from qtpy.QtCore import QEvent, QObject

        class Filter(QObject):
            def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt name)
                if event.type() == QEvent.Type.Close:
                    on_close()
                return False

        import warnings

        from qtpy.QtWidgets import QApplication

        self.filter = Filter()
        with warnings.catch_warnings():  # napari has no public "window closing" hook (0.9)
            warnings.simplefilter("ignore", FutureWarning)
            window = getattr(viewer.window, "_qt_window", None)
        if window is not None:
            window.installEventFilter(self.filter)  # no reference kept to the window
        else:  # a napari without it: at least stop every job before the application quits
            QApplication.instance().aboutToQuit.connect(on_close)


class JobRunner(Container):
    """Progress bar, status line and Cancel button for one job at a time in a thread worker.

    Given the viewer, closing its window cancels the job and waits (up to :data:`CLOSE_WAIT_S`) until it
    has stopped, so no thread keeps training or saving after the viewer is gone.
    """

    def __init__(self, run_button: PushButton, viewer: napari.Viewer | None = None) -> None:
        self.run_button = run_button
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0, visible=True)
        self.status = Label(label="status", value="ready")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        super().__init__(widgets=[self.progress, self.cancel_button, self.status], labels=True)
        self.cancel_button.changed.connect(self.cancel)
        self.worker: Any = None
        self.last_result: Any = None
        self._ended: Any = None  # threading.Event set by the worker thread when the job has stopped
        self._stop: Any = None  # threading.Event: the job stops at its next progress report
        self._closed = False
        self._watcher = None
        if viewer is not None:
            try:
                self._watcher = _CloseWatcher(viewer, self.shutdown)
            except (AttributeError, RuntimeError):  # a viewer without a Qt window (headless use)
                self._watcher = None

    def shutdown(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Cancel the job (if any) and wait until its thread has stopped; True when nothing runs any more.
        The widget takes no more results afterwards (its viewer is closing)."""
        self._closed = True
        if self.worker is None or self._ended is None:
            return True
        self._stop_job()
        stopped = self._ended.wait(timeout)
        if not stopped:
            log.warning("a napari-sdunet job did not stop within %.0f s of closing the viewer", timeout)
        return stopped

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
        if self._closed:
            return None
        import threading

        avoid_triton_without_cuda()
        self._ended = threading.Event()
        self._stop = threading.Event()
        worker = create_worker(_guarded, job, args, kwargs, self._stop, self._ended, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(result, on_result))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.last_result = None
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "starting..."
        worker.start()
        return worker

    def _stop_job(self) -> None:
        """Ask the job to stop as soon as it can (what Cancel does; subclasses add their own stop)."""
        if self._stop is not None:
            self._stop.set()

    def cancel(self, _event: Any = None) -> None:
        if self.worker is not None:
            self.status.value = "cancelling..."
            self._stop_job()

    def _on_progress(self, item: Any) -> None:
        if self._closed:
            return
        done, total, message = item.step, item.total_steps, item.message
        if total:
            self.progress.max = max(int(total), 1)
            self.progress.value = min(int(done), int(total))
        self.status.value = message

    def _on_returned(self, result: Any, on_result: Callable[[Any], None]) -> None:
        self.last_result = result
        if self._closed:  # the viewer is closing: add nothing to it
            return
        if isinstance(result, str) and result == CANCELLED:
            self._on_aborted()
            return
        if isinstance(result, Failure):
            self.status.value = f"failed: {result.message}"
            notify_error(result.message)
            return
        try:
            on_result(result)
        except expected_errors() as e:
            self.status.value = f"failed: {e}"
            notify_error(str(e))
        except Exception as e:  # a bug while showing the result: one line, traceback in the log
            log.exception("showing the result failed")
            self.status.value = f"failed: {bug_message(e)}"
            notify_error(bug_message(e))

    def _on_aborted(self) -> None:
        self.last_result = "cancelled"
        if self._closed:
            return
        self.status.value = "cancelled"
        self.progress.value = 0

    def _on_finished(self) -> None:
        self.worker = None
        if self._closed:
            return
        try:
            self.run_button.enabled = True
            self.cancel_button.enabled = False
        except RuntimeError:  # the Qt widgets were deleted with the viewer
            pass
