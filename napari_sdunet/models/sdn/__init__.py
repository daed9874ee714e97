"""The SDN layer and the implementations of its directional GRU sweep.

* :mod:`.layer`: :class:`SDN` and its gated residual variant :class:`ResSDN` (what the networks use);
* :mod:`.sweep`: the recurrence, the plain autograd loop and the registry ``impl="auto"`` picks from;
* :mod:`.cpu`: the fast CPU sweep (custom autograd Function), backed by the C++ kernels of
  :mod:`.cpp` (``_sweep_cpu.cpp``) where they build;
* :mod:`.triton`: the fused GPU sweep (imported only where CUDA or the Triton interpreter is there).
"""

from .layer import DIRECTIONS, SDN, ResSDN, SDNCell
from .sweep import list_sweeps, register_sweep

# the sweep function itself is napari_sdunet.models.sdn.sweep.sweep: a package attribute of that
# name would hide the submodule
__all__ = ["DIRECTIONS", "SDN", "ResSDN", "SDNCell", "list_sweeps", "register_sweep"]
