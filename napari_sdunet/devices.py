"""Which torch device to run on: the names a user may pick, and the check that one is usable.

Shared by inference, training and fine-tuning, and by the widgets' and the CLI's device choices.
torch is imported only when a device is picked, so the widgets can list the names cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Device names offered to the user; ``cuda:N`` is accepted too.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, then mps, then cpu; an explicit device must be available.

    Raises ``ValueError`` with a sentence the user can act on (an unknown name, no CUDA, no MPS).
    """
    import torch

    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is available to this torch build; pick cpu or auto")
    if name == "mps" and not mps_ok:
        raise ValueError("MPS (Apple GPU) was requested but is not available; pick cpu or auto")
    return torch.device(name)


__all__ = ["DEVICES", "pick_device"]
