"""The architectures napari-sdunet knows: one :class:`ArchSpec` each, registered beside its class.

Everything the engine and the experiments need to know about a network that is not in its class
lives in its spec: the name shown to people, whether it carries SDN blocks and where it places them
for a task, the baseline an SD network is warm-started from, and the constructor arguments of its
presets. :func:`napari_sdunet.models.create_model`, checkpoint loading, the training tables and the
campaign all read this registry, so adding an architecture is one module (the class, subclassing
:class:`~napari_sdunet.models.base.SegmentationModel`) plus one :func:`register_arch` call.

Exact parameter counts of the presets (1 output logit) and why they differ from the paper's Table 4:

=======  =========  =========  ==========  ==========
preset   U-Net      U-Net++    SDU-Net     SDNU-Net
=======  =========  =========  ==========  ==========
nuclei   1,799,393  2,236,161  6,161,237   5,421,687
polyps   7,243,745  9,163,329  10,363,097  11,000,635
liver    polyps - 576 (1 input channel)
=======  =========  =========  ==========  ==========

* Table 4 lists the nuclei SD models the other way round (5.42M as SDU-Net). Its own FLOP column
  and the architecture agree with the names here: SDU-Net = U-Net + ResSDN.
* Table 4's 9.76M "U-Net++" (polyps/liver) is a U-Net++ with one ResSDN block at X0,1
  (9,758,143); a true U-Net++ has 9,163,329.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ModelConfigError
from ..tasks import TaskPreset

if TYPE_CHECKING:
    from .base import SegmentationModel

#: SDN layer settings of every SD preset (paper: state 150, sweeps left->right then top->bottom, gated).
SDN_PRESET: Mapping[str, Any] = {"sdn_state": 150, "sdn_directions": [0, 2], "sdn_residual": True}

#: ``(depth, sdn_n_layers) -> constructor arguments`` that place a network's SDN blocks for a task.
SdnPlacement = Callable[[int, int], dict[str, Any]]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its registry name (= ``cls.arch``, what config.json stores) and what it means.

    ``baseline``: the architecture with the same layer names minus the SDN paths, which
    ``training.runner.warm_start`` copies weights from (None: none). ``sdn_placement``: where the
    SDN blocks go for a task (None: a network without SDN). ``preset_kwargs``: further constructor
    arguments of every preset.
    """

    name: str
    display_name: str
    cls: type[SegmentationModel]
    baseline: str | None = None
    sdn_placement: SdnPlacement | None = None
    preset_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_sdn(self) -> bool:
        return self.sdn_placement is not None

    def kwargs_for(self, task: TaskPreset) -> dict[str, Any]:
        """Constructor arguments for the preset ``task``: its shape, SDN placement, then ``preset_kwargs``."""
        kw: dict[str, Any] = {"in_channels": task.in_channels, "depth": task.depth}
        if self.sdn_placement is not None:
            kw.update(self.sdn_placement(task.depth, task.sdn_n_layers))
        kw.update({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.preset_kwargs.items()})
        return kw


#: Registered architectures by name (:func:`arch_names` gives the order they are listed in).
ARCHITECTURES: dict[str, ArchSpec] = {}


def arch_names() -> list[str]:
    """Registered names, networks without SDN first, each group in registration order.

    The paper's order for the four (U-Net, U-Net++, SDU-Net, SDNU-Net), and every baseline comes
    before the SD networks warm-started from it.
    """
    return [s.name for s in sorted(ARCHITECTURES.values(), key=lambda s: s.has_sdn)]


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Make ``spec`` known to create_model, checkpoint loading and training; returns it."""
    if spec.cls.arch != spec.name:
        raise ValueError(f"{spec.cls.__name__}.arch is {spec.cls.arch!r}, not the registered name {spec.name!r}: "
                         "checkpoints store the class's arch")
    if spec.baseline is not None and spec.baseline not in ARCHITECTURES:
        raise ValueError(f"{spec.name}: register its baseline {spec.baseline!r} first")
    ARCHITECTURES[spec.name] = spec
    return spec


def unregister_arch(name: str) -> None:
    """Forget the architecture ``name`` (tests register a toy one and remove it again)."""
    ARCHITECTURES.pop(name, None)


def get_arch(name: Any) -> ArchSpec:
    """The spec of ``name`` (any case); :class:`~napari_sdunet.errors.ModelConfigError` naming the choices."""
    spec = ARCHITECTURES.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise ModelConfigError(f"unknown architecture {name!r}; choose from {', '.join(arch_names())}")
    return spec


def display_name(name: str) -> str:
    """The name people read (``U-Net++``) of a registered architecture; the name itself otherwise."""
    spec = ARCHITECTURES.get(name)
    return spec.display_name if spec is not None else name


def preset_kwargs(arch: str, task: str) -> dict[str, Any]:
    """Constructor arguments of ``arch`` for the paper-parity preset ``task`` (see :mod:`napari_sdunet.tasks`)."""
    from ..tasks import TASKS

    if task not in TASKS:
        raise ModelConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return get_arch(arch).kwargs_for(TASKS[task])
