"""napari-sdunet: Spatially Dependent U-Nets (SDU-Net, SDNU-Net) for napari and the command line."""

from __future__ import annotations

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0.1.0"

# Heavy names load on first use, so napari can list the plugin without importing torch.
_LAZY = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "create_model": "models", "list_models": "models", "list_pretrained": "zoo", "load_pretrained": "zoo",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "CheckpointError", "create_model", "list_models", "list_pretrained",
    "load_checkpoint", "load_pretrained", "save_checkpoint",
]
