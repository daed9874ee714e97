"""Build and load the fused C++ CPU sweep kernels (``_sweep_cpu.cpp``) with ``torch.utils.cpp_extension``.

Why C++: on CPU the sweep's time outside its GEMMs is the per-step gate arithmetic, 7 eager ATen
passes forward and 13 backward per step (25-45 % of the time in fp32, more in bf16, where the GEMMs
are 4x faster; profile in benchmarks/README.md). The extension runs the whole loop and fuses each
step's gate math into one vectorised pass; the GEMMs still go to ATen (MKL / oneDNN, AMX where the
CPU has it).

The kernels are compiled on first use (about a minute; g++ and ninja are needed) for the host CPU
(``-march=native``), cached under torch's extension folder with the CPU flags in the name, so a
cache copied to another kind of CPU is not reused. ``python -m napari_sdunet.models.sdn.cpp``
builds it ahead of time. Where the build fails, :func:`ops` returns None and the sweeps use the
pure-torch path of :mod:`.cpu` (same maths). ``NAPARI_SDUNET_NO_CPP=1`` switches it off.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_sweep_cpu.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def extension_name() -> str:
    """Name of the compiled library: changes with the source, the torch version and the CPU's flags."""
    h = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode())
    return f"napari_sdunet_sweep_{h.hexdigest()[:12]}"


def build(verbose: bool = False) -> None:
    """Compile (or find in the cache) and load the library; raises if that fails."""
    from torch.utils import cpp_extension

    cpp_extension.load(name=extension_name(), sources=[str(SOURCE)], is_python_module=False, verbose=verbose,
                       extra_cflags=["-O3", "-march=native", "-fno-math-errno"])


def ops():
    """``torch.ops.napari_sdunet_sweep`` (forward, backward, simd), or None where it cannot be built."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            result = None
            if os.environ.get("NAPARI_SDUNET_NO_CPP", "") not in ("1", "true", "yes") and SOURCE.exists():
                try:
                    build()
                    result = torch.ops.napari_sdunet_sweep
                except Exception as err:  # no compiler, no ninja, ...: the pure-torch path still works
                    warnings.warn(f"SDN sweep: C++ kernels not built ({type(err).__name__}: {err}); "
                                  "using the slower pure-torch path", RuntimeWarning, stacklevel=2)
            _state["ops"] = result
    return _state["ops"]


def simd() -> bool:
    """Whether the built kernels are vectorised (AVX-512). Without it the pure-torch path is faster."""
    o = ops()
    return bool(o is not None and o.simd())


if __name__ == "__main__":
    build(verbose=True)
    print(f"built {extension_name()}: AVX-512 kernels = {torch.ops.napari_sdunet_sweep.simd()}")
