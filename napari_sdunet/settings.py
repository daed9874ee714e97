"""Choices napari-sdunet remembers across napari restarts: which model last segmented a layer, and
which model was last used for a kind of layer (a task: nuclei, polyps, liver).

A small JSON file, ``$NAPARI_SDUNET_SETTINGS`` when set, else ``.settings.json`` in the user models
folder (:func:`napari_sdunet.zoo.user_models_dir`, e.g. ``~/.local/share/napari-sdunet/models``), so
one environment variable (``NAPARI_SDUNET_MODELS``) moves models and settings together. Writes are
atomic; an unreadable file counts as empty (a broken settings file must never break a widget).
Nothing here imports Qt or torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("napari_sdunet")

#: how many layers are remembered (the oldest are forgotten first)
MAX_LAYERS = 200


def settings_path() -> Path:
    env = os.environ.get("NAPARI_SDUNET_SETTINGS")
    if env:
        return Path(env).expanduser()
    from .zoo import user_models_dir

    return user_models_dir() / ".settings.json"


def load() -> dict[str, Any]:
    path = settings_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable settings file %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def save(data: dict[str, Any]) -> None:
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break segmenting
        log.warning("cannot save settings to %s: %s", path, e)


def layer_key(layer: Any) -> str:
    """A key that names the same layer again after a restart: its name, shape, dtype and source file."""
    import numpy as np

    source = getattr(getattr(layer, "source", None), "path", None) or ""
    data = getattr(layer, "data", None)
    text = "|".join([str(getattr(layer, "name", "")), str(tuple(np.shape(data))),
                     str(getattr(data, "dtype", "")), str(source)])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def remember(layer: Any, kind: str | None, model_ref: str) -> None:
    """Record that ``model_ref`` segmented ``layer`` (and is the last model used for ``kind``)."""
    data = load()
    by_layer = data.get("model_by_layer")
    by_layer = dict(by_layer) if isinstance(by_layer, dict) else {}
    key = layer_key(layer)
    by_layer.pop(key, None)
    by_layer[key] = str(model_ref)  # insertion order = age
    while len(by_layer) > MAX_LAYERS:
        by_layer.pop(next(iter(by_layer)))
    data["model_by_layer"] = by_layer
    if kind:
        by_kind = data.get("model_by_kind")
        by_kind = dict(by_kind) if isinstance(by_kind, dict) else {}
        by_kind[kind] = str(model_ref)
        data["model_by_kind"] = by_kind
    save(data)


def remembered(layer: Any, kind: str | None) -> tuple[str | None, str]:
    """``(model_ref, why)``: the model that last segmented ``layer``, else the last one used for ``kind``."""
    data = load()
    by_layer = data.get("model_by_layer") if isinstance(data.get("model_by_layer"), dict) else {}
    ref = by_layer.get(layer_key(layer)) if layer is not None else None
    if isinstance(ref, str):
        return ref, "last used on this layer"
    by_kind = data.get("model_by_kind") if isinstance(data.get("model_by_kind"), dict) else {}
    ref = by_kind.get(kind) if kind else None
    if isinstance(ref, str):
        return ref, f"last used for {kind} images"
    return None, ""
