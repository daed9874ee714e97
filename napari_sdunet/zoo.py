"""Where models live: weights shipped in the package, and the user's own (fine-tuned) models.

A model is named ``<arch>-<task>`` (e.g. ``sdnunet-polyps``) or given as a checkpoint folder.
Nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CONFIG, CheckpointError, load_checkpoint

if TYPE_CHECKING:
    import torch

PACKAGE_WEIGHTS = Path(__file__).with_name("weights")


def user_models_dir() -> Path:
    """Folder of user models: $NAPARI_SDUNET_MODELS, else $XDG_DATA_HOME/napari-sdunet/models."""
    env = os.environ.get("NAPARI_SDUNET_MODELS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-sdunet" / "models"


def _models_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / CONFIG).is_file() and not p.name.startswith("."))


def list_pretrained() -> list[str]:
    """Names of the models shipped with the package."""
    return _models_in(PACKAGE_WEIGHTS)


def list_user_models() -> list[str]:
    """Names of the models in :func:`user_models_dir` (e.g. fine-tuned ones)."""
    return _models_in(user_models_dir())


def resolve_model(name_or_folder: str | os.PathLike) -> Path:
    """A shipped model name, a user model name, or a checkpoint folder -> its folder."""
    p = Path(name_or_folder).expanduser()
    if (p / CONFIG).is_file():
        return p
    for base in (PACKAGE_WEIGHTS, user_models_dir()):
        if (base / str(name_or_folder) / CONFIG).is_file():
            return base / str(name_or_folder)
    known = list_pretrained() + list_user_models()
    raise CheckpointError(f"no model named {str(name_or_folder)!r} and no checkpoint folder there; "
                          f"available models: {', '.join(known) or 'none'}")


def load_pretrained(name: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a shipped or user model by name (or a checkpoint folder): ``(model, config)``."""
    return load_checkpoint(resolve_model(name), device=device)
