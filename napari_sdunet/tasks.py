"""Task presets, the preprocessing record a checkpoint stores, and the imaging modalities (no torch).

One place for what the paper's three tasks are (network shape, Table 5 training defaults, how their
images are prepared) and for what each imaging modality means for intensities. The widget, the CLI,
inference, the checkpoint schema and training read their modality lists and CT windows from here,
so adding a modality is one :func:`register_modality` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Intensity rules: divide by the full scale of the image's bit depth, or clip a HU window to [0, 1].
SCALE = "scale"
WINDOW = "window"
#: The liver window (HU), used when a CT model or the CT preset has no window of its own.
DEFAULT_CT_WINDOW: tuple[float, float] = (-40.0, 160.0)


@dataclass(frozen=True)
class Modality:
    """An imaging modality: its config.json name, the label the widget shows and its intensity rule.

    ``default_window``: the window a :data:`WINDOW` modality uses when neither the model nor the user
    gives one. ``oriented``: its images have a fixed orientation (a CT slice's left is the patient's
    right), so a mirrored or turned image shows an anatomy the model never saw: test-time flips and
    fine-tuning's flips/turns are off for it.
    """

    name: str
    label: str
    rule: str
    default_window: tuple[float, float] | None = None
    oriented: bool = False

    def __post_init__(self) -> None:
        if self.rule not in (SCALE, WINDOW):
            raise ValueError(f"modality {self.name!r}: rule must be {SCALE!r} or {WINDOW!r}, got {self.rule!r}")
        if (self.rule == WINDOW) != (self.default_window is not None):
            raise ValueError(f"modality {self.name!r}: a default window goes with (and only with) the window rule")


#: Modalities by name, in the order the widget and the CLI list them.
MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    """Add ``modality`` to :data:`MODALITIES` (what the widget, the CLI and inference accept)."""
    MODALITIES[modality.name] = modality
    return modality


register_modality(Modality("microscopy", "microscopy", SCALE))
register_modality(Modality("colonoscopy", "colonoscopy (RGB)", SCALE))
register_modality(Modality("ct", "CT (HU window)", WINDOW, DEFAULT_CT_WINDOW, oriented=True))


def modality_names() -> list[str]:
    """Names of the registered modalities (CLI choices, inference validation)."""
    return list(MODALITIES)


def intensity_rule(prep: Mapping[str, Any]) -> str:
    """The rule a preprocessing record asks for: its modality's, else a window if one is set."""
    modality = MODALITIES.get(prep.get("modality"))  # type: ignore[arg-type]
    if modality is not None:
        return modality.rule
    return WINDOW if prep.get("ct_window") else SCALE


def flips_allowed(prep: Mapping[str, Any]) -> bool:
    """Whether mirrored and turned images mean the same to a model with this preprocessing record.

    False for oriented modalities (CT: the liver is on the patient's right; the campaign's liver recipe
    never flips), and for a record with no modality that windows HU values. Measured: test-time flips took
    ``unet-liver``'s per-volume Dice from 0.871 to 0.676 on the 3D-IRCADb test volumes.
    """
    modality = MODALITIES.get(prep.get("modality"))  # type: ignore[arg-type]
    if modality is not None:
        return not modality.oriented
    return intensity_rule(prep) != WINDOW


def window_of(prep: Mapping[str, Any]) -> tuple[float, float]:
    """The HU window of a :data:`WINDOW` record: its own, else its modality's default."""
    win = prep.get("ct_window")
    if win:
        return float(win[0]), float(win[1])
    modality = MODALITIES.get(prep.get("modality"))  # type: ignore[arg-type]
    if modality is None or modality.default_window is None:
        raise ValueError(f"no CT window in {dict(prep)!r}")
    return modality.default_window


@dataclass(frozen=True)
class Preprocessing:
    """How a model's images are prepared: the ``preprocessing`` object of config.json.

    ``scale``: the full scale of the training data's intensities (255 for 8-bit images; None for
    windowed CT). ``ct_window``: HU window (lo, hi) of windowed modalities.
    """

    input_size: tuple[int, int] | None
    channels: int
    modality: str | None
    scale: float | None = None
    ct_window: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object config.json stores (lists, not tuples; the key order of shipped checkpoints)."""
        return {"input_size": list(self.input_size) if self.input_size else None, "channels": self.channels,
                "modality": self.modality, "scale": self.scale,
                "ct_window": list(self.ct_window) if self.ct_window else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Read the record's five keys (others, e.g. ``mode`` and ``tile_size``, are left to their readers)."""
        size, win = d.get("input_size"), d.get("ct_window")
        return cls(input_size=(int(size[0]), int(size[1])) if size else None, channels=int(d.get("channels", 3)),
                   modality=d.get("modality"), scale=None if d.get("scale") is None else float(d["scale"]),
                   ct_window=(float(win[0]), float(win[1])) if win else None)


@dataclass(frozen=True)
class TaskPreset:
    """A paper task: network shape, SDN placement depth, Table 5 training defaults, preprocessing."""

    name: str
    in_channels: int
    depth: int
    sdn_n_layers: int
    lr: float
    batch_size: int
    preprocessing: Preprocessing


TASKS: dict[str, TaskPreset] = {t.name: t for t in (
    TaskPreset("nuclei", in_channels=3, depth=3, sdn_n_layers=2, lr=1e-3, batch_size=20,
               preprocessing=Preprocessing((96, 96), 3, "microscopy", scale=255.0)),
    TaskPreset("polyps", in_channels=3, depth=4, sdn_n_layers=1, lr=1e-4, batch_size=20,
               preprocessing=Preprocessing((144, 192), 3, "colonoscopy", scale=255.0)),
    TaskPreset("liver", in_channels=1, depth=4, sdn_n_layers=1, lr=1e-4, batch_size=16,
               preprocessing=Preprocessing((128, 128), 1, "ct", ct_window=DEFAULT_CT_WINDOW)),
)}

