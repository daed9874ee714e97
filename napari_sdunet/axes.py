"""The axes orders napari-sdunet accepts, and the one rule that proposes an order for an array.

Y, X are the image plane, C colour; Z (slices) and T (frames) are both run slice by slice. The
widgets, the CLI, the file readers and the engine all read the accepted orders and the proposal from
here, so a layer and the same array saved to a file get the same axes. Loads no torch or Qt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import InputError

#: Axes orders the engine accepts.
AXES: tuple[str, ...] = ("YX", "YXC", "ZYX", "TYX", "TYXC", "ZYXC")
#: A last axis of this many entries may be colour (RGB, RGBA).
COLOUR_SIZES = (3, 4)
#: Both image-plane sides must be longer than this for a last axis of 3 or 4 to be read as colour
#: without the source saying so (napari's own RGB guess uses the same bound).
RGB_MIN_SIDE = 30


def looks_like_colour(shape: Sequence[int]) -> bool:
    """Whether the last axis of ``shape`` is colour by shape alone: 3 or 4 entries after a plane
    whose two sides are both much longer (more than :data:`RGB_MIN_SIDE`)."""
    shape = tuple(int(s) for s in shape)
    return (len(shape) >= 3 and shape[-1] in COLOUR_SIZES
            and all(s > RGB_MIN_SIDE for s in shape[-3:-1]))


def propose_axes(shape: Sequence[int], rgb: bool = False) -> str:
    """The axes order proposed for an array of ``shape``; ``""`` when it cannot be told.

    The last axis is colour when the source says so (``rgb``: a napari RGB layer, a PNG/JPEG, a
    TIFF with samples) or when :func:`looks_like_colour` (3 or 4 entries after two sides of more
    than 30). So a (Z, Y, 3) array is read as a colour image ``YXC`` when Z and Y are both over 30
    even if the layer is not flagged RGB: a volume 3 voxels wide is far less likely than a colour
    image shown as a stack. A (5, 5, 3) array stays ``ZYX``. Without colour: 2-D ``YX``, 3-D
    ``ZYX``; 4-D needs colour (``TYXC``), as a 4-D grey array (a series of volumes) is not
    supported. The proposal is shown to the user, who may change it.
    """
    nd = len(shape)
    if (rgb and nd >= 3) or looks_like_colour(shape):
        return {3: "YXC", 4: "TYXC"}.get(nd, "")
    return {2: "YX", 3: "ZYX"}.get(nd, "")


def propose_layer_axes(layer: Any) -> str:
    """:func:`propose_axes` for a napari layer (its data's shape and its ``rgb`` flag)."""
    import numpy as np

    return propose_axes(np.shape(layer.data), rgb=bool(getattr(layer, "rgb", False)))


def check_axes(axes: Any, shape: Sequence[int] | None = None) -> str:
    """``axes`` in upper case if it is one of :data:`AXES` (and fits ``shape``); else InputError."""
    if not isinstance(axes, str):
        raise InputError(f"axes must be text such as 'YX', 'YXC' or 'ZYX', got {axes!r}")
    if not axes and shape is not None:
        raise InputError(f"cannot tell the axes of an array of shape {tuple(shape)}; "
                         f"give them (one of {', '.join(AXES)})")
    axes = axes.upper()
    if axes not in AXES:
        raise InputError(f"unsupported axes {axes!r}; choose from {', '.join(AXES)}")
    if shape is not None and len(shape) != len(axes):
        raise InputError(f"the layer has {len(shape)} dimensions, shape {tuple(shape)}, "
                         f"but axes {axes} need {len(axes)}")
    return axes


__all__ = ["AXES", "COLOUR_SIZES", "RGB_MIN_SIDE", "check_axes", "looks_like_colour", "propose_axes",
           "propose_layer_axes"]
