"""The one axes rule: what is proposed for an array, a napari layer and a headerless file."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_sdunet.axes import AXES, check_axes, looks_like_colour, propose_axes, propose_layer_axes
from napari_sdunet.errors import InputError


@pytest.mark.parametrize(("shape", "rgb", "want"), [
    ((64, 64), False, "YX"),
    ((64, 64), True, "YX"),  # a 2-D array has no colour axis, whatever the flag says
    ((64, 64, 3), True, "YXC"),
    ((64, 64, 3), False, "YXC"),  # colour by shape: both plane sides far longer than 3
    ((64, 64, 4), False, "YXC"),
    ((64, 64, 5), False, "ZYX"),
    ((10, 64, 64), False, "ZYX"),
    ((5, 5, 3), False, "ZYX"),  # too small to be read as colour without the source saying so
    ((5, 5, 3), True, "YXC"),  # ... unless it does
    ((31, 31, 3), False, "YXC"),
    ((30, 64, 3), False, "ZYX"),  # the bound is strict, on both sides
    ((5, 64, 64, 3), False, "TYXC"),
    ((5, 64, 64, 3), True, "TYXC"),
    ((5, 10, 64, 64), False, ""),  # a series of volumes: not supported, the user must say
    ((64,), False, ""),
    ((2, 3, 64, 64, 3), False, ""),
])
def test_propose_axes(shape, rgb, want):
    assert propose_axes(shape, rgb=rgb) == want
    assert want == "" or want in AXES


def test_layer_and_array_get_the_same_proposal():
    """The old widget rule said ZYX and the old engine rule YXC for a 3-D layer ending in 3."""
    data = np.zeros((40, 50, 3), np.uint8)
    layer = SimpleNamespace(data=data, rgb=False)
    assert propose_layer_axes(layer) == propose_axes(data.shape) == "YXC"
    assert propose_layer_axes(SimpleNamespace(data=np.zeros((8, 8, 3)), rgb=True)) == "YXC"
    assert propose_layer_axes(SimpleNamespace(data=np.zeros((8, 8, 3)))) == "ZYX"  # no rgb attribute


def test_napari_layers_get_the_proposal():
    from napari.layers import Image

    rgb = Image(np.zeros((40, 50, 3), np.uint8))
    assert rgb.rgb and propose_layer_axes(rgb) == "YXC"
    forced = Image(np.zeros((40, 50, 3), np.uint8), rgb=False)
    assert not forced.rgb and propose_layer_axes(forced) == "YXC"
    assert propose_layer_axes(Image(np.zeros((12, 40, 50), np.int16))) == "ZYX"


def test_looks_like_colour():
    assert looks_like_colour((100, 100, 3)) and looks_like_colour((2, 100, 100, 4))
    assert not looks_like_colour((100, 100)) and not looks_like_colour((3, 100, 100))
    assert not looks_like_colour((100, 10, 3))


def test_check_axes():
    assert check_axes("yxc") == "YXC"
    assert check_axes("ZYX", (3, 4, 5)) == "ZYX"
    with pytest.raises(InputError, match="unsupported axes 'XY'"):
        check_axes("XY")
    with pytest.raises(InputError, match="must be text"):
        check_axes(None)
    with pytest.raises(InputError, match="need 3"):
        check_axes("ZYX", (4, 5))
    with pytest.raises(InputError, match=r"cannot tell the axes of an array of shape \(2, 3, 4, 5\)"):
        check_axes("", (2, 3, 4, 5))


def test_tiff_without_axes_uses_the_same_rule(tmp_path):
    import tifffile

    from napari_sdunet.io import read_image

    arr = np.zeros((40, 50, 3), np.uint16)  # a numpy array saved with its shape only: axes "QYX"
    tifffile.imwrite(tmp_path / "a.tif", arr, photometric="minisblack")
    vol = read_image(tmp_path / "a.tif")
    assert vol.data.shape == arr.shape and vol.axes == propose_axes(arr.shape) == "YXC"
    small = np.zeros((6, 7, 3), np.uint16)
    tifffile.imwrite(tmp_path / "b.tif", small, photometric="minisblack")
    assert read_image(tmp_path / "b.tif").axes == "ZYX"
    tifffile.imwrite(tmp_path / "pages.tif", arr, photometric="minisblack", metadata=None)
    assert read_image(tmp_path / "pages.tif").axes == "ZYX"  # 40 pages: the file says slices
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((6, 7, 3), np.uint8), photometric="rgb")
    assert read_image(tmp_path / "rgb.tif").axes == "YXC"  # samples: the file says colour


def test_engine_and_cli_read_the_axes_from_here():
    from napari_sdunet.cli import build_parser
    from napari_sdunet.inference import frames_of

    with pytest.raises(InputError, match="cannot tell the axes"):
        frames_of(np.zeros((2, 3, 8, 8)), "")
    parser = build_parser()
    for axes in AXES:
        args = parser.parse_args(["predict", "x.png", "--model", "m", "--output", "o", "--axes", axes.lower()])
        assert args.axes == axes
