"""Data sets of the three tasks, in our uniform layout and in the layouts of the original downloads.

Every loader returns the engine's :class:`~napari_sdunet.batches.SegDataset` of ``(image (C,H,W) float32
in [0,1], mask (1,H,W) {0,1})`` pairs at the task's input size, each image read by
:func:`napari_sdunet.io.read_image` and preprocessed by :func:`napari_sdunet.batches.prepare_pair` --
the reader and the preprocessing that inference applies to a user's image. Layouts understood
(detected from the folder):

* nuclei: ``images/ + masks/ + split.csv`` (``nuclei_96``, ``nuclei``: resized), or the DSB2018
  download ``stage1_train/<id>/images/<id>.png + masks/*.png`` (masks unioned; 80/10/10 split, seed 42);
* polyps: ``images/ + masks/ + split.csv`` (``polyps``), or CVC-ClinicDB ``Original/<n>.tif`` +
  ``Ground Truth/<n>.tif`` (split 23/3/3 by sequence, seed 42, the published frame->sequence table);
* liver: 8-bit windowed slices ``images/ + masks/ + split.csv`` (``liver_lits_slices``), HU volumes
  ``images/*.nii.gz + masks/*.nii.gz`` (``liver/``), or LiTS ``volume-N.nii + segmentation-N.nii``
  (split by ``lits_paper_split.csv``). HU volumes are windowed, resampled to 128x128 axial slices,
  liver + tumour = foreground.
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_sdunet.batches import SegDataset
from napari_sdunet.io import natural_key
from napari_sdunet.tasks import TASKS

#: CVC-ClinicDB frame ranges of its 29 video sequences (published with the data set).
CVC_SEQUENCES = [(1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177), (178, 199),
                 (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317), (318, 342), (343, 363),
                 (364, 383), (384, 408), (409, 428), (429, 447), (448, 466), (467, 478), (479, 503), (504, 528),
                 (529, 546), (547, 571), (572, 591), (592, 612)]

#: Default data folder of each task under the data root.
DEFAULT_SOURCES = {"nuclei": "nuclei_96", "polyps": "polyps", "liver": "liver_lits_slices"}
#: Default per-volume test set of the liver task (HU volumes).
LIVER_TEST_SOURCE = "liver"


class DataError(ValueError):
    """A data folder is missing or not in a layout we understand."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """$SDUNET_DATA, else ``../shared/data`` relative to the repository (where CI has it)."""
    env = os.environ.get("SDUNET_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data"


# -- reading ------------------------------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray:
    """A PNG/TIFF/JPEG as a numpy array (H, W) or (H, W, C), through the plugin's reader."""
    from napari_sdunet.io import read_image as read

    return np.asarray(read(path).data)


def image_prep(task: str, size: Sequence[int] | None) -> dict:
    """Preprocessing of a task's 2-D image files: the task's channels, scaled by bit depth (8-bit
    files, CT slices included: those are windowed already), resized to ``size`` (None: native)."""
    channels = TASKS[task].preprocessing.channels
    return {"input_size": list(size) if size else None, "channels": channels, "ct_window": None}


def _read_split_csv(path: Path) -> dict[str, tuple[str, str]]:
    """id -> (split, group) from a split.csv (group = sequence or volume column when present)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["id"]: (r["split"], r.get("sequence") or r.get("volume") or "") for r in rows}


def random_split(ids: Sequence[str], fractions: tuple[float, float] = (0.8, 0.1), seed: int = 42,
                 ) -> dict[str, str]:
    """The paper protocol's random split: sorted ids shuffled with random.Random(seed), train/val/test."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    n_train = round(fractions[0] * len(ids))
    n_val = round(fractions[1] * len(ids))
    out = {i: "train" for i in ids[:n_train]}
    out.update({i: "val" for i in ids[n_train:n_train + n_val]})
    out.update({i: "test" for i in ids[n_train + n_val:]})
    return out


def cvc_sequence_split(seed: int = 42, n_val: int = 3, n_test: int = 3) -> dict[int, str]:
    """Sequence number (1..29) -> split: sequences shuffled with random.Random(seed); train, then val, then test."""
    seqs = list(range(1, len(CVC_SEQUENCES) + 1))
    random.Random(seed).shuffle(seqs)
    n_train = len(seqs) - n_val - n_test
    out = {s: "train" for s in seqs[:n_train]}
    out.update({s: "val" for s in seqs[n_train:n_train + n_val]})
    out.update({s: "test" for s in seqs[n_train + n_val:]})
    return out


def cvc_sequence_of(frame: int) -> int:
    for k, (a, b) in enumerate(CVC_SEQUENCES, 1):
        if a <= frame <= b:
            return k
    raise DataError(f"CVC-ClinicDB frame {frame} is outside 1..612")


def _want(split: str | Sequence[str]) -> set[str]:
    return {split} if isinstance(split, str) else set(split)


# -- 2-D sets ----------------------------------------------------------------------------------------

def _uniform_2d(root: Path, splits: set[str], prep: dict, limit: int | None) -> SegDataset:
    table = _read_split_csv(root / "split.csv")
    ids = spread([i for i in sorted(table, key=natural_key) if table[i][0] in splits], limit)
    if not ids:
        raise DataError(f"{root}: no images in split {sorted(splits)}")
    pairs = [(read_image(root / "images" / f"{i}.png"), _mask_png(root / "masks" / f"{i}.png")) for i in ids]
    return SegDataset.from_pairs(pairs, prep, ids, [table[i][1] for i in ids])


def _mask_png(path: Path) -> np.ndarray:
    m = read_image(path)
    return (m if m.ndim == 2 else m[..., 0]) > 0


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced over the list (all of them when limit is None)."""
    if not limit or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _dsb2018(root: Path, splits: set[str], prep: dict, limit: int | None) -> SegDataset:
    base = root / "stage1_train" if (root / "stage1_train").is_dir() else root
    ids_all = sorted(p.name for p in base.iterdir() if (p / "images").is_dir())
    table = random_split(ids_all)
    ids = spread([i for i in ids_all if table[i] in splits], limit)
    pairs = []
    for i in ids:
        img = read_image(base / i / "images" / f"{i}.png")
        mask = np.zeros(img.shape[:2], bool)
        for mp in sorted((base / i / "masks").glob("*.png")):  # one file per nucleus: their union
            mask |= read_image(mp) > 127
        pairs.append((img, mask))
    return SegDataset.from_pairs(pairs, prep, ids, ["" for _ in ids])


def _cvc_clinicdb(root: Path, splits: set[str], prep: dict, limit: int | None) -> SegDataset:
    orig = root / "Original"
    gt = root / "Ground Truth"
    files = sorted((p for p in orig.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png")),
                   key=lambda p: int(p.stem))
    seq_split = cvc_sequence_split()
    sel = spread([p for p in files if seq_split[cvc_sequence_of(int(p.stem))] in splits], limit)
    pairs, ids, groups = [], [], []
    for p in sel:
        mp = gt / p.name
        if not mp.is_file():
            raise DataError(f"{p.name} has no ground truth in {gt}")
        m = read_image(mp)
        pairs.append((read_image(p), (m if m.ndim == 2 else m[..., 0]) >= 128))
        ids.append(p.stem)
        groups.append(str(cvc_sequence_of(int(p.stem))))
    return SegDataset.from_pairs(pairs, prep, ids, groups)


def load_native(task: str, split: str | Sequence[str], *, source: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None, limit: int | None = None) -> SegDataset:
    """A 2-D split at its own pixel size: a :class:`SegDataset` of images of many sizes.

    For training on random patches at native scale (:meth:`SegDataset.batches` with a patch size) and
    tiled inference; only the uniform layout (``images/ + masks/ + split.csv``) is read this way.
    """
    path = resolve_source(task, source, data_root)
    if detect_layout(path) != "uniform_2d":
        raise DataError(f"{path}: native-resolution training needs the images/ + masks/ + split.csv layout")
    return _uniform_2d(path, _want(split), image_prep(task, None), limit)


# -- CT volumes --------------------------------------------------------------------------------------

def ct_prep(size: Sequence[int] | None, win: Sequence[float]) -> dict:
    """Preprocessing of HU volumes: the liver model's (window ``win``, one channel, ``size``)."""
    return {"input_size": list(size) if size else None, "channels": 1, "modality": "ct",
            "ct_window": [float(win[0]), float(win[1])]}


def read_volume(path: Path) -> np.ndarray:
    """A NIfTI as (Z, Y, X) in the training orientation, the way the plugin reads it for prediction.

    ``out[k]`` is the axial slice as displayed; a volume stored in another orientation is turned
    (axis swaps and flips only) by :func:`napari_sdunet.io.reorient` first.
    """
    from napari_sdunet.io import read_nifti, reorient

    vol = read_nifti(path)
    if vol.data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {vol.data.shape}")
    return np.ascontiguousarray(reorient(vol.data, vol.affine)[0])


def volume_set(vid: str, ct: np.ndarray, mask: np.ndarray, prep: dict) -> SegDataset:
    """The axial slices of one HU volume (Z, Y, X) as the model sees them (``prep``: :func:`ct_prep`)."""
    pairs = [(ct[k], mask[k]) for k in range(ct.shape[0])]
    return SegDataset.from_pairs(pairs, prep, [f"{vid}_{k:04d}" for k in range(len(pairs))], [vid] * len(pairs),
                                 channel_axis=False)


def _hu_volume_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(id, ct, mask) of a volume folder: images/+masks/ (same names) or LiTS volume-N/segmentation-N."""
    out = []
    if (root / "images").is_dir():
        for p in sorted((root / "images").iterdir(), key=lambda p: natural_key(p.name)):
            if p.name.endswith((".nii", ".nii.gz")):
                vid = p.name.split(".nii")[0]
                out.append((vid, p, root / "masks" / p.name))
    else:
        for p in sorted(root.glob("volume-*.nii*"), key=lambda p: natural_key(p.name)):
            n = re.match(r"volume-(\d+)\.nii", p.name).group(1)
            seg = next(iter(sorted(root.glob(f"segmentation-{n}.nii*"))), None)
            if seg is None:
                raise DataError(f"{p.name} has no segmentation-{n}.nii in {root}")
            out.append((f"volume-{n}", p, seg))
    return out


def _volume_split(root: Path, data_root: Path | None) -> dict[str, str]:
    for cand in (root / "split.csv", root / "lits_paper_split.csv",
                 (data_root / "liver" / "lits_paper_split.csv") if data_root else None):
        if cand is not None and cand.is_file():
            return {k: v[0] for k, v in _read_split_csv(cand).items()}
    raise DataError(f"{root}: no split.csv or lits_paper_split.csv")


def load_volumes(root: Path, splits: str | Sequence[str] = "test", data_root: Path | None = None,
                 limit: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """HU CT volumes of a folder as (id, ct (Z,Y,X), mask (Z,Y,X) bool)."""
    table = _volume_split(root, data_root)
    want = _want(splits)
    out = []
    for vid, ct, mk in _hu_volume_pairs(root):
        if table.get(vid) in want:
            out.append((vid, read_volume(ct), read_volume(mk) > 0))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{root}: no volumes in split {sorted(want)}")
    return out


def _ct_slices(root: Path, splits: set[str], prep: dict, data_root: Path | None, limit: int | None) -> SegDataset:
    ds = SegDataset.concat([volume_set(vid, ct, mask, prep) for vid, ct, mask in load_volumes(root, splits, data_root)])
    return ds.subset(indices=spread(list(range(len(ds))), limit)) if limit else ds


# -- entry point -------------------------------------------------------------------------------------

def detect_layout(root: Path) -> str:
    """Name the layout of a data folder (see the module docstring)."""
    if (root / "images").is_dir() and (root / "split.csv").is_file():
        if any(p.name.endswith((".nii", ".nii.gz")) for p in (root / "images").iterdir()):
            return "hu_volumes"
        return "uniform_2d"
    if (root / "stage1_train").is_dir() or any((p / "images").is_dir() and (p / "masks").is_dir()
                                               for p in root.iterdir() if p.is_dir()):
        return "dsb2018"
    if (root / "Original").is_dir() and (root / "Ground Truth").is_dir():
        return "cvc_clinicdb"
    if any(root.glob("volume-*.nii*")):
        return "lits"
    if (root / "images").is_dir() and any(p.name.endswith((".nii", ".nii.gz")) for p in (root / "images").iterdir()):
        return "hu_volumes"
    raise DataError(f"{root}: not a data layout we know (images/+masks/+split.csv, DSB2018 stage1_train, "
                    "CVC-ClinicDB Original/ + Ground Truth/, LiTS volume-N.nii + segmentation-N.nii)")


def resolve_source(task: str, source: str | os.PathLike | None, data_root: str | os.PathLike | None) -> Path:
    """A data folder: an explicit path, a folder name under the data root, or the task's default."""
    root = Path(data_root) if data_root else default_data_root()
    if source is None:
        path = root / DEFAULT_SOURCES[task]
    else:
        p = Path(source)
        path = p if p.is_dir() else root / str(source)
    if not path.is_dir():
        raise DataError(f"data folder {path} not found (use --data-root or --source)")
    return path


def load_split(task: str, split: str | Sequence[str], *, source: str | os.PathLike | None = None,
               data_root: str | os.PathLike | None = None, size: Sequence[int] | None = None,
               ct_window: Sequence[float] | None = None, limit: int | None = None) -> SegDataset:
    """The ``split`` ("train", "val", "test" or several) of ``task`` at ``size`` (default: the preset's)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    prep = TASKS[task].preprocessing
    size = list(size or prep.input_size)
    win = list(ct_window or prep.ct_window or (-1000.0, 1000.0))
    path = resolve_source(task, source, data_root)
    layout = detect_layout(path)
    want = _want(split)
    droot = Path(data_root) if data_root else default_data_root()
    if layout == "uniform_2d":
        return _uniform_2d(path, want, image_prep(task, size), limit)
    if layout == "dsb2018":
        return _dsb2018(path, want, image_prep(task, size), limit)
    if layout == "cvc_clinicdb":
        return _cvc_clinicdb(path, want, image_prep(task, size), limit)
    return _ct_slices(path, want, ct_prep(size, win), droot, limit)
