"""Read and write images and masks: PNG/JPEG/TIFF and NIfTI (affine and header kept), atomically.

NIfTI arrays are stored (x, y, z[, t]); we hand them out in napari/numpy order (z, y, x) (all axes
reversed), so ``volume[k]`` is axial slice k displayed like ``nifti[:, :, k].T``. Writing reverses
the axes again and reuses the source affine and header, so a mask lines up with its scan in any
viewer. Every write goes to a temporary file in the target folder and is renamed into place.

Prediction reorients a volume to the orientation the models were trained in (:func:`reorient`,
``LPS``: the DICOM-like storage of the CT sets) and the mask back to the file's own orientation, so
a volume stored with its axes swapped or flipped segments like the original. Files that cannot be
read, or that would need more memory than :data:`MAX_BYTES`, raise :class:`InputError`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .axes import AXES, propose_axes
from .errors import InputError, OutputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXTS = (".nii", ".nii.gz")
ALL_EXTS = IMAGE_EXTS + NIFTI_EXTS
#: Largest array a file may decode to (a forged header must not exhaust memory).
MAX_BYTES = 4 << 30
#: Orientation (nibabel axis codes of the stored x, y, z) of the CT volumes the models learnt from.
TRAINING_ORIENTATION = ("L", "P", "S")


def _check_bytes(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    n = int(np.prod([int(d) for d in shape], dtype=np.float64)) * int(itemsize)
    if n > MAX_BYTES:
        raise InputError(f"{path}: shape {tuple(shape)} would need {n / 2**30:.1f} GiB of memory; "
                         f"napari-sdunet reads files of up to {MAX_BYTES / 2**30:.0f} GiB")


@dataclass
class Volume:
    """An array in numpy order with what is needed to write a result back in the same space."""

    data: np.ndarray
    axes: str  # e.g. "YX", "YXC", "ZYX"
    affine: np.ndarray | None = None  # 4x4 NIfTI voxel->world (x, y, z order), None for 2-D files
    header: bytes | None = None  # NIfTI-1/2 header block, for writing back
    spacing: tuple[float, ...] | None = None  # per numpy axis (no colour axis), mm
    origin: tuple[float, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def suffix(path: str | os.PathLike) -> str:
    """Lower-case extension, with ``.nii.gz`` as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def natural_key(name: str) -> tuple:
    """Sort key that puts 'frame10' after 'frame9' (numbers compared as numbers, case ignored)."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def stem(path: str | os.PathLike) -> str:
    """File name without its extension (``.nii.gz`` counts as one extension)."""
    name = Path(path).name
    sfx = suffix(path)
    return name[: len(name) - len(sfx)] if sfx else name


def is_nifti(path: str | os.PathLike) -> bool:
    return suffix(path) in NIFTI_EXTS


# ----------------------------------------------------------------------------- reading

def read_image(path: str | os.PathLike) -> Volume:
    """Read a PNG/JPEG/TIFF/BMP image or a NIfTI volume."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    sfx = suffix(path)
    if sfx in NIFTI_EXTS:
        return read_nifti(path)
    if sfx in (".tif", ".tiff"):
        return _read_tiff(path)
    if sfx in IMAGE_EXTS:
        return _read_pillow(path)
    raise InputError(f"{path}: unsupported file type {sfx!r}; expected one of {', '.join(ALL_EXTS)}")


def _read_pillow(path: Path) -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _check_bytes(path, (im.height, im.width, len(im.getbands())), 2)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                arr = np.asarray(im).astype(np.uint16)
                return Volume(arr, "YX")
            elif im.mode == "CMYK":
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot read the image ({e})") from None
    return Volume(arr, "YXC" if arr.ndim == 3 else "YX")


def _read_tiff(path: Path) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: the TIFF holds no image")
            series = tif.series[0]
            _check_bytes(path, series.shape, np.dtype(series.dtype).itemsize)
            arr = series.asarray()
            axes = series.axes.upper()
    except InputError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise InputError(f"{path}: cannot read the TIFF ({type(e).__name__}: {e})") from None
    axes = _napari_axes(arr, axes)
    return Volume(arr, axes)


def _napari_axes(arr: np.ndarray, tiff_axes: str) -> str:
    """Map tifffile's axes (I pages, S samples, Z, T, Y, X, C) to ours; else the shape's
    :func:`propose_axes`. tifffile writes Q for an axis it knows nothing of (a plain numpy array
    saved with its shape only): such a file is proposed axes as the same array in a layer would be."""
    tiff_axes = tiff_axes.replace("S", "C").replace("I", "Z")
    if len(tiff_axes) == arr.ndim and tiff_axes in AXES:
        return tiff_axes
    return propose_axes(arr.shape, rgb=len(tiff_axes) == arr.ndim and tiff_axes.endswith("C"))


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file as numpy order (all axes reversed) keeping its affine and header."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        _check_bytes(path, img.shape, max(8, np.dtype(img.get_data_dtype()).itemsize))
        raw = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise InputError(f"{path}: cannot read the NIfTI file ({type(e).__name__}: {e})") from None
    if raw.ndim > 4:
        raw = raw.reshape(raw.shape[:4])
    data = np.ascontiguousarray(raw.T)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: raw.ndim])
    affine = np.asarray(img.affine, dtype=float)
    spacing = tuple(reversed([abs(z) if z else 1.0 for z in zooms]))
    origin = tuple(reversed([float(v) for v in affine[: min(3, raw.ndim), 3]]))
    if len(origin) < len(spacing):
        origin = (0.0,) * (len(spacing) - len(origin)) + origin
    axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(raw.ndim, "")
    return Volume(data, axes, affine=affine, header=bytes(img.header.binaryblock),
                  spacing=spacing, origin=origin)


def read_mask(path: str | os.PathLike, like: Volume | None = None) -> np.ndarray:
    """A reference mask as a boolean array: any non-zero value is foreground (negative label values
    too), in any channel of a colour file. NaN is refused: it is neither object nor background.

    With ``like`` (the image's Volume), a NIfTI mask stored in another orientation than its image
    is turned into the image's storage, so the two compare voxel by voxel.
    """
    vol = read_image(path)
    arr = np.asarray(vol.data)
    if like is not None and vol.affine is not None and like.affine is not None and arr.ndim == 3:
        target = orientation_of(like.affine)
        if target is not None:
            arr, _ = reorient(arr, vol.affine, target)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported mask pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise InputError(f"{path}: the mask contains NaN values; masks must be numbers (0 = background)")
    fg = arr != 0
    if vol.axes.endswith("C"):
        fg = fg[..., :3].any(axis=-1) if arr.shape[-1] >= 3 else fg[..., 0]
    return fg


# ----------------------------------------------------------------------------- orientation

def orientation_of(affine: np.ndarray | None) -> tuple[str, ...] | None:
    """nibabel axis codes of the stored x, y, z (e.g. ``("L", "P", "S")``), None without an affine."""
    if affine is None:
        return None
    import nibabel as nib

    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        return None
    try:
        codes = tuple(nib.aff2axcodes(aff))
    except Exception:  # a singular affine: no orientation to speak of
        return None
    return codes if all(isinstance(c, str) for c in codes) else None


def reorient(data: np.ndarray, affine: np.ndarray | None, target: tuple[str, ...] = TRAINING_ORIENTATION,
             ) -> tuple[np.ndarray, Any]:
    """``data`` (numpy order z, y, x of a NIfTI volume) as if stored in ``target`` orientation.

    Returns ``(data_in_target, back)``; ``back(array)`` maps an array of the reoriented spatial
    shape (a mask or probabilities) back to the file's own storage, to be written with the
    file's own affine. Only axis permutations and flips are applied (no resampling), so ``back``
    is exact. Without a usable affine, or for 2-D data, both are the identity.
    """
    from nibabel import orientations as no

    arr = np.asarray(data)
    codes = orientation_of(affine)
    if codes is None or arr.ndim != 3 or tuple(codes) == tuple(target):
        return arr, lambda a: a
    src = no.io_orientation(np.asarray(affine, dtype=float))
    if np.isnan(src).any():
        return arr, lambda a: a
    dst = no.axcodes2ornt(target)
    fwd, inv = no.ornt_transform(src, dst), no.ornt_transform(dst, src)
    out = np.ascontiguousarray(no.apply_orientation(arr.T, fwd).T)

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(no.apply_orientation(np.asarray(a).T, inv).T)

    return out, back


# ----------------------------------------------------------------------------- writing

def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.PID-XXXX.tmpEXT`` files that a killed write of ``path`` left beside it."""
    path = Path(path)
    head = f".{path.name}."
    pattern = re.compile(r"(\d+)-[A-Za-z0-9_]+\.tmp" + re.escape(suffix(path)))
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if entry.name.startswith(head) and entry.is_file():
            m = pattern.fullmatch(entry.name[len(head):])
            if m and not _pid_alive(int(m.group(1))):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def default_mode(folder: bool = False) -> int:
    """The permissions a plain ``open()`` / ``mkdir()`` would give under the process umask.

    ``tempfile`` makes private (0600 / 0700) temporaries; a file renamed into place keeps them, so a
    saved model or mask would be unreadable to the user's other accounts and to shared installs.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension); rename it into place on success.

    The temporary's name carries our process id, so the next write of ``path`` can remove what a
    killed one left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix(path)}",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, default_mode())
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _mask_dtype(arr: np.ndarray) -> np.ndarray:
    """The smallest unsigned type for labels; bool -> uint8; floats -> float32."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        top = int(arr.max()) if arr.size else 0
        if arr.size and int(arr.min()) < 0:
            return arr  # signed image data (e.g. CT in HU): keep the type
        return arr.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise ValueError(f"cannot write pixel type {arr.dtype}")


def write_nifti(path: str | os.PathLike, data: np.ndarray, *, affine: np.ndarray | None = None,
                header: bytes | None = None, spacing: tuple[float, ...] | None = None,
                origin: tuple[float, ...] | None = None) -> Path:
    """Write numpy-order ``data`` as NIfTI, reusing a source ``affine``/``header`` when given.

    Without an affine one is built from ``spacing``/``origin`` (numpy order; identity otherwise).
    """
    import nibabel as nib

    path = Path(path)
    arr = _mask_dtype(data)
    raw = np.asarray(arr).T
    if affine is None:
        affine = np.eye(4)
        nd = min(3, raw.ndim)
        if spacing is not None:
            sp = list(reversed(spacing))[:nd]
            affine[range(len(sp)), range(len(sp))] = sp
        if origin is not None:
            org = list(reversed(origin))[:nd]
            affine[: len(org), 3] = org
    affine = np.asarray(affine, dtype=float)
    hdr = None
    if header is not None:
        try:
            hdr = nib.Nifti1Header(binaryblock=header) if len(header) == 348 else None
        except Exception:  # a header we cannot parse is dropped, the affine still positions the mask
            hdr = None
    img = nib.Nifti1Image(raw, affine, header=hdr)
    img.header.set_data_dtype(raw.dtype)
    img.header.set_slope_inter(1, 0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    if hdr is not None:
        img.header.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.header.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_image(path: str | os.PathLike, data: np.ndarray, *, compress: bool = True) -> Path:
    """Write a 2-D image/mask as PNG/TIFF/JPEG (by extension), or any-D array as TIFF."""
    path = Path(path)
    sfx = suffix(path)
    arr = np.asarray(data)
    if sfx in (".tif", ".tiff"):
        import tifffile

        arr = _mask_dtype(arr) if arr.dtype == bool or arr.dtype.kind in "iu" else arr
        rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr, compression="zlib" if compress else None,
                             photometric="rgb" if rgb else "minisblack")
        return path
    if sfx in (".png", ".jpg", ".jpeg", ".bmp"):
        from PIL import Image

        if arr.ndim not in (2, 3):
            raise ValueError(f"{sfx} holds one 2-D image; got shape {arr.shape} (write .tif or .nii.gz)")
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype.kind in "iu" and arr.dtype != np.uint8:
            arr = arr.astype(np.uint16 if arr.max() > 255 and arr.ndim == 2 and sfx == ".png" else np.uint8)
        elif arr.dtype.kind == "f":
            arr = np.clip(arr * 255.0, 0, 255).astype(np.uint8)
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(sfx, sfx[1:].upper()))
        return path
    if sfx in NIFTI_EXTS:
        return write_nifti(path, arr)
    raise ValueError(f"{path}: unsupported output type {sfx!r}")


def write_mask_like(path: str | os.PathLike, mask: np.ndarray, source: Volume) -> Path:
    """Write a mask in the source's space: NIfTI with the source affine/header, else PNG/TIFF."""
    if is_nifti(path):
        return write_nifti(path, mask, affine=source.affine, header=source.header,
                           spacing=source.spacing, origin=source.origin)
    mask = np.asarray(mask)
    if mask.dtype == bool or (mask.dtype.kind in "iu" and mask.size and mask.max() <= 1 and suffix(path) == ".png"):
        mask = (mask > 0).astype(np.uint8) * 255  # a viewable 0/255 PNG, as the data sets store masks
    return write_image(path, mask)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image and NIfTI files of a folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and suffix(p) in ALL_EXTS)
