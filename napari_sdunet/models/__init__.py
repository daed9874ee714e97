"""Networks of napari-sdunet: U-Net, U-Net++, SDU-Net and SDNU-Net, built by :func:`create_model`.

Each architecture is a class plus one :class:`~.registry.ArchSpec` registered beside it (see
:mod:`.registry`); the task presets are :data:`napari_sdunet.tasks.TASKS`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelConfigError
from ..tasks import TASKS
from .base import SegmentationModel, build_model
from .registry import (
    ARCHITECTURES,
    ArchSpec,
    arch_names,
    display_name,
    get_arch,
    preset_kwargs,
    register_arch,
    unregister_arch,
)
from .sdn import SDN, ResSDN
from .unet import SDUNet, UNet
from .unetpp import SDNUNet, UNetPlusPlus

#: Default SDN placement when no task is given (the polyps/liver rule, depth 4).
_DEFAULT_TASKLESS = "polyps"


def list_models() -> list[str]:
    """Architecture names accepted by :func:`create_model` (the registered ones)."""
    return arch_names()


def create_model(arch: str, task: str | None = None, **overrides: Any) -> SegmentationModel:
    """Build ``arch`` (unet, unetpp, sdunet, sdnunet or another registered one): ``task`` preset, then ``overrides``.

    ``task`` is one of nuclei, polyps, liver (paper-parity shapes and SDN placement). Without a
    task, SD models use the polyps placement rule. Any constructor argument can be overridden,
    e.g. ``sdn_state=64`` or ``in_channels=1``. Every argument is checked by name, type and bounds
    first; bad ones raise :class:`~napari_sdunet.errors.ModelConfigError`.
    """
    spec = get_arch(arch)
    if task is not None and task not in TASKS:
        raise ModelConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kwargs: dict[str, Any] = {}
    if task is not None or spec.has_sdn:
        kwargs = spec.kwargs_for(TASKS[task or _DEFAULT_TASKLESS])
        if task is None:
            kwargs.pop("in_channels")
    kwargs.update(overrides)
    return build_model(spec.cls, kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ARCHITECTURES", "ArchSpec", "arch_names", "SDN", "ResSDN", "SegmentationModel", "UNet", "UNetPlusPlus", "SDUNet",
    "SDNUNet", "count_parameters", "create_model", "display_name", "get_arch", "list_models", "preset_kwargs",
    "register_arch", "unregister_arch",
]
