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


#: Inference precisions offered to the user.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to run inference in on ``device``, or None for plain float32.

    ``auto``: bf16 autocast on a CPU whose bf16 GEMMs measurably beat fp32 (AMX, or AVX512-BF16:
    3-7x faster here; the same host probe the SDN sweep uses), fp32 elsewhere, GPUs included.
    ``bf16`` forces it (it runs on any CPU, slowly where emulated); ``fp32`` turns it off. The
    models train under bf16 autocast, so their predictions hardly change (tests/test_inference.py).
    """
    import torch

    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "fp32" or device.type != "cpu":
        return None
    if name == "bf16":
        return torch.bfloat16
    from .models.sdn.cpu import bf16_gemm_pays

    return torch.bfloat16 if bf16_gemm_pays() else None


__all__ = ["DEVICES", "PRECISIONS", "pick_device", "pick_precision"]
