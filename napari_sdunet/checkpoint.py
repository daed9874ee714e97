"""Checkpoint folders: ``config.json`` (architecture, preset, preprocessing) + ``model.safetensors``.

Loading never unpickles anything: weights are safetensors, the config is JSON, and the weights'
SHA-256 recorded in the config is checked, so a tampered or truncated file is reported clearly.
Saving is atomic: a new folder is written beside the target and swapped in, so an interrupted save
leaves any previous model intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = "napari-sdunet-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, tampered with or incompatible."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
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
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (expected a directory)")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG}; is it a napari-sdunet model folder?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {config['format_version']}; "
                              f"this napari-sdunet reads up to {FORMAT_VERSION}. Please upgrade.")
    for key in ("arch", "model", "weights"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the key {key!r}")
    return config


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model from ``config.json``, load verified safetensors weights (as float32).

    Returns ``(model, config)`` with the model in eval mode on ``device``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import MODELS

    folder = Path(folder)
    config = read_config(folder)
    arch = config["arch"]
    if arch not in MODELS:
        raise CheckpointError(f"{folder}: unknown architecture {arch!r}")
    wfile = folder / config["weights"].get("file", WEIGHTS)
    if not wfile.is_file():
        raise CheckpointError(f"{folder}: weights file {wfile.name} is missing")
    expected = config["weights"].get("sha256")
    if expected and _sha256(wfile) != expected:
        raise CheckpointError(f"{wfile}: checksum mismatch; the weights file is truncated, corrupt or "
                              "was modified after saving")
    try:
        model = MODELS[arch](**config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: config does not describe a valid {arch}: {e}") from None
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile}: cannot read safetensors ({e})") from None
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: weights do not fit the {arch} in config.json "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{wfile}: tensor {k} has shape {tuple(v.shape)}, "
                                  f"expected {tuple(own[k].shape)}")
        if v.is_floating_point():
            state[k] = v.float()
    model.load_state_dict(state)
    return model.to(device).eval(), config
