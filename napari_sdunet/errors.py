"""The package's own errors: each carries one sentence a user can act on.

This module imports nothing heavy (no torch, no numpy), so the CLI and the widgets can catch these
classes without loading the engine. Every class also derives from ``ValueError`` so that code
written against the older ``except ValueError`` keeps working.
"""

from __future__ import annotations


class SdunetError(Exception):
    """Base of every error napari-sdunet raises on purpose (bad input, model, output or device)."""


class InputError(SdunetError, ValueError):
    """The image cannot be segmented as given (wrong ndim, channels, NaN, empty, bad argument, ...)."""


class CheckpointError(SdunetError, ValueError):
    """A checkpoint folder is missing, malformed, tampered with or incompatible."""


class ModelConfigError(SdunetError, ValueError):
    """Arguments that do not describe a network that can be built (``create_model``, ``config.json``)."""


class OutputError(SdunetError, ValueError):
    """An output cannot be written where asked (a file there already, not a folder, read-only, ...)."""


class FinetuneError(SdunetError, ValueError):
    """The fine-tuning cannot run as asked (no labelled frames, bad output folder, ...)."""


__all__ = ["SdunetError", "InputError", "CheckpointError", "ModelConfigError", "OutputError", "FinetuneError"]
