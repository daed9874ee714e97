"""Checkpoint folders: ``config.json`` (architecture, preset, preprocessing) + ``model.safetensors``.

Loading never unpickles anything: weights are safetensors, the config is JSON, and the weights'
SHA-256 recorded in the config is checked, so a tampered or truncated file is reported clearly.
Saving is atomic: a new folder is written beside the target and swapped in, so an interrupted save
leaves any previous model intact; the temporaries a killed save leaves behind are removed by the
next save of that model.

config.json is untrusted input: it is checked against a schema with bounds (:func:`validate_config`),
the network is sized on torch's meta device, and the weights file's header (names, shapes, dtypes)
is compared with it before a single weight is allocated. ``weights.file`` must name a file inside
the model folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ModelConfigError, OutputError
from .tasks import MODALITIES

if TYPE_CHECKING:
    import torch

FORMAT = "napari-sdunet-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: A config.json larger than this is not one we wrote (ours are a few kB): refuse to read it.
MAX_CONFIG_BYTES = 8 << 20
#: A temporary without a process id in its name (older versions) is stale after this long.
STALE_SECONDS = 600
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"I64", "I32", "I16", "I8", "U8", "BOOL"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in blocks (the checksum config.json and the campaign's files carry)."""
    return _sha256(Path(path))


def save_checkpoint(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    task: str | None = None,
    preprocessing: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    half: bool = False,
    card: str | None = None,
) -> Path:
    """Write ``model`` to ``folder`` atomically and return the folder path.

    ``extra`` is merged into config.json (metrics, training recipe, provenance); ``card`` is written
    as README.md (the model card); ``half`` stores float tensors as fp16.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; a model is saved as a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}-", suffix=".tmp", dir=folder.parent))
    from .io import default_mode

    os.chmod(tmp, default_mode(folder=True))  # not mkdtemp's private 0700 once renamed into place
    try:
        save_file(state, str(tmp / WEIGHTS))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": getattr(model, "arch", type(model).__name__.lower()),
            "task": task,
            "model": getattr(model, "config", {}),
            "preprocessing": preprocessing or {},
            "weights": {"file": WEIGHTS, "sha256": _sha256(tmp / WEIGHTS),
                        "dtype": "float16" if half else "float32"},
        }
        config.update(extra or {})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
        for f in tmp.iterdir():  # make the data durable before the swap
            os.chmod(f, default_mode())  # safetensors writes its file private (0600)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from .zoo import models_changed  # the one "a model was saved" signal (zoo imports this module)

    models_changed(folder)
    return folder


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (POSIX); on Windows we cannot ask safely, so say yes."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what a killed save of ``folder`` left beside it; returns the paths removed.

    ``.NAME.PID-XXXX.tmp`` folders of processes that no longer run (and ``.NAME.XXXX.tmp`` of older
    versions after :data:`STALE_SECONDS`) are deleted. A ``.NAME.old-PID`` folder is the previous
    model moved aside during the swap: deleted when NAME exists, moved back when it does not (the
    kill fell between the two renames).
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return []
    head = f".{folder.name}."
    tmp_new = re.compile(r"(\d+)-[A-Za-z0-9_]+\.tmp")
    tmp_old = re.compile(r"[A-Za-z0-9_]{6,12}\.tmp")
    moved_aside = re.compile(r"old-(\d+)")
    removed = []
    for entry in parent.iterdir():
        if not entry.name.startswith(head) or not entry.is_dir() or entry.is_symlink():
            continue
        rest = entry.name[len(head):]
        m = tmp_new.fullmatch(rest)
        if m:
            stale = not _pid_alive(int(m.group(1)))
        elif tmp_old.fullmatch(rest):
            stale = time.time() - entry.stat().st_mtime > STALE_SECONDS
        elif (m := moved_aside.fullmatch(rest)) and not _pid_alive(int(m.group(1))):
            if not folder.exists():
                os.replace(entry, folder)
                continue
            stale = True
        else:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- config schema

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_size(where: str, v: Any, lo: int = 8, hi: int = 4096) -> None:
    if v is None:
        return
    if not isinstance(v, list) or len(v) != 2 or not all(_is_int(x) and lo <= x <= hi for x in v):
        raise CheckpointError(f"{where} must be [height, width], whole numbers from {lo} to {hi}, got {v!r}")


def validate_preprocessing(prep: Any, where: str = "preprocessing") -> dict[str, Any]:
    """Check the preprocessing keys the engine reads (others are kept and ignored)."""
    if prep is None:
        return {}
    if not isinstance(prep, dict):
        raise CheckpointError(f"{where} must be an object of settings (input_size, channels, ...), got {prep!r}")
    _check_size(f"{where}.input_size", prep.get("input_size"))
    _check_size(f"{where}.tile_size", prep.get("tile_size"))
    ov = prep.get("tile_overlap")
    if ov is not None and not (_is_int(ov) and 0 <= ov <= 1024):
        raise CheckpointError(f"{where}.tile_overlap must be a whole number from 0 to 1024, got {ov!r}")
    ch = prep.get("channels")
    if ch is not None and not (_is_int(ch) and 1 <= ch <= 64):
        raise CheckpointError(f"{where}.channels must be a whole number from 1 to 64, got {ch!r}")
    win = prep.get("ct_window")
    if win is not None and not (isinstance(win, list) and len(win) == 2 and all(_is_number(x) for x in win)
                                and win[0] < win[1]):
        raise CheckpointError(f"{where}.ct_window must be null or [lo, hi], two finite numbers lo < hi, got {win!r}")
    mod = prep.get("modality")
    if mod is not None and mod not in MODALITIES:
        raise CheckpointError(f"{where}.modality must be {', '.join(MODALITIES)} or null, got {mod!r}")
    scale = prep.get("scale")
    if scale is not None and not (_is_number(scale) and scale > 0):
        raise CheckpointError(f"{where}.scale must be null or a positive number, got {scale!r}")
    for key in ("mode", "orientation"):
        v = prep.get(key)
        if v is not None and not (isinstance(v, str) and len(v) <= 32):
            raise CheckpointError(f"{where}.{key} must be null or a short text, got {v!r}")
    return prep


def validate_config(config: Any, path: str | os.PathLike = CONFIG) -> dict[str, Any]:
    """Check a parsed config.json against the checkpoint schema; raise :class:`CheckpointError`.

    Structure and types only (no torch): the model settings are bounded by
    :func:`napari_sdunet.models.base.check_model_kwargs` when the model is built.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config")
    version = config.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a whole number >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; "
                              f"this napari-sdunet reads up to {FORMAT_VERSION}. Please upgrade.")
    for key in ("arch", "model", "weights"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the key {key!r}")
    if not isinstance(config["arch"], str):
        raise CheckpointError(f"{path}: arch must be a name such as 'sdunet', got {config['arch']!r}")
    if not isinstance(config["model"], dict):
        raise CheckpointError(f"{path}: model must be an object of network settings, got {config['model']!r}")
    weights = config["weights"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: weights must be an object with file and sha256, got {weights!r}")
    wname = weights.get("file", WEIGHTS)
    if (not isinstance(wname, str) or wname in ("", ".", "..") or Path(wname).name != wname
            or "\\" in wname or Path(wname).is_absolute()):
        raise CheckpointError(f"{path}: weights.file must be a file name inside the model folder, got {wname!r}")
    sha = weights.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{path}: weights.sha256 must be 64 hexadecimal digits, got {sha!r}")
    task = config.get("task")
    if task is not None and not isinstance(task, str):
        raise CheckpointError(f"{path}: task must be a name or null, got {task!r}")
    validate_preprocessing(config.get("preprocessing"), f"{path}: preprocessing")
    return config


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder (see :func:`validate_config`)."""
    if folder is None or not isinstance(folder, (str, os.PathLike)):
        raise CheckpointError(f"a model folder must be a path, got {folder!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (expected a directory)")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG}; is it a napari-sdunet model folder?")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes, too large for a model config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    return validate_config(config, path)


def weights_path(folder: str | os.PathLike, config: dict[str, Any]) -> Path:
    """The weights file of a validated config, refused when it (or a link) leads out of the folder."""
    folder = Path(folder)
    wfile = folder / config["weights"].get("file", WEIGHTS)
    try:
        inside = wfile.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise CheckpointError(f"{folder}: weights.file {wfile.name!r} leads outside the model folder; refused")
    return wfile


def read_header(wfile: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names -> (shape, dtype) from a safetensors header, without reading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(wfile), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: cannot read safetensors ({e})") from None


def _check_header(wfile: Path, arch: str, meta: torch.nn.Module) -> None:
    """Compare the weights file's header with the architecture's tensors (built on the meta device)."""
    header = read_header(wfile)
    own = meta.state_dict()
    missing, unexpected = own.keys() - header.keys(), header.keys() - own.keys()
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: weights do not fit the {arch} in config.json "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, t in own.items():
        shape, dtype = header[k]
        if shape != tuple(t.shape):
            raise CheckpointError(f"{wfile}: tensor {k} has shape {shape}, expected {tuple(t.shape)}")
        allowed = _FLOAT_DTYPES if t.is_floating_point() else _INT_DTYPES
        if dtype not in allowed:
            raise CheckpointError(f"{wfile}: tensor {k} is stored as {dtype}; expected one of {sorted(allowed)}")


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model from ``config.json``, load verified safetensors weights (as float32).

    Returns ``(model, config)`` with the model in eval mode on ``device``. Nothing is allocated
    before the config passed its schema and the weights' header matched the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import ARCHITECTURES, list_models
    from .models.base import build_model

    config = read_config(folder)
    folder = Path(folder)
    arch = config["arch"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{folder}: unknown architecture {arch!r}; this napari-sdunet knows "
                              f"{', '.join(list_models())}")
    cls = ARCHITECTURES[arch].cls
    try:
        meta = build_model(cls, config["model"], device="meta")
    except ModelConfigError as e:
        raise CheckpointError(f"{folder}: config does not describe a valid {arch}: {e}") from None
    wfile = weights_path(folder, config)
    if not wfile.is_file():
        raise CheckpointError(f"{folder}: weights file {wfile.name} is missing")
    expected = config["weights"].get("sha256")
    if expected and _sha256(wfile) != expected:
        raise CheckpointError(f"{wfile}: checksum mismatch; the weights file is truncated, corrupt or "
                              "was modified after saving")
    _check_header(wfile, arch, meta)
    del meta
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile}: cannot read safetensors ({e})") from None
    model = build_model(cls, config["model"])
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = v.float()
    model.load_state_dict(state)
    return model.to(device).eval(), config
