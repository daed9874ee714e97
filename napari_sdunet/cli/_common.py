"""Options and helpers shared by ``predict`` and ``evaluate`` (model, device, preprocessing)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="NAME_OR_FOLDER",
                   help="a shipped or user model name (see `napari-sdunet models`) or a checkpoint folder")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="slices/frames per forward pass (default 8)")
    p.add_argument("--modality", choices=["microscopy", "colonoscopy", "ct"], default=None,
                   help="intensity preset; default: the model's own preprocessing")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="HU window for CT input (default: the model's, e.g. -40 160)")
    p.add_argument("--axes", default=None,
                   help="axes of every input (YX, YXC, ZYX, TYX, TYXC); default: from the file format")
    p.add_argument("--tta", action="store_true", help="average over flips (4x slower)")


def predict_volume(loaded: Any, vol: Any, args: argparse.Namespace, name: str) -> np.ndarray:
    """Probabilities of one read file, with the axes from the file (or --axes)."""
    from ..inference import default_axes, predict
    from ..preprocess import InputError

    axes = (args.axes or vol.axes or default_axes(vol.data.shape)).upper()
    if axes == "TZYX":
        raise InputError(f"{name}: 4-D NIfTI (time series of volumes) is not supported")
    try:
        return predict(loaded, vol.data, axes, batch_size=args.batch_size, modality=args.modality,
                       ct_window=args.ct_window, tta=args.tta)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders replaced by their image/NIfTI files."""
    from ..io import list_images

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(list_images(p))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not out:
        raise ValueError("no input images found")
    return out
