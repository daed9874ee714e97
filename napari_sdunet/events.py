"""The one progress protocol from the engine to the widgets and the CLI (no torch, no Qt).

Every slow engine call -- training (:func:`napari_sdunet.train_loop.fit`), fine-tuning
(:func:`napari_sdunet.finetune.finetune`) and prediction (:func:`napari_sdunet.inference.predict`) --
reports through one callback, ``on_progress(Progress)``. A widget job yields the same objects to
its :class:`~napari_sdunet.widgets._common.JobRunner` (progress bar and status line), and the CLI
turns them into tqdm bars. ``kind`` says what happened:

* ``"step"``: a training step is done (``loss``); ``"val"``: a validation (``val_dice``);
  ``"done"``: training ended (``best_val_dice``);
* ``"frames"``: ``step`` of ``total_steps`` frames predicted;
* ``"status"``: a stage starts (``message``: "reading the labelled frames", "saving to ...").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("step", "val", "done", "frames", "status")


@dataclass
class Progress:
    """One report: what happened (``kind``), how far (``step`` of ``total_steps``), and the numbers."""

    kind: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = math.nan
    val_dice: float = math.nan
    best_val_dice: float = math.nan
    seconds: float = 0.0
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown progress kind {self.kind!r}; one of {KINDS}")


def status(message: str) -> Progress:
    """A ``"status"`` report: a stage of a long call starts."""
    return Progress("status", message=message)


ProgressCallback = Callable[[Progress], None]
