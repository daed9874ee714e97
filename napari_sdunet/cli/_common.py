"""Options and helpers shared by ``predict`` and ``evaluate`` (model, device, preprocessing, batches)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..axes import AXES, propose_axes
from ..devices import DEVICES, PRECISIONS

T = TypeVar("T")



def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"the threshold must be between 0 and 1 (exclusive), got {text}")
    return v


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (so that a bad value fails before any work)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _scale(text: str) -> float:
    v = _finite(text)
    if not 0.05 <= v <= 20:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 20, got {text}")
    return v


def add_model_options(p: argparse.ArgumentParser) -> None:
    from ..tasks import DEFAULT_CT_WINDOW, modality_names

    p.add_argument("--model", required=True, metavar="NAME_OR_FOLDER",
                   help="a shipped or user model name (see `napari-sdunet models`) or a checkpoint folder")
    p.add_argument("--device", default="auto",
                   help=f"one of {', '.join(DEVICES)} or cuda:N; auto: cuda, then mps, then cpu (default)")
    p.add_argument("--threshold", type=_threshold, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="slices/frames per forward pass (default 8)")
    p.add_argument("--modality", choices=modality_names(), default=None,
                   help="intensity preset; default: the model's own preprocessing")
    p.add_argument("--ct-window", type=_finite, nargs=2, metavar=("LO", "HI"), default=None,
                   help="HU window for CT input (default: the model's, else "
                        f"{DEFAULT_CT_WINDOW[0]:g} {DEFAULT_CT_WINDOW[1]:g})")
    p.add_argument("--axes", type=str.upper, choices=AXES, default=None,
                   help=f"axes of every input ({', '.join(AXES)}); default: from the file format")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on CPUs with fast bf16 (AMX, AVX512-BF16), else fp32")
    p.add_argument("--tta", action="store_true", help="average over flips (4x slower)")
    p.add_argument("--scale", type=_scale, default=1.0,
                   help="resize each image by this factor before a native-resolution (tiled) model sees it: "
                        "2 when your objects are half the size of the training data's, 0.5 when twice (default 1)")


def check_model_options(args: argparse.Namespace) -> None:
    """Cross-option checks argparse cannot do, before any model is loaded."""
    from ..errors import InputError

    if args.ct_window is not None and not args.ct_window[0] < args.ct_window[1]:
        raise InputError(f"--ct-window needs LO < HI, got {args.ct_window[0]:g} {args.ct_window[1]:g}")


def note_tta(loaded: Any, args: argparse.Namespace) -> None:
    """Say when --tta cannot flip for this model (CT: the anatomy has a side), rather than ignore it silently."""
    from ..inference import tta_flips_allowed

    if args.tta and not tta_flips_allowed(loaded.config, args.modality, args.ct_window):
        print(f"note: --tta has no effect with {loaded.name}: CT slices have a side (the liver is on the "
              "patient's right), so mirrored slices would show an anatomy the model never saw", file=sys.stderr)


def predict_volume(loaded: Any, vol: Any, args: argparse.Namespace, name: str) -> np.ndarray:
    """Probabilities of one read file, with the axes from the file (or --axes).

    A NIfTI volume is first turned into the orientation the model learnt from (a volume stored
    with x/y swapped or flipped would otherwise be segmented on rotated slices); the
    probabilities come back in the file's own storage, to be written with its own affine.
    """
    from ..errors import InputError
    from ..inference import model_orientation, predict
    from ..io import reorient

    axes = (args.axes or vol.axes or propose_axes(vol.data.shape)).upper()
    if not axes:
        raise InputError(f"{name}: cannot tell the axes of an array of shape {tuple(vol.data.shape)}; "
                         f"give them with --axes ({', '.join(AXES)})")
    if axes == "TZYX":
        raise InputError(f"{name}: 4-D NIfTI (time series of volumes) is not supported")
    data, back = vol.data, (lambda a: a)
    if vol.affine is not None and axes == "ZYX":
        data, back = reorient(vol.data, vol.affine, model_orientation(loaded))
    try:
        prob = predict(loaded, data, axes, batch_size=args.batch_size, modality=args.modality,
                       ct_window=args.ct_window, tta=args.tta, scale=getattr(args, "scale", 1.0),
                       precision=getattr(args, "precision", "auto"))
    except InputError as e:
        raise InputError(f"{name}: {e}") from None
    return back(prob)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders replaced by their image/NIfTI files."""
    from ..errors import InputError
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
        raise InputError(f"no image or NIfTI files found in {', '.join(items)}")
    return out


def run_batch(items: Iterable[T], work: Callable[[T], None], name_of: Callable[[T], str],
              write: Callable[[str], None]) -> list[tuple[str, str]]:
    """Run ``work`` on each item; a user-fixable failure of one item is reported and skipped.

    Returns ``(name, reason)`` of the failed items. Bugs (errors that are not the user's) and
    Ctrl-C / SIGTERM still stop the batch.
    """
    from . import user_message

    failed = []
    for item in items:
        try:
            work(item)
        except Exception as e:
            msg = user_message(e)
            if msg is None:
                raise
            failed.append((name_of(item), msg))
            write(f"skipped {name_of(item)}: {msg}")
    return failed


def report_failures(failed: list[tuple[str, str]], total: int, what: str) -> int:
    """Print the count of failed items at the end of a batch; exit status 1 if any failed."""
    if not failed:
        return 0
    print(f"warning: {len(failed)} of {total} {what} could not be processed and were skipped: "
          f"{', '.join(n for n, _ in failed[:5])}{' ...' if len(failed) > 5 else ''}", file=sys.stderr)
    return 1
