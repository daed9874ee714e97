"""Fine-tune a saved model on corrected labels (pure numpy/torch, no Qt): the engine of the
Fine-tune widget and of ``napari-sdunet finetune``.

The user corrects a prediction (napari brushes, or mask files), and this module turns each
(image, labels) pair into training frames at the model's input size (its config's preprocessing),
holds some frames out for validation, trains with the shared loop (:func:`napari_sdunet.train_loop.fit`)
and writes a new, normal checkpoint folder whose config and model card name the base model and the
data it saw. Dice on the validation frames is measured before and after, so the user sees whether
the fine-tuning helped. Nothing is written when the run is cancelled or fails.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FinetuneError  # re-exported: napari_sdunet.finetune.FinetuneError
from .tasks import flips_allowed

if TYPE_CHECKING:  # torch is imported lazily so that napari starts fast
    import torch

    from .batches import AugmentConfig, BatchSource, SegDataset
    from .events import Progress
    from .train_loop import FitConfig

TRAINABLE = ("all", "decoder")




# ----------------------------------------------------------------------------- data

@dataclass
class LabelledImage:
    """One image (2-D, or a stack of slices / video frames) with its corrected labels.

    ``labels`` has the image's spatial shape (any non-zero value is foreground). In a stack, a
    slice is used when its labels are non-empty or its index is in ``frames`` (a slice the user
    marked as checked, e.g. one with no object). A 2-D pair is always used.
    """

    image: np.ndarray
    labels: np.ndarray
    axes: str | None = None
    frames: Sequence[int] | None = None
    name: str = "image"


@dataclass
class Frame:
    """One labelled 2-D frame: the image (Y, X[, C]) and its mask (Y, X) bool."""

    image: np.ndarray
    mask: np.ndarray
    has_c: bool
    source: str
    index: int


def labelled_frames(item: LabelledImage) -> list[Frame]:
    """The frames of ``item`` that carry labels (see :class:`LabelledImage`)."""
    from .axes import propose_axes
    from .errors import InputError
    from .inference import check_frames, frames_of, spatial_shape

    axes = (item.axes or propose_axes(np.shape(item.image))).upper()
    frames, has_c = frames_of(np.asarray(item.image), axes)
    labels = np.asarray(item.labels)
    want = spatial_shape(np.shape(item.image), axes)
    if tuple(labels.shape) != want:
        raise InputError(f"{item.name}: labels of shape {tuple(labels.shape)} do not match the image "
                         f"(shape {tuple(np.shape(item.image))}, axes {axes}: expected {want})")
    check_frames(frames, has_c)
    labels = labels.reshape((-1, *labels.shape[-2:]))
    if labels.shape[0] != frames.shape[0]:
        raise InputError(f"{item.name}: {labels.shape[0]} label slices for {frames.shape[0]} image slices")
    n = frames.shape[0]
    if axes in ("YX", "YXC"):
        keep = [0]
    else:
        marked = {int(i) for i in (item.frames or ())}
        bad = [i for i in marked if not 0 <= i < n]
        if bad:
            raise InputError(f"{item.name}: marked frame(s) {sorted(bad)} outside 0..{n - 1}")
        keep = sorted({i for i in range(n) if np.any(labels[i])} | marked)
    return [Frame(np.asarray(frames[i]), labels[i] != 0, has_c, item.name, i) for i in keep]


def pairs_from_folders(images_dir: str | os.PathLike, masks_dir: str | os.PathLike,
                       axes: str | None = None) -> list[LabelledImage]:
    """Image files and mask files matched by file stem (any resolution; stacks and NIfTI too), in the
    natural order of their names (frame2 before frame10)."""
    from .io import list_images, natural_key, read_image, read_mask, stem

    masks = {}
    for m in list_images(masks_dir):
        masks.setdefault(stem(m), m)
    from .errors import SdunetError

    out, skipped = [], []
    for im in sorted(list_images(images_dir), key=lambda p: natural_key(stem(p))):
        s = stem(im)
        if s not in masks:
            continue
        try:
            vol = read_image(im)
            mask = read_mask(masks[s])
        except (SdunetError, OSError) as e:  # one unreadable pair does not stop the others
            skipped.append(f"{im.name}: {e}")
            continue
        out.append(LabelledImage(vol.data, mask, axes or vol.axes or None, name=im.name))
    if skipped:
        import warnings

        warnings.warn(f"{len(skipped)} image/mask pair(s) could not be read and are skipped: "
                      + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""), stacklevel=2)
    if not out:
        raise FinetuneError(f"no readable image in {images_dir} has a mask with the same file stem in {masks_dir}"
                            + (f" ({len(skipped)} pair(s) could not be read)" if skipped else ""))
    return out


def frames_dataset(frames: Sequence[Frame], prep: dict[str, Any], native: bool = False) -> SegDataset:
    """Frames as the model sees them (the engine's :func:`~napari_sdunet.batches.prepare_pair`, the
    preprocessing of inference), in the one dataset class of the project.

    ``native``: keep each frame at its own pixel size (for models that infer in tiles at native
    resolution) instead of resizing it to the model's input size.
    """
    from .batches import SegDataset

    if native:
        prep = dict(prep, input_size=None)
    return SegDataset.from_pairs([(f.image, f.mask) for f in frames], prep,
                                 ids=[f"{f.source}[{f.index}]" for f in frames],
                                 channel_axis=[f.has_c for f in frames])


#: side of the central square on which native-resolution models are scored while fine-tuning
NATIVE_VAL_CROP = 256


def augment_config(augment: bool, intensity: float, gamma: bool, flips: bool = True) -> AugmentConfig:
    """Fine-tuning's augmentation of the few frames: flips and 90-degree turns (square inputs) where
    mirrored images mean the same (``flips``; not CT, whose slices have a side: a zoom of ±10 % instead),
    brightness/contrast jitter of ``intensity`` and optionally a gamma jitter."""
    from .batches import AugmentConfig

    if not augment:
        return AugmentConfig()
    g = 0.2 if gamma else 0.0
    if not flips:
        return AugmentConfig(scale=(0.9, 1.1), intensity=intensity, gamma=g)
    return AugmentConfig(flips=True, rot90=True, intensity=intensity, gamma=g)


def augment_text(augment: AugmentConfig) -> str:
    """What the augmentation does, in words (for the model card)."""
    kinds = [name for name, on in (("flips", augment.flips), ("rotations", augment.rot90),
                                   ("zoom", tuple(augment.scale) != (1.0, 1.0)),
                                   ("intensity", augment.intensity > 0 or augment.gamma > 0)) if on]
    return "/".join(kinds) or "none"


def training_data(train: SegDataset, val: SegDataset | None, prep: dict[str, Any], batch_size: int,
                  augment: AugmentConfig, seed: int) -> tuple[BatchSource, SegDataset | None, SegDataset]:
    """(training batches, validation set, measuring set) of a fine-tuning run.

    A model that infers at native scale (``mode: tiles``) trains on random patches of its training
    size from the frames at their own pixel size, as in the training campaign, and is scored on their
    central crops; any other model on the frames resized to its input size.
    """
    if prep.get("mode") != "tiles":
        return train.batches(batch_size, augment=augment, seed=seed), val, val if val is not None else train
    patch = prep.get("input_size") or (128, 128)
    source = train.batches(batch_size, patch=patch, augment=augment, seed=seed)
    val_set = val.center_crops(NATIVE_VAL_CROP) if val is not None and len(val) else None
    return source, val_set, val_set if val_set is not None else train.center_crops(NATIVE_VAL_CROP)


VAL_SPLITS = ("end", "random")


def split_frames(frames: Sequence[Frame], val_fraction: float, seed: int = 0, how: str = "end",
                 ) -> tuple[list[Frame], list[Frame]]:
    """(train, validation) frames; at least one of each when there are two or more.

    ``how="end"`` holds out the last frames in the given order (for a video or stack: the frames
    after the training ones, which are not near-copies of them); ``"random"`` a random choice.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise FinetuneError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if how not in VAL_SPLITS:
        raise FinetuneError(f"the validation split must be one of {VAL_SPLITS}, got {how!r}")
    frames = list(frames)
    if len(frames) < 2 or val_fraction == 0:
        return frames, []
    n_val = min(len(frames) - 1, max(1, round(val_fraction * len(frames))))
    order = list(range(len(frames)))
    if how == "random":
        random.Random(seed).shuffle(order)
    else:
        order = order[len(frames) - n_val:] + order[:len(frames) - n_val]
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [frames[i] for i in train], [frames[i] for i in val]


# ----------------------------------------------------------------------------- result

@dataclass
class FinetuneResult:
    """What a run did. ``path`` is None when it was cancelled (nothing was written)."""

    path: Path | None
    dice_before: float
    dice_after: float
    dice_on: str  # "validation" or "training" (when no frame could be held out)
    n_train: int
    n_val: int
    steps: int
    seconds: float  # training time
    total_seconds: float  # incl. data preparation, Dice before/after and saving
    cancelled: bool
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: str = ""  # "steps", "time budget", "no better held-out Dice (patience)" or "cancelled"
    best_step: int = 0  # the step whose weights were kept (best held-out Dice)


def _as_items(data: Any) -> list[LabelledImage]:
    if data is None:
        return []
    if isinstance(data, LabelledImage):
        return [data]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, (str, os.PathLike)) for d in data):
        return pairs_from_folders(*data)
    items = []
    for d in data:
        if isinstance(d, LabelledImage):
            items.append(d)
        elif isinstance(d, (tuple, list)) and len(d) == 2:
            items.append(LabelledImage(np.asarray(d[0]), np.asarray(d[1]), name=f"pair {len(items) + 1}"))
        else:
            raise FinetuneError(f"cannot use {type(d).__name__} as training data; give LabelledImage "
                                "objects, (image, mask) array pairs, or (images_dir, masks_dir)")
    return items


def _check_writable(output: Path) -> None:
    """Fail now, not after training, when ``output`` cannot be written: its nearest existing folder
    must take a new file (tried for real: permissions, read-only file systems, a file in the way). The
    model is built beside ``output`` and swapped in, so it is ``output``'s parent that must be writable."""
    import tempfile

    probe = output.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise FinetuneError(f"cannot write the model to {output}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".napari-sdunet-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FinetuneError(f"cannot write the model to {output}: {probe} is not writable "
                            f"({e.strerror or e}); choose another folder") from e


def _check_output(output: Path, overwrite: bool) -> None:
    from .checkpoint import CONFIG
    from .zoo import PACKAGE_WEIGHTS

    out = output.resolve()
    if out == PACKAGE_WEIGHTS.resolve() or PACKAGE_WEIGHTS.resolve() in out.parents:
        raise FinetuneError(f"{output} is inside the package's shipped weights; write the fine-tuned model "
                            "elsewhere (e.g. the user models folder)")
    if out.exists():
        if not out.is_dir():
            raise FinetuneError(f"{output} exists and is not a folder")
        if any(out.iterdir()) and not (out / CONFIG).is_file():
            raise FinetuneError(f"{output} exists and is not a model folder; choose a new or empty folder")
        if (out / CONFIG).is_file() and not overwrite:
            raise FinetuneError(f"{output} already holds a model; pass overwrite=True (CLI: --overwrite) "
                                "to replace it, or choose another name")
    _check_writable(out)


def model_card(name: str, base: str, info: dict[str, Any], task: str | None) -> str:
    """The README.md of a fine-tuned model: what it came from, what it saw, how it scored."""
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from **{base}** with napari-sdunet (task: {task or 'unknown'}).",
        "",
        "## Data it saw",
        "",
        f"{info['n_train']} training frame(s), {info['n_val']} validation frame(s), from:",
        "",
    ]
    for d in info["data"]:
        lines.append(f"- {d['name']}: frames {d['frames']}")
    lines += [
        "",
        "## Settings",
        "",
        f"- steps: {info['steps']} (batch {info['batch_size']}; stopped by {info['stopped_by']}; weights of step "
        f"{info['best_step']} kept), learning rate {info['lr']:g}, "
        f"trained: {info['trainable']}, "
        f"augmentation: {info.get('augmentation') or ('yes' if info['augment'] else 'none')}",
        f"- device: {info['device']} ({info.get('precision', 'fp32')}), training time: {info['seconds']:.1f} s",
        "",
        "## Result",
        "",
        f"Mean per-frame Dice on the {info['dice_on']} frames (at the model's input size): "
        f"before {info['dice_before']:.4f}, after {info['dice_after']:.4f}.",
        "",
        "## Terms",
        "",
        f"This model is derived from {base}; the terms of the base model and of its training data apply "
        "(see the base model's card), as do those of the data it was fine-tuned on.",
        "",
    ]
    return "\n".join(lines)


def _frames_text(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start, prev = [], None, None
    for i in indices + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    return ", ".join(out)


def _mix_in_base(net: torch.nn.Module, base_folder: Path, base_weight: float) -> None:
    """``net``'s floating-point weights become ``b·base + (1 - b)·net`` (BatchNorm statistics included)."""
    import torch

    from .checkpoint import load_checkpoint

    base, _ = load_checkpoint(base_folder, device="cpu")
    ref = base.state_dict()
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point() and k in ref:
                v.mul_(1.0 - base_weight).add_(ref[k].to(v.device, v.dtype), alpha=base_weight)


def _free(device: torch.device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


# ----------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneConfig:
    """The settings of a fine-tuning run: one object for the CLI, the widget and the benchmarks.

    ``steps`` caps the optimiser steps, ``epochs`` the passes over the training frames, and
    ``time_budget_s`` the whole call (reading the frames to saving: training stops early enough to
    measure and save within it); any of them may be None, not all. ``patience`` stops after that many
    validations in a row without a better held-out Dice (None: never). ``base_weight`` mixes the base
    model's weights back in (0: the fine-tuned weights as trained; 0.5: halfway).
    ``augment_intensity`` / ``augment_gamma``: the brightness/contrast jitter (±10 %) and a gamma jitter.
    ``freeze_bn`` keeps the base model's BatchNorm statistics (recommended for a few frames).
    ``val_fraction`` of the labelled frames is held out: the last ones (``val_split="end"``) or a
    random choice.
    """

    # defaults chosen by measurement (docs/finetune.md): a real gain on ~10 frames within five minutes
    # on a 2-core CPU; the run ends at the first of the steps, the time budget and the patience
    steps: int | None = 400
    epochs: int | None = None
    time_budget_s: float | None = 240.0
    patience: int | None = 8
    #: share of the base model's weights in the saved model: w = b·w_base + (1 - b)·w_finetuned
    #: (weight-space ensembling, "WiSE-FT"): keeps what the base knew about other images
    base_weight: float = 0.0
    lr: float = 1e-4
    #: linear lr warm-up over the first steps (a fresh Adam's first updates are about lr per weight
    #: whatever the gradient). Off by default: measured, it did not stop the collapse of a model that
    #: already fits the frames (docs/finetune.md, "Session 6")
    warmup_steps: int = 0
    batch_size: int = 4
    trainable: str = "all"
    augment: bool = True
    augment_intensity: float = 0.1
    augment_gamma: bool = False
    freeze_bn: bool = True
    val_fraction: float = 0.2
    val_split: str = "end"
    seed: int = 0
    #: "auto": bf16 autocast + channels_last on CPUs whose bf16 is fast (AMX, AVX512-BF16: 3-4x the
    #: steps in the same budget), fp32 elsewhere; or "fp32" / "bf16" (devices.pick_precision)
    precision: str = "auto"

    def with_settings(self, **settings: Any) -> FinetuneConfig:
        """A copy with ``settings`` changed; an unknown name is a :class:`FinetuneError`."""
        from dataclasses import fields, replace

        known = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise FinetuneError(f"unknown fine-tuning setting(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        return replace(self, **settings)

    def check(self) -> FinetuneConfig:
        """Refuse settings that cannot run, with a sentence that names them."""
        if self.trainable not in TRAINABLE:
            raise FinetuneError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.steps is None and self.epochs is None and self.time_budget_s is None:
            raise FinetuneError("give steps or epochs or a time budget (or several)")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise FinetuneError("steps and epochs must be >= 1")
        budget = self.time_budget_s
        if budget is not None and not (budget > 0 and math.isfinite(budget)):
            raise FinetuneError(f"the time budget must be a positive number of seconds, got {budget}")
        if self.patience is not None and self.patience < 1:
            raise FinetuneError("patience must be >= 1 (or None)")
        if not 0.0 <= self.base_weight < 1.0:
            raise FinetuneError(f"base_weight must be in [0, 1), got {self.base_weight}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"the learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise FinetuneError("batch_size must be >= 1")
        if self.warmup_steps < 0:
            raise FinetuneError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FinetuneError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        from .devices import PRECISIONS

        if self.precision not in PRECISIONS:
            raise FinetuneError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.val_split not in VAL_SPLITS:
            raise FinetuneError(f"the validation split must be one of {VAL_SPLITS}, got {self.val_split!r}")
        return self


def gather_frames(data: Any, val_data: Any, ft: FinetuneConfig) -> tuple[list[Frame], list[Frame], bool]:
    """(training frames, validation frames, whether the validation frames were given) of a run."""
    items = _as_items(data)
    if not items:
        raise FinetuneError("no training data given")
    frames = [f for it in items for f in labelled_frames(it)]
    if not frames:
        raise FinetuneError("none of the given images has a labelled frame (labels are empty everywhere); "
                            "paint the objects, or mark the checked frames")
    val_items = _as_items(val_data)
    if val_items:
        val_frames = [f for it in val_items for f in labelled_frames(it)]
        if not val_frames:
            raise FinetuneError("the validation data has no labelled frame")
        return frames, val_frames, True
    train, val = split_frames(frames, ft.val_fraction, ft.seed, ft.val_split)
    return train, val, False


def fit_config(ft: FinetuneConfig, batches: BatchSource, has_val: bool,
               device: torch.device | None = None) -> tuple[FitConfig, int]:
    """The training loop's settings for a fine-tuning run and its total steps, from fit's own schedule
    (:func:`~napari_sdunet.train_loop.plan_steps`): the first report announces the steps fit runs.
    About 20 validations over the run (at most one per pass over the frames). On ``device`` the
    precision setting decides bf16 autocast + channels_last (CPU only)."""
    from .devices import pick_precision
    from .train_loop import FitConfig, plan_steps

    bf16 = device is not None and pick_precision(ft.precision, device) is not None
    cfg = FitConfig(epochs=ft.epochs if ft.epochs is not None else 10**9, max_steps=ft.steps, lr=ft.lr,
                    warmup_steps=ft.warmup_steps, batch_size=ft.batch_size,
                    patience=ft.patience if has_val else None, seed=ft.seed,
                    trainable=ft.trainable, validate_on_stop=True, cpu_bf16=bf16, channels_last=bf16)
    steps_per_epoch, total = plan_steps(cfg, batches)
    every = max(1, min(steps_per_epoch, math.ceil(min(total, FinetuneConfig.steps) / 20)))
    cfg.val_every = every if has_val else steps_per_epoch
    return cfg, total


def run_record(ft: FinetuneConfig, base_folder: Path, base_config: dict[str, Any], train_frames: list[Frame],
               val_frames: list[Frame], val_given: bool, fit_res: Any, kept_base: bool, device: Any,
               dice_on: str, dice_before: float, dice_after: float) -> dict[str, Any]:
    """What the saved model's config (``finetune``) and card keep of the run."""
    per_source: dict[str, list[int]] = {}
    for f in train_frames + val_frames:
        per_source.setdefault(f.source, []).append(f.index)
    return {
        "base_model": base_folder.name,
        "base_folder": str(base_folder),
        "base_weights_sha256": (base_config.get("weights") or {}).get("sha256"),
        "data": [{"name": k, "frames": _frames_text(sorted(v))} for k, v in per_source.items()],
        "n_train": len(train_frames),
        "n_val": len(val_frames),
        "val_frames": [f"{f.source}[{f.index}]" for f in val_frames],
        "val_split": "given" if val_given else ft.val_split,
        "steps": fit_res.steps,
        "stopped_by": ("time budget" if fit_res.cancelled else "no better held-out Dice (patience)"
                       if fit_res.stopped_early else "steps"),
        "kept": "base weights (no step beat them on the held-out frames)" if kept_base else "best step",
        "time_budget_s": ft.time_budget_s,
        "patience": ft.patience,
        "base_weight": ft.base_weight,
        "best_step": 0 if kept_base else fit_res.best_step,
        "lr": ft.lr,
        "batch_size": ft.batch_size,
        "trainable": ft.trainable,
        "augment": ft.augment,
        "freeze_bn": ft.freeze_bn,
        "device": str(device),
        "seconds": round(fit_res.seconds, 2),
        "dice_on": dice_on,
        "dice_before": dice_before,
        "dice_after": dice_after,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def finetune(
    model: str | os.PathLike,
    data: Any,
    output: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    val_data: Any = None,
    device: str = "auto",
    overwrite: bool = False,
    name: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    **settings: Any,
) -> FinetuneResult:
    """Fine-tune the model ``model`` (shipped/user name or checkpoint folder) and save it to ``output``.

    ``data``: :class:`LabelledImage` objects, ``(image, mask)`` array pairs, or one
    ``(images_dir, masks_dir)`` folder pair. Validation frames are ``val_data`` when given, else
    ``config.val_fraction`` of the labelled frames. ``config`` (default :class:`FinetuneConfig`),
    with any of its fields overridden by name in ``settings`` (``finetune(m, d, out, steps=50)``),
    says how long and how to train. ``on_progress`` gets :class:`~napari_sdunet.events.Progress`
    reports: ``"status"`` as each stage starts, then a ``"val"`` report at step 0 that holds the Dice
    before fine-tuning, then the training loop's. When ``should_stop()`` turns true the run ends
    without writing anything and the result has ``cancelled=True`` and ``path=None``.
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .devices import pick_device
    from .events import Progress
    from .events import status as status_report
    from .train_loop import evaluate_dice, fit
    from .zoo import resolve_model

    t_start = time.perf_counter()
    def status(message: str) -> None:  # the stages of the run, on the same channel as the training reports
        if on_progress is not None:
            on_progress(status_report(message))

    ft = (config or FinetuneConfig()).with_settings(**settings).check()
    time_budget_s, base_weight, batch_size = ft.time_budget_s, ft.base_weight, ft.batch_size
    output = Path(output).expanduser()
    _check_output(output, overwrite)
    base_folder = resolve_model(model).resolve()
    dev = pick_device(device)

    status("reading the labelled frames")
    train_frames, val_frames, val_given = gather_frames(data, val_data, ft)

    net, config = load_checkpoint(base_folder, device="cpu")  # a private copy: never the inference cache's
    prep = dict(config.get("preprocessing") or {})
    prep["channels"] = int(getattr(net, "in_channels", prep.get("channels", 3)))
    status(f"preparing {len(train_frames)} training and {len(val_frames)} validation frames")
    native = prep.get("mode") == "tiles"  # the model sees images at their own pixel size
    train_set = frames_dataset(train_frames, prep, native=native)
    val_set = frames_dataset(val_frames, prep, native=native) if val_frames else None
    augment = augment_config(ft.augment, ft.augment_intensity, ft.augment_gamma, flips_allowed(prep))
    train_data, val_set, measure_set = training_data(train_set, val_set, prep, batch_size, augment, ft.seed)
    dice_on = "validation" if val_set is not None else "training"

    if should_stop is not None and should_stop():
        return FinetuneResult(None, math.nan, math.nan, dice_on, len(train_frames), len(val_frames), 0, 0.0,
                              time.perf_counter() - t_start, True)
    try:
        status(f"measuring Dice before fine-tuning on {len(measure_set)} {dice_on} frame(s)")
        net.to(dev)
        eval_bs = max(1, min(8, batch_size * 2))
        t_eval = time.perf_counter()
        dice_before = evaluate_dice(net, measure_set, eval_bs, dev)
        t_eval = time.perf_counter() - t_eval

        cfg, total = fit_config(ft, train_data, val_set is not None, dev)
        if on_progress is not None:
            on_progress(Progress("val", 0, total, 0, val_dice=dice_before, best_val_dice=dice_before))

        # the time budget covers the whole call: stop training early enough to measure again (as long
        # as the Dice before took) and save
        deadline = math.inf
        if time_budget_s is not None:
            deadline = t_start + time_budget_s - t_eval - 1.0
        user_stopped = {"flag": False}

        def stop() -> bool:
            if should_stop is not None and should_stop():
                user_stopped["flag"] = True
                return True
            return time.perf_counter() >= deadline

        limits = [f"{total} steps" if total < 10**9 else None,
                  f"{time_budget_s:.0f} s in all" if time_budget_s is not None else None]
        status(f"fine-tuning on {dev} for at most {' or '.join(x for x in limits if x)}")
        base_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        from contextlib import nullcontext

        with net.freeze_norm_stats() if ft.freeze_bn else nullcontext():  # keeps the base model's BN statistics
            fit_res = fit(net, train_data, val_set, cfg, device=dev,
                          on_progress=on_progress, should_stop=stop)
        if fit_res.cancelled and user_stopped["flag"]:
            return FinetuneResult(None, dice_before, math.nan, dice_on, len(train_frames), len(val_frames),
                                  fit_res.steps, fit_res.seconds, time.perf_counter() - t_start, True, fit_res.history,
                                  "cancelled", fit_res.best_step)
        if base_weight > 0:
            _mix_in_base(net, base_folder, base_weight)
        status("measuring Dice after fine-tuning")
        net.to(dev)
        dice_after = evaluate_dice(net, measure_set, eval_bs, dev)
        kept_base = False
        if val_set is not None and dice_after < dice_before:
            # fit keeps its best validation, but never compares it with the base model's (step 0):
            # the held-out frames say the base is better, so the base weights are what is saved
            net.load_state_dict(base_state)
            dice_after, kept_base = dice_before, True

        info = run_record(ft, base_folder, config, train_frames, val_frames, val_given, fit_res, kept_base,
                          dev, dice_on, dice_before, dice_after)
        info["precision"] = "bf16 autocast" if cfg.cpu_bf16 else "fp32"
        info["augmentation"] = augment_text(augment)
        status(f"saving to {output}")
        name = name or output.name
        card = model_card(name, base_folder.name, info, config.get("task"))
        net.to("cpu")
        path = save_checkpoint(net, output, task=config.get("task"), preprocessing=config.get("preprocessing"),
                               extra={"finetune": info}, card=card)
        return FinetuneResult(path, dice_before, dice_after, dice_on, len(train_frames), len(val_frames),
                              fit_res.steps, fit_res.seconds, time.perf_counter() - t_start, False, fit_res.history,
                              info["stopped_by"], info["best_step"])
    finally:  # free the accelerator's memory whatever happened
        net.to("cpu")
        del net
        _free(dev)
