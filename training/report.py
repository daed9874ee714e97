"""Markdown summary of reproduction folders and shipped models, for training/RESULTS.md.

    python -m training.report --repro runs/repro-nuclei runs/repro-polyps runs/repro-liver

Prints each task's Table-2-style table (re-made from the runs' metrics.json), the runs' budgets, and
one line per shipped model (its card metrics against the issue's targets). Copies each plot next to
RESULTS.md as ``results/<task>.png`` when ``--plots`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from napari_sdunet.models import display_name, get_arch, list_models
from napari_sdunet.zoo import PACKAGE_WEIGHTS

from .reproduce import arch_order, collect, make_table, write_outputs

TARGETS = {"nuclei": 94.5, "polyps": 84.0, "liver": 95.0}


def runs_block(task: str, out: Path) -> str:
    rows = collect(out)
    lines = [f"### {task}", "", make_table(task, rows)]
    lines.append("| run | steps | train time (s) | best val Dice (step) | warm start |")
    lines.append("|---|---|---|---|---|")
    for mj in sorted(out.glob("*/run*/metrics.json"), key=lambda p: (arch_order(p.parent.parent.name), str(p))):
        rec = json.loads(mj.read_text())
        f, ws = rec["fit"], rec.get("warm_start") or {}
        warm = f"{Path(rec['spec']['init_from']).parent.parent.name} run, gate bias {ws.get('gate_bias', '–')}" \
            if rec["spec"].get("init_from") else "–"
        lines.append(f"| {display_name(rec['spec']['arch'])} {mj.parent.name} | {f['steps']} | {f['seconds']} | "
                     f"{100 * f['best_val_dice']:.2f} ({f['best_step']}) | {warm} |")
    return "\n".join(lines) + "\n"


def paired_block(task: str, out: Path) -> str:
    """Per-seed differences SD network - its baseline (same seed, same data order): mean ± sd, wins."""
    by = {(r["arch"], r["seed"]): r["dice"] for r in collect(out)}
    lines = ["| comparison (same seeds) | seeds | Dice difference (points) | SD network better in |",
             "|---|---|---|---|"]
    pairs = {name: get_arch(name).baseline for name in list_models()}  # SD network -> its baseline
    for sd, base in pairs.items():
        if base is None:
            continue
        seeds = sorted(s for (a, s) in by if a == sd and (base, s) in by)
        if not seeds:
            continue
        d = np.array([by[(sd, s)] - by[(base, s)] for s in seeds])
        spread = f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else ""
        lines.append(f"| {display_name(sd)} − {display_name(base)} | {len(d)} | {d.mean():+.2f}{spread} | "
                     f"{int((d > 0).sum())} of {len(d)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def shipped_block() -> str:
    lines = ["| model | test metric | ours | issue target | met? | size |", "|---|---|---|---|---|---|"]
    for folder in sorted(p for p in PACKAGE_WEIGHTS.iterdir() if (p / "config.json").is_file()):
        cfg = json.loads((folder / "config.json").read_text())
        m, task = cfg.get("metrics", {}), cfg["task"]
        if task == "liver":
            name, val = "per-volume 3-D Dice", 100 * m["dice_3d"]
        else:
            name, val = "per-image Dice", 100 * m["dice"]
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        met = "yes" if val >= TARGETS[task] else "no"
        lines.append(f"| {folder.name} | {name} | {val:.2f} | {TARGETS[task]} | {met} | {size:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.report", description=__doc__)
    ap.add_argument("--repro", nargs="*", default=[], help="reproduce output folders")
    ap.add_argument("--plots", help="copy each task's table.png here as <task><suffix>.png")
    ap.add_argument("--plot-suffix", default="", help="e.g. --plot-suffix=-equal-steps: results/nuclei-equal-steps.png")
    ap.add_argument("--no-shipped", action="store_true", help="leave out the shipped-models table")
    a = ap.parse_args(argv)
    for d in map(Path, a.repro):
        task = json.loads(next(d.glob("*/run*/metrics.json")).read_text())["spec"]["task"]
        write_outputs(task, d)
        print(runs_block(task, d))
        paired = paired_block(task, d)
        if paired:
            print(paired)
        if a.plots:
            Path(a.plots).mkdir(parents=True, exist_ok=True)
            shutil.copy(d / "table.png", Path(a.plots) / f"{task}{a.plot_suffix}.png")
    if not a.no_shipped:
        print("### shipped models\n")
        print(shipped_block())
    return 0


if __name__ == "__main__":
    sys.exit(main())
