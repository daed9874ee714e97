"""Table 2 of the paper, reproduced: train the four networks N times, tabulate mean ± sd, plot beside the paper.

Writes ``<out>/<arch>/run<k>/`` (one :func:`training.runner.run_fit` each), ``<out>/results.csv``
(one row per run), ``<out>/table.md`` and ``<out>/table.png``. Runs already finished (their
``metrics.json`` exists) are reused, so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from napari_sdunet.models import display_name, get_arch, list_models

#: Table 2 of the paper (Dice, Jaccard in %, mean ± sd over 5 runs). Their Dice is batch-pooled.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "nuclei": {"unet": (91.79, 0.32, 85.52, 0.50), "unetpp": (92.64, 0.24, 86.88, 0.38),
               "sdunet": (93.25, 0.35, 87.33, 0.58), "sdnunet": (94.10, 0.36, 88.71, 0.52)},
    "polyps": {"unet": (75.37, 0.60, 65.32, 0.67), "unetpp": (76.33, 1.69, 66.45, 1.73),
               "sdunet": (80.62, 0.79, 71.04, 0.90), "sdnunet": (83.31, 1.30, 73.19, 1.55)},
    "liver": {"unet": (77.44, 2.25, 69.92, 2.19), "unetpp": (80.24, 2.10, 73.73, 2.46),
              "sdunet": (82.43, 2.24, 75.02, 2.51), "sdnunet": (85.72, 2.45, 79.37, 2.17)},
}


def arch_order(arch: str) -> tuple[int, str]:
    """Sort key: the registry's order (the paper's for the four), then unknown names alphabetically."""
    order = list_models()
    return (order.index(arch), arch) if arch in order else (len(order), arch)


def run_metrics(test: dict[str, Any]) -> dict[str, float]:
    """The numbers one run contributes to the table (in %)."""
    if "dice_3d" in test:  # liver: per-volume 3-D scores + the 2-D slice summary
        s = test["slices_2d"]
        return {"dice": 100 * test["dice_3d"], "jaccard": 100 * test["jaccard_3d"],
                "slice_dice": 100 * s["dice"], "global_dice": 100 * s["global_dice"],
                "paper_batch_dice": 100 * s["paper_batch_dice"]}
    return {"dice": 100 * test["dice"], "jaccard": 100 * test["jaccard"], "global_dice": 100 * test["global_dice"],
            "paper_batch_dice": 100 * test["paper_batch_dice"]}


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return f"{np.mean(values):.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{np.mean(values):.2f}"


def make_table(task: str, rows: list[dict[str, Any]]) -> str:
    """Markdown: ours (per-image / per-volume Dice, Jaccard, global, batch-pooled) beside the paper's."""
    dice_name = "per-volume 3-D Dice" if task == "liver" else "per-image Dice"
    lines = [f"| Model | runs | {dice_name} | Jaccard | global Dice | batch-pooled Dice (paper's metric) "
             "| paper Dice | paper Jaccard |", "|---|---|---|---|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in rows}, key=arch_order):
        rs = [r for r in rows if r["arch"] == arch]
        p = PAPER_TABLE2[task].get(arch)
        paper = f"{p[0]:.2f} ± {p[1]:.2f} | {p[2]:.2f} ± {p[3]:.2f}" if p else "– | –"
        lines.append(f"| {display_name(arch)} | {len(rs)} | {_ms([r['dice'] for r in rs])} | "
                     f"{_ms([r['jaccard'] for r in rs])} | {_ms([r['global_dice'] for r in rs])} | "
                     f"{_ms([r['paper_batch_dice'] for r in rs])} | {paper} |")
    return "\n".join(lines) + "\n"


def make_plot(task: str, rows: list[dict[str, Any]], path: Path) -> None:
    """Bar plot (Agg) of our Dice (mean ± sd, runs as dots) beside the paper's, per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in rows}, key=arch_order)
    paper = [PAPER_TABLE2[task].get(a, (np.nan, 0.0)) for a in archs]
    fig, ax = plt.subplots(figsize=(6, 3.9), dpi=120)
    x = np.arange(len(archs))
    ours = [[r["dice"] for r in rows if r["arch"] == a] for a in archs]
    ax.bar(x - 0.2, [np.mean(v) for v in ours], 0.4, yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in ours],
           label="ours (" + ("per-volume 3-D Dice" if task == "liver" else "per-image Dice") + ")", color="#4477aa")
    for i, v in enumerate(ours):
        ax.plot([i - 0.2] * len(v), v, "k.", ms=4)
    ax.bar(x + 0.2, [p[0] for p in paper], 0.4, yerr=[p[1] for p in paper],
           label="paper, Table 2 (2-D batch-pooled Dice)", color="#cc6677")
    ax.set_xticks(x, [display_name(a) for a in archs])
    ax.set_ylabel("Dice (%)")
    lo = min([min(v) for v in ours] + [p[0] for p in paper if not np.isnan(p[0])])
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_title(f"{task}: ours vs. paper")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per finished run under ``out`` (``<arch>/run<k>/metrics.json``)."""
    rows = []
    for mj in sorted(out.glob("*/run*/metrics.json")):
        rec = json.loads(mj.read_text())
        rows.append({"arch": rec["spec"]["arch"], "run": mj.parent.name, "seed": rec["spec"]["seed"],
                     "steps": rec["fit"]["steps"], "seconds": rec["fit"]["seconds"], **run_metrics(rec["test"])})
    return rows


def write_outputs(task: str, out: Path) -> list[dict[str, Any]]:
    rows = collect(out)
    if not rows:
        raise ValueError(f"no finished runs under {out}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(make_table(task, rows))
    make_plot(task, rows, out / "table.png")
    return rows


def reproduce(task: str, runs: int, out: str | Path, archs: list[str] | None = None,
              spec_kwargs: dict[str, Any] | None = None, progress: bool = True,
              warm_start: bool = False) -> list[dict[str, Any]]:
    """Train ``archs`` (default: every registered one) ``runs`` times, seeds 0..runs-1; write the table and plot.

    ``warm_start``: an SD network's run k starts from the weights of its baseline's run k in ``out``
    (:attr:`ArchSpec.baseline <napari_sdunet.models.registry.ArchSpec.baseline>`: U-Net -> SDU-Net,
    U-Net++ -> SDNU-Net), which must have finished.
    """
    from .runner import RunSpec, run_fit

    out = Path(out)
    kw = dict(spec_kwargs or {})
    kw["task"] = task
    for arch in archs or list_models():
        base = get_arch(arch).baseline
        for k in range(runs):
            folder = out / arch / f"run{k}"
            if (folder / "metrics.json").is_file():
                continue
            init = None
            if warm_start and base is not None:
                init = out / base / f"run{k}" / "model"
                if not (init / "config.json").is_file():
                    raise FileNotFoundError(f"warm start needs the finished {base} run {init}")
                init = str(init)
            run_fit(RunSpec(arch=arch, out=str(folder), seed=k, init_from=init, **kw), progress=progress)
            write_outputs(task, out)
    return write_outputs(task, out)
