"""Directional GRU sweeps of the SDN correction stage, and the registry of implementations.

Every implementation computes, for one direction, the same recurrence (spec §1.2)::

    u_i = [p_{i-1}, p_i, p_{i+1}]            # neighbours on the previous, updated line (zero padded)
    a = W_in u_i + b_in ; c = W_h h_i + b_h  # h_i = the cell's value before this sweep
    r = sig(a_r + c_r); z = sig(a_z + c_z); n = tanh(a_n + r * c_n)
    s_i = z * n + (1 - z) * h_i

The first line of the sweep keeps its value. Implementations work on *lines-major* tensors
``(T, B, L, S)`` (T steps of lines of length L, features last so a line is contiguous) and are
registered by name with :func:`register_sweep`. :func:`sweep` converts from/to NCHW.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SweepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_IMPLS: dict[str, SweepFn] = {}
_AVAILABLE: dict[str, Callable[[torch.Tensor], bool]] = {}
#: implementations that take strided lines (they make their own contiguous copy, in one pass with
#: the dtype conversion and into a recycled buffer)
_STRIDED: set[str] = set()
#: Preference order for impl="auto": the first available implementation wins.
AUTO_ORDER: list[str] = ["loop"]


def register_sweep(name: str, fn: SweepFn, available: Callable[[torch.Tensor], bool] | None = None,
                   priority: int | None = None, strided: bool = False) -> None:
    """Register a lines-major sweep implementation.

    ``available(x)`` says whether it can run on tensor ``x`` (device, dtype, grad mode); ``priority``
    inserts it at that index of :data:`AUTO_ORDER` (None: not used by "auto"); ``strided``: it accepts
    non-contiguous lines.
    """
    _IMPLS[name] = fn
    if strided:
        _STRIDED.add(name)
    _AVAILABLE[name] = available or (lambda x: True)
    if priority is not None and name not in AUTO_ORDER:
        AUTO_ORDER.insert(priority, name)


def list_sweeps() -> list[str]:
    """Names of the registered sweep implementations."""
    _load_optional_impls()
    return sorted(_IMPLS)


def to_lines(x: torch.Tensor, direction: int) -> torch.Tensor:
    """NCHW -> lines-major (T, B, L, S) so that the sweep runs over increasing T."""
    if direction in (0, 1):
        lines = x.permute(3, 0, 2, 1)  # (W, B, H, S): columns are lines
    elif direction in (2, 3):
        lines = x.permute(2, 0, 3, 1)  # (H, B, W, S): rows are lines
    else:
        raise ValueError(f"direction must be 0..3, got {direction}")
    if direction in (1, 3):
        lines = lines.flip(0)
    return lines


def from_lines(lines: torch.Tensor, direction: int) -> torch.Tensor:
    """Inverse of :func:`to_lines`."""
    if direction in (1, 3):
        lines = lines.flip(0)
    if direction in (0, 1):
        return lines.permute(1, 3, 2, 0)
    return lines.permute(1, 3, 0, 2)


def gru_update(a: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GRU gate math shared by the implementations: a = input term, c = prior term, h = prior."""
    a_r, a_z, a_n = a.chunk(3, dim=-1)
    c_r, c_z, c_n = c.chunk(3, dim=-1)
    r = torch.sigmoid(a_r + c_r)
    z = torch.sigmoid(a_z + c_z)
    n = torch.tanh(a_n + r * c_n)
    return z * n + (1 - z) * h


def neighbours3(prev: torch.Tensor) -> torch.Tensor:
    """(B, L, S) line -> (B, L, 3S) taps [i-1, i, i+1] with zero padding at the line ends."""
    pad = F.pad(prev, (0, 0, 1, 1))
    return torch.cat((pad[:, :-2], pad[:, 1:-1], pad[:, 2:]), dim=-1)


def sweep_loop(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
               w_h: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
    """Plain autograd loop: one whole-line GEMM per step, prior term hoisted out of the loop."""
    # not recurrent: one GEMM for all lines; unbind so autograd does not build a full-size
    # gradient buffer for every per-step index
    priors = F.linear(lines, w_h, b_h).unbind(0)
    hs = lines.unbind(0)
    prev = hs[0]
    out = [prev]
    for t in range(1, len(hs)):
        a = F.linear(neighbours3(prev), w_in, b_in)
        prev = gru_update(a, priors[t], hs[t])
        out.append(prev)
    return torch.stack(out)


register_sweep("loop", sweep_loop)

_optional_loaded = False


def _load_optional_impls() -> None:
    """Import modules that register faster implementations (they may be absent or unusable)."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib
    import os

    mods = ["napari_sdunet.models.sdn.cpu"]
    # triton only where it can run: importing it costs seconds and, in a worker thread next to
    # Qt (napari), can crash the process on a machine without a GPU
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        mods.append("napari_sdunet.models.sdn.triton")
    for mod in mods:
        try:
            importlib.import_module(mod)
        except Exception:  # an optional fast path must never break the model
            pass


def pick_impl(x: torch.Tensor, impl: str = "auto") -> str:
    """Resolve ``impl`` ("auto" or a name) to a registered implementation that can run on ``x``.

    ``$NAPARI_SDUNET_SWEEP`` (a name) replaces "auto": the way out when a fast path misbehaves on a
    machine (e.g. ``loop`` where the Triton kernels fail on a new GPU), without touching the code.
    """
    _load_optional_impls()
    if impl == "auto":
        import os

        forced = os.environ.get("NAPARI_SDUNET_SWEEP", "").strip()
        if forced and forced != "auto":
            if forced not in _IMPLS:
                raise ValueError(f"NAPARI_SDUNET_SWEEP={forced!r} is not a sweep implementation; "
                                 f"have {sorted(_IMPLS)}")
            return forced
        for name in AUTO_ORDER:
            if name in _IMPLS and _AVAILABLE[name](x):
                return name
        return "loop"
    if impl not in _IMPLS:
        raise ValueError(f"unknown sweep implementation {impl!r}; have {sorted(_IMPLS)}")
    return impl


def sweep(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
          b_h: torch.Tensor, direction: int, impl: str = "auto") -> torch.Tensor:
    """Apply one directional sweep to an NCHW state tensor ``x`` of S channels."""
    name = pick_impl(x, impl)
    lines = to_lines(x, direction)
    if name not in _STRIDED:
        lines = lines.contiguous()
    return from_lines(_IMPLS[name](lines, w_in, b_in, w_h, b_h), direction)
