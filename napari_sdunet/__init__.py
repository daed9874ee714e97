"""napari-sdunet: Spatially Dependent U-Nets (SDU-Net, SDNU-Net) for napari and the command line."""

from __future__ import annotations

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0.1.0"

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .models import create_model, list_models
from .zoo import list_pretrained, load_pretrained

__all__ = [
    "__version__", "CheckpointError", "create_model", "list_models", "list_pretrained",
    "load_checkpoint", "load_pretrained", "save_checkpoint",
]
