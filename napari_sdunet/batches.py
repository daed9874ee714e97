"""Training batches drawn from images held in RAM, augmented on the whole batch with torch ops.

Why this exists: the SD networks cost many times the FLOPs of a U-Net, so on a 2-core CPU a
training step must not wait for per-sample Python. :class:`BatchSource` keeps a split as uint8
tensors (one stacked tensor for fixed-size frames, or a list of full-resolution images), and
``batch(step)`` returns the step's batch as a pure function of ``(seed, step)``: a resumed run sees
exactly the batches it would have seen, with no data-loader state to save.

One geometric transform per sample -- random zoom, random position, one of the 8 flips/90-degree
rotations (rotations on square patches only) -- is applied to image and mask together by a single
``grid_sample`` call over the batch; the mask is resampled bilinearly and thresholded at 0.5, so it
stays aligned with the image. Intensity jitter (brightness, contrast, saturation, per-channel gain,
gamma) touches the image only.

:class:`SegDataset` is the one container of labelled images in the project: training from scratch,
the training campaign and fine-tuning all hold their frames in it, preprocessed by
:func:`prepare_pair` -- the same :func:`napari_sdunet.preprocess.to_model_input` that inference
feeds the model with -- and stored as 8-bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: The 8 dihedral transforms as 2x2 matrices acting on (x, y) sample coordinates; the first 4 keep
#: the axes (identity and flips), the last 4 swap them (90-degree rotations, transposes).
_DIHEDRAL = torch.tensor([
    [[1, 0], [0, 1]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[-1, 0], [0, -1]],
    [[0, 1], [1, 0]], [[0, -1], [1, 0]], [[0, 1], [-1, 0]], [[0, -1], [-1, 0]],
], dtype=torch.float32)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """A model input in [0, 1] as uint8 (x 255): a quarter of the RAM; lossless for 8-bit sources."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def prepare_pair(image: np.ndarray, mask: np.ndarray | None, prep: dict[str, Any], channel_axis: bool | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One labelled frame as the model sees it: image (C, h, w) uint8 and mask (1, h, w) uint8 {0, 1}.

    The image goes through :func:`~napari_sdunet.preprocess.to_model_input` (intensity rule of the
    modality, channels, resize to ``prep["input_size"]``; None keeps the frame's own size), exactly as
    at inference; the mask through :func:`~napari_sdunet.preprocess.mask_to_model` (non-zero = foreground).
    """
    from .preprocess import mask_to_model, to_model_input

    x = quantize(to_model_input(image, prep, channel_axis=channel_axis))
    m = None if mask is None else mask_to_model(mask, prep).to(torch.uint8)
    return x, m


@dataclass
class SegDataset(torch.utils.data.Dataset):
    """Labelled images in RAM: ``(x (C,H,W) float in [0,1], y (1,H,W) float {0,1})`` per item.

    ``images``/``masks``: a stacked tensor (N,C,H,W) / (N,1,H,W) when all items share a size, or lists
    of (C,H,W) / (1,H,W) tensors of any sizes (images at native resolution); images uint8 (scaled by
    1/255 on access) or float in [0, 1]. ``groups`` keeps what a split holds together (a video
    sequence, a CT volume). Indexing needs one size per item only; :meth:`batches` trains on any.
    """

    images: torch.Tensor | list[torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.masks):
            raise ValueError(f"need as many masks as images, got {len(self.images)} and {len(self.masks)}")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x, (self.masks[i] > 0).float()

    @property
    def stacked(self) -> bool:
        return torch.is_tensor(self.images)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray]], prep: dict[str, Any],
                   ids: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                   channel_axis: bool | Sequence[bool] | None = None) -> SegDataset:
        """(image, mask) arrays through :func:`prepare_pair`; stacked when they end up one size.

        ``channel_axis``: one flag for all images, or one per image (None: 3-D arrays are colour)."""
        flags = list(channel_axis) if isinstance(channel_axis, Sequence) else [channel_axis] * len(pairs)
        xs, ms = [], []
        for (image, mask), has_c in zip(pairs, flags, strict=True):
            x, m = prepare_pair(image, mask, prep, has_c)
            xs.append(x)
            ms.append(m)
        if xs and len({tuple(x.shape) for x in xs}) == 1:
            return cls(torch.stack(xs), torch.stack(ms), list(ids or []), list(groups or []))
        return cls(xs, ms, list(ids or []), list(groups or []))

    @classmethod
    def concat(cls, parts: Sequence[SegDataset]) -> SegDataset:
        """One set of several (stacked when every part is stacked at one size)."""
        ids = [i for p in parts for i in p.ids]
        groups = [g for p in parts for g in (p.groups or [""] * len(p))]
        if parts and all(p.stacked for p in parts) and len({tuple(p.images.shape[1:]) for p in parts}) == 1:
            return cls(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]), ids, groups)
        return cls([x for p in parts for x in p.images], [m for p in parts for m in p.masks], ids, groups)

    def subset(self, n: int | None = None, indices: Sequence[int] | None = None) -> SegDataset:
        """The first ``n`` items (or the given indices)."""
        idx = list(indices) if indices is not None else list(range(min(n or len(self), len(self))))
        if self.stacked:
            t = torch.tensor(idx, dtype=torch.long)
            images, masks = self.images[t], self.masks[t]
        else:
            images, masks = [self.images[i] for i in idx], [self.masks[i] for i in idx]
        return SegDataset(images, masks, [self.ids[i] for i in idx],
                          [self.groups[i] for i in idx] if self.groups else [])

    def center_crops(self, size: int) -> SegDataset:
        """A fixed-size set from items of any sizes: the central ``size`` square of each (see
        :func:`center_crops`)."""
        x, m = center_crops(list(self.images), list(self.masks), size)
        return SegDataset(x, m, list(self.ids), list(self.groups))

    def batches(self, batch_size: int, *, patch: Sequence[int] | None = None, augment: AugmentConfig | None = None,
                seed: int = 0) -> BatchSource:
        """Training batches of this set (:class:`BatchSource`)."""
        return BatchSource(self.images, self.masks, batch_size, patch=patch, augment=augment or AugmentConfig(),
                           seed=seed)


@dataclass
class AugmentConfig:
    """What a recipe may change; every field off means the batch is the data as stored.

    ``scale``: (min, max) zoom factor, drawn log-uniformly (> 1 magnifies: objects look bigger).
    ``intensity``: brightness/contrast amplitude; ``color``: saturation and per-channel gain
    amplitude (RGB only); ``gamma``: amplitude of log-gamma; ``noise``: Gaussian noise sd.
    """

    flips: bool = False
    rot90: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    intensity: float = 0.0
    color: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.flips or self.rot90 or tuple(self.scale) != (1.0, 1.0)

    #: the kinds ``python -m training fit --augment`` names
    KINDS = ("flip", "rot90", "intensity")

    @classmethod
    def from_kinds(cls, kinds: Sequence[str], strength: float = 0.15) -> AugmentConfig:
        """Flips / 90-degree turns / brightness-contrast-gamma jitter of ``strength``, by name."""
        unknown = set(kinds) - set(cls.KINDS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {cls.KINDS}")
        jitter = strength if "intensity" in kinds else 0.0
        return cls(flips="flip" in kinds, rot90="rot90" in kinds, intensity=jitter, gamma=jitter)


def steps_per_epoch(n_items: int, batch_size: int, world: int = 1) -> int:
    """Whole batches in one pass over ``n_items`` (the last partial batch is dropped), at least 1."""
    return max(1, n_items // (batch_size * world))


@dataclass
class BatchSource:
    """Batches of ``(x (B,C,h,w) float in [0,1], y (B,1,h,w) {0,1})`` for :func:`train_loop.fit`.

    ``images``/``masks``: a tensor (N,C,H,W) / (N,1,H,W), or lists of (C,H,W) / (1,H,W) tensors of
    any sizes; images uint8 (scaled by 1/255) or float in [0, 1], masks non-zero = foreground.
    ``patch``: the training size (h, w); None: the stored frame size
    (all frames must then share it). Each epoch visits every item once in a random order.
    """

    images: torch.Tensor | list[torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    batch_size: int
    patch: Sequence[int] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    rank: int = 0  # under DDP: this process's share of every step (see shard)
    world: int = 1

    def __post_init__(self) -> None:
        if len(self.images) != len(self.masks) or len(self.images) == 0:
            raise ValueError(f"need as many masks as images (got {len(self.images)} and {len(self.masks)}), "
                             "and at least one")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.patch is None:
            sizes = {tuple(im.shape[-2:]) for im in self.images}
            if len(sizes) != 1:
                raise ValueError(f"frames of several sizes {sorted(sizes)[:4]}...: give a patch size")
            self.patch = list(next(iter(sizes)))
        self.patch = [int(self.patch[0]), int(self.patch[1])]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.images), self.batch_size, self.world)

    def shard(self, rank: int, world: int) -> BatchSource:
        """The same batches split over ``world`` processes: rank r gets its own ``batch_size`` items
        of every step (a distinct slice of the epoch's permutation, and its own augmentation draws)."""
        from dataclasses import replace

        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        return replace(self, rank=rank, world=world)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * self.world + self.rank) % (2**63))

    def indices(self, step: int) -> torch.Tensor:
        """The items of ``step``'s batch: a slice of that epoch's permutation."""
        spe = self.steps_per_epoch
        epoch, k = divmod(step, spe)
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        j = k * self.world + self.rank
        b = self.batch_size
        # fewer items than the step needs: the permutation wraps around
        return perm.repeat(math.ceil((j + 1) * b / len(perm)))[j * b:(j + 1) * b]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch (the same tensors every time it is asked for)."""
        g = self._generator(step)
        idx = self.indices(step).tolist()
        aug = self.augment
        ph, pw = self.patch
        smin = float(aug.scale[0])
        # 1. a window per sample, large enough for the smallest zoom (cheap uint8 slicing)
        wh, ww = math.ceil(ph / smin), math.ceil(pw / smin)
        xs, ys = [], []
        for i in idx:
            im, mk = self.images[i], self.masks[i]
            x, y = _window(im, mk, (wh, ww), g)
            xs.append(x)
            ys.append(y)
        x = torch.stack(xs).float()
        if xs[0].dtype == torch.uint8:  # stored as 8-bit: to [0, 1]; float images are already there
            x = x.div_(255.0)
        y = (torch.stack(ys) > 0).float()
        # 2. one affine resampling for the batch: zoom, shift inside the window, flip/rotate
        if aug.geometric or (wh, ww) != (ph, pw):
            x, y = _resample(x, y, (ph, pw), aug, g)
        # 3. intensity jitter on the image only
        x = jitter_intensity(x, aug, g)
        return x.contiguous(), y.contiguous()


def _pad_to(im: torch.Tensor, mk: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and mask padded alike (reflect; replicate when too small to reflect) to at least ``size``."""
    h, w = im.shape[-2:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if not (ph or pw):
        return im, mk
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return (F.pad(im[None].float(), pads, mode=mode)[0].to(im.dtype),
            F.pad(mk[None].float(), pads, mode=mode)[0].to(mk.dtype))


def center_crops(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``size`` x ``size`` square of each image and mask (reflect-padded when smaller),
    stacked: a fixed-size validation set from images of any sizes, cheap and the same every time."""
    xs, ms = [], []
    for im, mk in zip(images, masks, strict=True):
        im, mk = _pad_to(im, mk, (size, size))
        h, w = im.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        xs.append(im[:, top:top + size, left:left + size])
        ms.append(mk[:, top:top + size, left:left + size])
    return torch.stack(xs), torch.stack(ms)


def _window(im: torch.Tensor, mk: torch.Tensor, size: tuple[int, int], g: torch.Generator,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` window of image and mask at a random place (reflect-padded when the image is smaller)."""
    im, mk = _pad_to(im, mk, size)
    h, w = im.shape[-2:]
    wh, ww = size
    top = int(torch.randint(0, h - wh + 1, (), generator=g))
    left = int(torch.randint(0, w - ww + 1, (), generator=g))
    return im[:, top:top + wh, left:left + ww], mk[:, top:top + wh, left:left + ww]


def _resample(x: torch.Tensor, y: torch.Tensor, out: tuple[int, int], aug: AugmentConfig,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom/shift/flip/rotate every sample of the batch in one ``grid_sample`` (image and mask alike)."""
    b, _, wh, ww = x.shape
    ph, pw = out
    smin, smax = float(aug.scale[0]), float(aug.scale[1])
    log_s = torch.empty(b).uniform_(math.log(smin), math.log(smax), generator=g)
    s = torch.exp(log_s)  # zoom: the output covers (ph/s, pw/s) input pixels
    # 8 flips/rotations on square patches; on others the 4 that keep the shape (rot180 = both flips)
    n_ops = 8 if (aug.rot90 and ph == pw) else (4 if (aug.flips or aug.rot90) else 1)
    ops = torch.randint(0, n_ops, (b,), generator=g) if n_ops > 1 else torch.zeros(b, dtype=torch.long)
    rot = _DIHEDRAL[ops]  # (b, 2, 2)
    # half-extent of the sampled region in the window's normalised coordinates [-1, 1]
    ext_x = (pw / s) / ww
    ext_y = (ph / s) / wh
    # random centre, so that a magnified region stays inside the window (a random crop)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - ext_x).clamp_min(0)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - ext_y).clamp_min(0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, :2] = rot[:, 0] * ext_x[:, None]
    theta[:, 1, :2] = rot[:, 1] * ext_y[:, None]
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 1, ph, pw], align_corners=False)
    # the same padding for both, so that a reflected border carries its reflected labels
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False) >= 0.5).float()
    return x, y


def jitter_intensity(x: torch.Tensor, aug: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-sample brightness / contrast / saturation / channel gain / gamma / noise, clipped to [0, 1]."""
    b, c = x.shape[:2]
    if aug.intensity <= 0 and aug.color <= 0 and aug.gamma <= 0 and aug.noise <= 0:
        return x

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    if aug.intensity > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + aug.intensity * u(b, 1, 1, 1)
        bright = aug.intensity * u(b, 1, 1, 1)
        x = (x - mean) * contrast + mean + bright
    if aug.color > 0 and c == 3:
        grey = x.mean(dim=1, keepdim=True)
        sat = 1 + aug.color * u(b, 1, 1, 1)
        x = grey + (x - grey) * sat
        x = x * (1 + 0.5 * aug.color * u(b, c, 1, 1))
    x = x.clamp(0, 1)
    if aug.gamma > 0:
        x = x.pow(torch.exp(aug.gamma * u(b, 1, 1, 1)))
    if aug.noise > 0:
        x = (x + aug.noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x
