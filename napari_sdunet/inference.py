"""Run a segmentation model on images, stacks of slices and video frames (pure numpy/torch, no Qt).

Used by the napari widgets and by ``napari-sdunet predict`` / ``evaluate``. The model's config.json
says how to prepare the input (size, channels, intensity scaling or CT window, see
:mod:`napari_sdunet.preprocess`); frames are resized to the model's input size, run in batches
and the probabilities resized back, so any image size works. Work is split into batches so that a
caller can show progress and cancel between them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .axes import check_axes, propose_axes
from .devices import pick_device, pick_precision
from .errors import InputError
from .events import Progress
from .tasks import MODALITIES, WINDOW, flips_allowed, intensity_rule, modality_names

if TYPE_CHECKING:  # torch is imported lazily so that napari starts fast
    import torch



class Cancelled(Exception):
    """The caller asked to stop (``should_stop`` returned True)."""


@dataclass
class LoadedModel:
    """A model ready for inference, with the config that says how to feed it."""

    model: torch.nn.Module
    config: dict[str, Any]
    folder: Path
    device: torch.device

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.config.get("preprocessing") or {})

    @property
    def in_channels(self) -> int:
        return int(getattr(self.model, "in_channels", self.preprocessing.get("channels", 3)))


# ----------------------------------------------------------------------------- models

_CACHE: dict[tuple[str, str], tuple[tuple[float, int], LoadedModel]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 3


def _weights_stamp(folder: Path) -> tuple[float, int]:
    """mtime and size of the folder's files, so a re-saved (fine-tuned) model is reloaded."""
    stamp_t, stamp_n = 0.0, 0
    for f in folder.iterdir():
        if f.is_file():
            st = f.stat()
            stamp_t = max(stamp_t, st.st_mtime)
            stamp_n += st.st_size
    return stamp_t, stamp_n


def load_model(name_or_folder: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """Load a shipped/user model by name, or a checkpoint folder, on ``device``; cached in memory.

    The cache is keyed by folder and device and checks the files' mtime/size, so a model that was
    overwritten by fine-tuning is loaded again. Raises :class:`~napari_sdunet.CheckpointError`.
    """
    from .checkpoint import load_checkpoint
    from .zoo import resolve_model

    dev = pick_device(device)
    folder = resolve_model(name_or_folder).resolve()
    key = (str(folder), str(dev))
    stamp = _weights_stamp(folder)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    model, config = load_checkpoint(folder, device=dev)
    loaded = LoadedModel(model=model, config=config, folder=folder, device=dev)
    with _CACHE_LOCK:
        _CACHE[key] = (stamp, loaded)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    return loaded


def clear_cache() -> None:
    """Forget every loaded model (frees their memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def effective_preprocessing(config: dict[str, Any], modality: str | None = None,
                            ct_window: Sequence[float] | None = None) -> dict[str, Any]:
    """The model's preprocessing, with the user's modality preset and CT window applied.

    A windowing modality (``'ct'``) windows HU values (``ct_window``, else the model's, else the
    modality's default); the others (microscopy, colonoscopy) scale intensities by bit depth or
    percentiles and never window (:data:`napari_sdunet.tasks.MODALITIES`).
    """
    prep = dict(config.get("preprocessing") or {})
    if modality is not None:
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; choose from {', '.join(modality_names())}")
        preset = MODALITIES[modality]
        if preset.rule == WINDOW:
            prep["ct_window"] = list(ct_window or prep.get("ct_window") or preset.default_window)
        else:
            prep["ct_window"] = None
        prep["modality"] = modality
    elif ct_window is not None:
        prep["ct_window"] = list(ct_window)
        if intensity_rule(prep) != WINDOW:
            prep.pop("modality", None)  # a window given on its own is applied, whatever the model's modality
    window = prep.get("ct_window")
    if window:
        try:
            lo, hi = float(window[0]), float(window[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise InputError(f"CT window must be two finite numbers lo < hi, got {window!r}") from None
        if len(window) != 2 or not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise InputError(f"CT window must be two finite numbers lo < hi, got {window}")
    return prep


def tta_flips_allowed(config: dict[str, Any], modality: str | None = None,
                      ct_window: Sequence[float] | None = None) -> bool:
    """Whether test-time flips run for this model with the user's modality and window (not for CT)."""
    return flips_allowed(effective_preprocessing(config, modality, ct_window))


def model_orientation(loaded: LoadedModel) -> tuple[str, ...]:
    """Orientation a NIfTI volume is turned into before prediction (the model's, else the CT sets')."""
    from .io import TRAINING_ORIENTATION

    codes = (loaded.config.get("preprocessing") or {}).get("orientation")
    if isinstance(codes, str) and len(codes) == 3 and set(codes.upper()) <= set("LRAPSI"):
        return tuple(codes.upper())
    return TRAINING_ORIENTATION


# ----------------------------------------------------------------------------- axes

def frames_of(data: np.ndarray, axes: str) -> tuple[np.ndarray, bool]:
    """View ``data`` with ``axes`` as frames (N, Y, X[, C]) and say whether it has a colour axis."""
    axes = check_axes(axes, np.shape(data))
    has_c = axes.endswith("C")
    if has_c and np.shape(data)[-1] not in (1, 2, 3, 4):
        raise InputError(f"axes {axes} put colour last, but the last axis has {np.shape(data)[-1]} "
                         "entries (expected 1, 3 or 4); pick other axes")
    if axes in ("YX", "YXC"):
        data = np.asarray(data)[None]
    return data, has_c


def spatial_shape(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    """The shape of the mask for an input of ``shape`` with ``axes`` (the colour axis dropped)."""
    return tuple(int(s) for s, a in zip(shape, axes.upper()) if a != "C")


def check_frames(frames: np.ndarray, has_c: bool) -> None:
    """Reject what cannot be segmented (empty, NaN, odd dtype) before any work starts."""
    if np.size(frames) == 0 or 0 in np.shape(frames):
        raise InputError(f"the image is empty (shape {tuple(np.shape(frames))})")
    dtype = np.asarray(frames[:1]).dtype
    if dtype.kind not in "biuf":
        raise InputError(f"unsupported pixel type {dtype}")
    if dtype.kind == "f":
        arr = np.asarray(frames)
        if not np.isfinite(arr).all():
            raise InputError("the image contains NaN or infinite values; replace them before segmenting")


# ----------------------------------------------------------------------------- prediction

def _prepare_batch(frames: np.ndarray, has_c: bool, prep: dict[str, Any]) -> torch.Tensor:
    import torch

    from .preprocess import to_model_input

    return torch.stack([to_model_input(np.asarray(f), prep, channel_axis=has_c) for f in frames])


def predict_probabilities(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (N, 1, h, w); with ``tta`` the mean over identity, h-, v- and hv-flips.

    The one test-time-flip rule of the project: the plugin, validation and the test metrics use it.
    """
    import torch

    logits = model(x)[:, :1].float()
    if not tta:
        return torch.sigmoid(logits)
    prob = torch.sigmoid(logits)
    for dims in ((-1,), (-2,), (-2, -1)):
        prob = prob + torch.sigmoid(model(torch.flip(x, dims))[:, :1].float()).flip(dims)
    return prob / 4


def predict_prepared(model: torch.nn.Module, x: torch.Tensor, prep: dict[str, Any], tta: bool = False,
                     ) -> torch.Tensor:
    """Probabilities (N, 1, H, W) for model-ready images ``x`` (N, C, H, W) at their own size.

    The one prediction rule of the project (the plugin, the CLI, validation while training and the test
    metrics all come here): a ``mode: tiles`` model runs on each image at its own pixel size in
    overlapping tiles (:mod:`napari_sdunet.tiling`); any other model sees ``x`` resized to its input
    size, and its probabilities are resized back. ``tta`` averages over flips only where flipped images
    mean the same (:func:`~napari_sdunet.tasks.flips_allowed`: not for CT).
    """
    import torch

    from .preprocess import resize
    from .tiling import predict_tiled

    hw = tuple(x.shape[-2:])
    tta = tta and flips_allowed(prep)
    if prep.get("mode") == "tiles":
        tile = prep.get("tile_size") or prep.get("input_size") or (256, 256)
        multiple = 2 ** int(getattr(model, "depth", 4))
        probs = [predict_tiled(lambda b: predict_probabilities(model, _channels_last(b), tta), xi, tile,
                               overlap=int(prep.get("tile_overlap", 32)), multiple=multiple) for xi in x]
        return torch.stack(probs)[:, None]
    size = prep.get("input_size")
    xin = _channels_last(resize(x, (int(size[0]), int(size[1])))) if size else x
    prob = predict_probabilities(model, xin, tta)
    return resize(prob, hw) if tuple(prob.shape[-2:]) != hw else prob


def iter_predict(loaded: LoadedModel, data: np.ndarray, axes: str, *, batch_size: int = 8,
                 modality: str | None = None, ct_window: Sequence[float] | None = None,
                 tta: bool = False, scale: float = 1.0, precision: str = "auto",
                 ) -> Generator[Progress, None, np.ndarray]:
    """Generator: yields a ``"frames"`` :class:`~napari_sdunet.events.Progress` after each batch
    (``step`` frames of ``total_steps`` done) and returns the probabilities.

    ``data`` is one image or stack laid out as ``axes``; the result is float32 in [0, 1] with the
    spatial shape (the colour axis dropped). Stopping the generator between yields cancels the run.
    Models whose preprocessing says ``mode: tiles`` run at the image's own pixel size in overlapping
    tiles (:mod:`napari_sdunet.tiling`); ``scale`` then resizes each frame first (2: objects twice as
    small as in training look as they did there). Other models see frames resized to their input size.
    ``precision``: "auto" (bf16 autocast on CPUs with fast bf16, see
    :func:`~napari_sdunet.devices.pick_precision`), "fp32" or "bf16".
    """
    import contextlib

    import torch

    from .preprocess import to_image_frame

    frames, has_c = frames_of(data, axes)
    check_frames(frames, has_c)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not (isinstance(scale, (int, float, np.number)) and np.isfinite(scale) and 0.05 <= scale <= 20):
        raise InputError(f"scale must be a number between 0.05 and 20, got {scale}")
    prep = effective_preprocessing(loaded.config, modality, ct_window)
    prep["channels"] = loaded.in_channels
    n, hw = frames.shape[0], tuple(frames.shape[1:3])
    out = np.empty((n, *hw), dtype=np.float32)
    yield Progress("frames", 0, n)
    dtype = pick_precision(precision, loaded.device)
    reduced = (torch.autocast(loaded.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
    with torch.inference_mode(), reduced:
        if prep.get("mode") == "tiles":
            for i in range(n):
                out[i] = _predict_tiles(loaded, np.asarray(frames[i]), has_c, prep, tta, scale)
                yield Progress("frames", i + 1, n)
        else:
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                x = _channels_last(_prepare_batch(frames[start:stop], has_c, prep).to(loaded.device))
                prob = predict_prepared(loaded.model, x, prep, tta)  # x is at the model's size already
                out[start:stop] = to_image_frame(prob.float(), hw).clamp_(0, 1).cpu().numpy()
                yield Progress("frames", stop, n)
    return out.reshape(spatial_shape(np.shape(data), axes))


def _predict_tiles(loaded: LoadedModel, frame: np.ndarray, has_c: bool, prep: dict[str, Any], tta: bool,
                   scale: float) -> np.ndarray:
    """One frame at its own pixel size (times ``scale``) in overlapping tiles, back at the frame's size."""
    from .preprocess import resize, to_model_input

    hw = frame.shape[:2]
    x = to_model_input(frame, dict(prep, input_size=None), channel_axis=has_c)[None]
    if scale != 1.0:
        x = resize(x, (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))))
    prob = predict_prepared(loaded.model, _channels_last(x.to(loaded.device)), prep, tta)[0, 0]
    prob = resize(prob[None, None], tuple(hw))[0, 0] if tuple(prob.shape) != tuple(hw) else prob
    return prob.clamp_(0, 1).cpu().numpy()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC under autocast: bf16 convolutions and the SDN sweeps run fastest on it (CPU, oneDNN)."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if torch.is_autocast_enabled(x.device.type) else x


def predict(loaded: LoadedModel, data: np.ndarray, axes: str, *, batch_size: int = 8,
            modality: str | None = None, ct_window: Sequence[float] | None = None, tta: bool = False,
            scale: float = 1.0, precision: str = "auto", on_progress: Callable[[Progress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Probabilities for ``data`` (see :func:`iter_predict`), with progress reports and cancel.

    Raises :class:`Cancelled` when ``should_stop()`` turns True (checked between batches).
    """
    if not isinstance(loaded, LoadedModel):
        raise InputError(f"predict needs a model from load_model(...), got {type(loaded).__name__}; "
                         "segment(...) also takes a model name")
    gen = iter_predict(loaded, data, axes, batch_size=batch_size, modality=modality,
                       ct_window=ct_window, tta=tta, scale=scale, precision=precision)
    try:
        while True:
            p = next(gen)
            done, total = p.step, p.total_steps
            if on_progress is not None:
                on_progress(p)
            if should_stop is not None and should_stop() and done < total:
                gen.close()
                raise Cancelled(f"cancelled after {done} of {total} frames")
    except StopIteration as stop:
        return stop.value


def to_labels(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary mask (uint8 0/1) of probabilities >= ``threshold``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not 0.0 < threshold < 1.0:
        raise InputError(f"threshold must be a number between 0 and 1, got {threshold!r}")
    return (np.asarray(prob) >= threshold).astype(np.uint8)


def segment(model: str | os.PathLike | LoadedModel, data: np.ndarray, axes: str | None = None, *,
            threshold: float = 0.5, device: str = "auto", **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """One call for scripts: ``(mask, probabilities)`` of ``data`` (axes guessed only if not given)."""
    if not isinstance(model, (str, os.PathLike, LoadedModel)):
        raise InputError(f"model must be a model name, a checkpoint folder or a loaded model, got {model!r}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    axes = axes or propose_axes(np.shape(data))
    prob = predict(loaded, data, axes, **kwargs)
    return to_labels(prob, threshold), prob
