"""File > Open Sample: one real nuclei image, one colonoscopy frame and one CT volume, with references.

Files and their provenance/licences: ``sample_data/README.md``. They are found next to this module
(``napari_sdunet/sample_data``, a link to the top-level folder in the source tree and a copy in an
installed package) or, failing that, in the repository's top-level ``sample_data/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]
SAMPLES = ("nuclei", "polyps", "ct")
#: binary references in cyan: visible on red/orange endoscopy and on grey CT.
REFERENCE_COLORS = {None: "transparent", 0: "transparent", 1: "cyan"}


def sample_dir() -> Path:
    """Folder holding the sample files (raises FileNotFoundError with where it looked)."""
    here = Path(__file__).resolve().parent
    candidates = [Path(__file__).parent / "sample_data", here.parent / "sample_data"]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    raise FileNotFoundError(f"sample data not found (looked in {', '.join(map(str, candidates))})")


def sample_path(name: str) -> Path:
    path = sample_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"sample file {path} is missing")
    return path


def _png(name: str) -> np.ndarray:
    from .io import read_image

    return read_image(sample_path(name)).data


def nuclei() -> list[LayerData]:
    """DSB2018 stage1_train image 1b6044e4 (256x256, fluorescence) and its nucleus instance labels."""
    image = _png("nuclei_image.png")
    labels = _png("nuclei_labels.png")
    meta = {"source": "DSB2018 / BBBC038, CC0"}
    return [(image, {"name": "nuclei", "rgb": True, "metadata": meta}, "image"),
            (labels, {"name": "nuclei reference", "metadata": meta, "opacity": 0.5}, "labels")]


def polyps() -> list[LayerData]:
    """CVC-ClinicDB frame 436 (384x288 RGB, test sequence 21) and its polyp mask (research/educational use only)."""
    image = _png("polyp_image.png")
    mask = (_png("polyp_mask.png") > 0).astype(np.uint8)
    meta = {"source": "CVC-ClinicDB frame 436, research and educational use only"}
    return [(image, {"name": "polyp frame", "rgb": True, "metadata": meta}, "image"),
            (mask, {"name": "polyp reference", "metadata": meta, "opacity": 0.5, "colormap": REFERENCE_COLORS},
             "labels")]


def ct() -> list[LayerData]:
    """TotalSegmentator example CT (128x128x30, 3 mm, HU) and its automatic liver mask (CC BY 4.0)."""
    from ._reader import layer_data

    image, ikw, _ = layer_data(sample_path("ct_image.nii.gz"))
    mask, mkw, _ = layer_data(sample_path("ct_liver_mask.nii.gz"))
    ikw.update(name="CT (HU)", colormap="gray", contrast_limits=(-160.0, 240.0))
    mkw.update(name="liver reference (automatic)", opacity=0.5, colormap=REFERENCE_COLORS)
    return [(image, ikw, "image"), (mask.astype(np.uint8), mkw, "labels")]


def load_sample(name: str) -> list[LayerData]:
    """Sample by name: nuclei, polyps or ct."""
    funcs = {"nuclei": nuclei, "polyps": polyps, "ct": ct}
    if name not in funcs:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
    return funcs[name]()
