"""Device names and the check that a picked device is usable (napari_sdunet.devices)."""

from __future__ import annotations

import pytest
import torch

from napari_sdunet.devices import DEVICES, pick_device


def test_pick_device():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_device("").type == pick_device("auto").type
    assert pick_device("CPU").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose from auto, cpu, cuda, mps"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda:1")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(ValueError, match="MPS"):
            pick_device("mps")


def test_every_user_of_a_device_reads_the_same_names():
    from napari_sdunet import train_loop
    from napari_sdunet.cli import build_parser

    assert DEVICES[0] == "auto" and "cpu" in DEVICES
    assert train_loop.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        train_loop.resolve_device("tpu")
    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    help_text = next(a.help for a in predict._actions if "--device" in a.option_strings)
    assert all(name in help_text for name in DEVICES)
