"""Networks of napari-sdunet: U-Net, U-Net++, SDU-Net and SDNU-Net, built by :func:`create_model`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelConfigError
from .base import SegmentationModel, build_model
from .presets import ARCHS, TASKS, preset_kwargs
from .sdn import SDN, ResSDN
from .unet import SDUNet, UNet
from .unetpp import SDNUNet, UNetPlusPlus

MODELS: dict[str, type[SegmentationModel]] = {
    "unet": UNet,
    "unetpp": UNetPlusPlus,
    "sdunet": SDUNet,
    "sdnunet": SDNUNet,
}

#: Default SDN placement when no task is given (the polyps/liver rule, depth 4).
_DEFAULT_TASKLESS = "polyps"


def list_models() -> list[str]:
    """Architecture names accepted by :func:`create_model`."""
    return list(MODELS)


def create_model(arch: str, task: str | None = None, **overrides: Any) -> SegmentationModel:
    """Build ``arch`` (unet, unetpp, sdunet, sdnunet) with the ``task`` preset, then ``overrides``.

    ``task`` is one of nuclei, polyps, liver (paper-parity shapes and SDN placement). Without a
    task, SD models use the polyps placement rule. Any constructor argument can be overridden,
    e.g. ``sdn_state=64`` or ``in_channels=1``. Every argument is checked by name, type and bounds
    first; bad ones raise :class:`~napari_sdunet.errors.ModelConfigError`.
    """
    if not isinstance(arch, str) or arch.lower() not in MODELS:
        raise ModelConfigError(f"unknown architecture {arch!r}; choose from {', '.join(list_models())}")
    arch = arch.lower()
    if task is not None and task not in TASKS:
        raise ModelConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kwargs: dict[str, Any] = {}
    if task is not None or ARCHS[arch]:
        kwargs = preset_kwargs(arch, task or _DEFAULT_TASKLESS)
        if task is None:
            kwargs.pop("in_channels")
    kwargs.update(overrides)
    return build_model(MODELS[arch], kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "MODELS", "TASKS", "SDN", "ResSDN", "SegmentationModel", "UNet", "UNetPlusPlus", "SDUNet",
    "SDNUNet", "create_model", "list_models", "count_parameters",
]
