"""Paper-parity task presets and the authors' SDN placement rules.

Placement follows the authors' code, not the paper's figure (see docs/architecture.md):

* U-Net / SDU-Net (``sdn_n_layers`` = n): Down *i* gets an SDN block if i <= n, so encoder levels
  1..n+1; Up *i* gets one if i <= n, so decoder levels L-1 .. L-1-n.
* U-Net++ / SDNU-Net: encoder X0,0 and X1,0 always, X[i,0] if n >= i; decoder X0,1 always, X0,2 if
  n >= 2, X0,3 if n >= 3, and X3,1 X2,2 X1,3 X0,4 if n >= 4 (depth 4).

Exact parameter counts (1 output logit) and why they differ from the paper's Table 4:

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

from typing import Any

#: Per-task settings: network shape, training defaults (Table 5) and preprocessing.
TASKS: dict[str, dict[str, Any]] = {
    "nuclei": {
        "in_channels": 3, "depth": 3, "sdn_n_layers": 2, "lr": 1e-3, "batch_size": 20,
        "preprocessing": {"input_size": [96, 96], "channels": 3, "modality": "microscopy",
                          "scale": 255.0, "ct_window": None},
    },
    "polyps": {
        "in_channels": 3, "depth": 4, "sdn_n_layers": 1, "lr": 1e-4, "batch_size": 20,
        "preprocessing": {"input_size": [144, 192], "channels": 3, "modality": "colonoscopy",
                          "scale": 255.0, "ct_window": None},
    },
    "liver": {
        "in_channels": 1, "depth": 4, "sdn_n_layers": 1, "lr": 1e-4, "batch_size": 16,
        "preprocessing": {"input_size": [128, 128], "channels": 1, "modality": "ct",
                          "scale": None, "ct_window": [-40.0, 160.0]},
    },
}

#: The four architectures of the paper and whether they carry SDN blocks.
ARCHS = {"unet": False, "unetpp": False, "sdunet": True, "sdnunet": True}


def unet_sdn_levels(depth: int, n: int) -> tuple[list[int], list[int]]:
    """Encoder and decoder levels that get SDN blocks in the authors' U-Net (``sdn_n_layers`` = n)."""
    enc = [i + 1 for i in range(depth) if i <= n]
    dec = [depth - 1 - i for i in range(depth) if i <= n]
    return enc, dec


def unetpp_sdn_nodes(depth: int, n: int) -> list[list[int]]:
    """Nodes [i, j] that get SDN blocks in the authors' NestedUnet (``sdn_n_layers`` = n)."""
    nodes = [[0, 0], [1, 0]] + [[i, 0] for i in range(2, depth + 1) if n >= i]
    nodes += [[0, 1]] + [[0, j] for j in (2, 3) if n >= j and j <= depth]
    if n >= 4 and depth == 4:
        nodes += [[3, 1], [2, 2], [1, 3], [0, 4]]
    return nodes


def preset_kwargs(arch: str, task: str) -> dict[str, Any]:
    """Constructor arguments of ``arch`` for the paper-parity preset ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    t = TASKS[task]
    kw: dict[str, Any] = {"in_channels": t["in_channels"], "depth": t["depth"]}
    if ARCHS[arch]:
        n = t["sdn_n_layers"]
        if arch == "sdunet":
            kw["sdn_encoder_levels"], kw["sdn_decoder_levels"] = unet_sdn_levels(t["depth"], n)
        else:
            kw["sdn_nodes"] = unetpp_sdn_nodes(t["depth"], n)
        kw.update(sdn_state=150, sdn_directions=[0, 2], sdn_residual=True)
    return kw
