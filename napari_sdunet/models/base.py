"""Base class of the four networks: any input size, constructor config kept for checkpoints."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelConfigError

#: Bounds of the integer constructor arguments. They are far above every preset (depth 3-4, 32
#: filters, SDN state 150) and keep an untrusted config.json from asking for terabytes.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64), "out_channels": (1, 64), "depth": (1, 8), "base_filters": (1, 512),
    "sdn_state": (1, 1024),
}
#: Largest network create_model / load_checkpoint build (the biggest preset has 11 M parameters).
MAX_PARAMETERS = 250_000_000


class SegmentationModel(nn.Module):
    """Pads the input to a multiple of ``2**depth``, runs :meth:`forward_padded`, crops back.

    Subclasses set ``arch`` and call ``self._remember(locals())`` so that ``self.config`` holds the
    exact constructor arguments (what a checkpoint's ``config.json`` stores), and say which
    parameters form their decoder (:meth:`decoder_parameters`, what decoder-only fine-tuning trains).
    """

    arch: str = ""
    depth: int
    in_channels: int

    def _remember(self, kwargs: dict[str, Any]) -> None:
        cfg = {k: v for k, v in kwargs.items() if k not in ("self", "__class__")}
        for k, v in cfg.items():
            if isinstance(v, tuple):
                cfg[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        self.config = cfg

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.forward_padded(x)
        return y[..., :h, :w]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the decoder half (what ``trainable="decoder"`` trains); each network says."""
        raise NotImplementedError(f"{self.arch or type(self).__name__} does not say which parameters form its "
                                  "decoder: override decoder_parameters")

    @contextmanager
    def freeze_norm_stats(self) -> Iterator[None]:
        """Inside the context every BatchNorm layer stays in eval mode, even under ``model.train()``.

        The base model's running statistics are then used and kept (a few fine-tuning frames would
        otherwise overwrite them, which costs more held-out Dice than the fine-tuning gains; see
        docs/finetune.md); the layers' affine weights still train. On exit the layers follow the
        model's mode again.
        """
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and "train" not in vars(m)]  # a layer frozen by an outer context stays the outer's
        for m in norms:
            m.train = _eval_only.__get__(m)  # an instance attribute: Module.train(mode) calls it per child
            m.training = False
        try:
            yield
        finally:
            for m in norms:
                del m.train
                m.training = self.training

    @torch.no_grad()
    def open_gates(self, bias: float) -> int:
        """Open every ResSDN gate towards its parallel conv (see :meth:`ResSDN.open_gate`); returns how many."""
        from .sdn import ResSDN

        gates = [m for m in self.modules() if isinstance(m, ResSDN)]
        for m in gates:
            m.open_gate(bias)
        return len(gates)


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a BatchNorm layer inside :meth:`SegmentationModel.freeze_norm_stats`: always eval."""
    return nn.Module.train(self, False)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(name: str, v: Any, lo: int, hi: int) -> list[int]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) > 64:
        raise ModelConfigError(f"{name} must be a list of whole numbers, got {v!r}")
    bad = [x for x in v if not _is_int(x) or not lo <= x <= hi]
    if bad:
        raise ModelConfigError(f"{name} must hold whole numbers from {lo} to {hi}, got {list(v)!r}")
    return list(v)


def check_model_kwargs(cls: type[SegmentationModel], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check constructor arguments of ``cls`` by name, type and bounds before anything is built.

    Raises :class:`~napari_sdunet.errors.ModelConfigError` with a sentence naming the argument, so
    that a typo, ``depth=-1``, ``base_filters=0`` or ``sdn_state=1e9`` never reaches torch.
    """
    if not isinstance(kwargs, dict):
        raise ModelConfigError(f"the model settings must be a mapping of names to values, got {kwargs!r}")
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    unknown = sorted(str(k) for k in kwargs if k not in params)
    if unknown:
        raise ModelConfigError(f"{cls.arch or cls.__name__} has no setting {', '.join(map(repr, unknown))}; "
                               f"it accepts {', '.join(params)}")
    merged = {**params, **kwargs}
    for name, (lo, hi) in INT_LIMITS.items():
        if name in merged:
            v = merged[name]
            if not _is_int(v) or not lo <= v <= hi:
                raise ModelConfigError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
    depth = merged.get("depth", 4)
    if "sdn_directions" in merged:
        dirs = _int_list("sdn_directions", merged["sdn_directions"], 0, 3)
        if not 1 <= len(dirs) <= 8:
            raise ModelConfigError(f"sdn_directions must list 1 to 8 sweep directions (0-3), got {dirs!r}")
    if "sdn_residual" in merged and not isinstance(merged["sdn_residual"], bool):
        raise ModelConfigError(f"sdn_residual must be true or false, got {merged['sdn_residual']!r}")
    if "sdn_impl" in merged:
        impl = merged["sdn_impl"]
        if not isinstance(impl, str) or not impl.replace("_", "").isalnum() or len(impl) > 32:
            raise ModelConfigError(f"sdn_impl must be a sweep implementation name such as 'auto', got {impl!r}")
    if "sdn_encoder_levels" in merged:
        _int_list("sdn_encoder_levels", merged["sdn_encoder_levels"], 1, depth)
    if "sdn_decoder_levels" in merged:
        _int_list("sdn_decoder_levels", merged["sdn_decoder_levels"], 0, depth - 1)
    if "sdn_nodes" in merged:
        nodes = merged["sdn_nodes"]
        if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence) or len(nodes) > 64:
            raise ModelConfigError(f"sdn_nodes must be a list of [level, column] pairs, got {nodes!r}")
        for node in nodes:
            pair = _int_list("each of sdn_nodes", node, 0, depth)
            if len(pair) != 2 or pair[0] + pair[1] > depth:
                raise ModelConfigError(f"sdn_nodes: {node!r} is not a node [level, column] of a depth-{depth} "
                                       "U-Net++ (level + column <= depth)")
    return kwargs


def count_on_meta(model: nn.Module) -> int:
    """Number of parameter and buffer elements (works on the meta device, where nothing is allocated)."""
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def build_model(cls: type[SegmentationModel], kwargs: dict[str, Any], device: str | torch.device | None = None,
                ) -> SegmentationModel:
    """Check ``kwargs``, build ``cls`` on the meta device to size it, then on ``device`` (None: CPU).

    With ``device="meta"`` only the shapes exist: what checkpoint loading compares a weights file's
    header with before it allocates anything.
    """
    check_model_kwargs(cls, kwargs)
    try:
        with torch.device("meta"):
            meta = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"these settings do not describe a valid {cls.arch or cls.__name__}: {e}") from None
    n = count_on_meta(meta)
    if n > MAX_PARAMETERS:
        raise ModelConfigError(f"these settings describe a {cls.arch} with {n:,} weights, more than the "
                               f"{MAX_PARAMETERS:,} napari-sdunet builds; lower depth, base_filters or sdn_state")
    if device is not None and torch.device(device).type == "meta":
        return meta
    del meta
    if device is None:
        return cls(**kwargs)
    with torch.device(device):
        return cls(**kwargs)
