"""Ship a trained run as a package model: ``napari_sdunet/weights/<arch>-<task>/``.

The run's best weights are stored as fp16 safetensors with config.json (preprocessing, recipe,
provenance) and a model card README.md. The test metrics in the card are measured again on the
shipped (fp16) weights as loaded back from the package folder, with training/evaluate.py.

    python -m training.ship runs/sdunet-nuclei [--name sdunet-nuclei] [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from napari_sdunet.checkpoint import load_checkpoint, save_checkpoint
from napari_sdunet.tasks import TASKS
from napari_sdunet.zoo import PACKAGE_WEIGHTS

from .datasets import load_split
from .evaluate import predict_probs
from .runner import test_model

DATA_TERMS = {
    "nuclei": ("2018 Data Science Bowl stage1_train (BBBC038), the 96x96 'dsb2018_96' preprocessing; "
               "80/10/10 random split (seed 42): 536 train / 67 val / 67 test",
               "CC0 1.0. Cite Caicedo et al., Nature Methods 16, 1247-1253 (2019)."),
    "polyps": ("CVC-ClinicDB (612 frames, 29 sequences), split by sequence 23/3/3 (seed 42): 484 train / 73 val / "
               "55 test frames",
               "CVC-ClinicDB: research and educational use only, no commercial use. Cite Bernal et al., "
               "Comput. Med. Imaging Graph. 43, 99-111 (2015). These weights inherit that restriction."),
    "liver": ("32 real LiTS training volumes as 128x128 axial slices windowed to [-40, 160] HU, split by volume "
              "(26 train / 6 val); tested per volume on 3 HU volumes of 3D-IRCADb-01 (patients 1, 7, 17; not in "
              "training) seen through the same window",
              "LiTS: CC BY-NC-SA 4.0 (cite Bilic et al., Med. Image Anal. 84, 102680, 2023); part of it is "
              "3D-IRCADb-01 (CC BY-NC-ND 4.0, IRCAD). Non-commercial use only."),
}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def metrics_lines(task: str, m: dict[str, Any]) -> list[str]:
    if task == "liver":
        s = m["slices_2d"]
        lines = [f"- per-volume 3-D Dice: **{pct(m['dice_3d'])} ± {pct(m['dice_3d_sd'])}** "
                 f"(Jaccard {pct(m['jaccard_3d'])} ± {pct(m['jaccard_3d_sd'])}), {m['n_volumes']} volumes, "
                 f"window {m['ct_window']} HU"]
        lines += [f"  - {v['id']}: Dice {pct(v['dice_3d'])}" for v in m["volumes"]]
        lines.append(f"- per-slice (128x128, {s['n']} slices): Dice {pct(s['dice'])} ± {pct(s['dice_sd'])}, "
                     f"global Dice {pct(s['global_dice'])}, batch-pooled Dice {pct(s['paper_batch_dice'])}")
        return lines
    return [f"- per-image Dice: **{pct(m['dice'])} ± {pct(m['dice_sd'])}**, Jaccard {pct(m['jaccard'])} ± "
            f"{pct(m['jaccard_sd'])} ({m['n']} test images, scored at {m['eval_size'][0]}x{m['eval_size'][1]} HxW)",
            f"- global Dice {pct(m['global_dice'])}; batch-pooled Dice (the paper's metric, batches of 20) "
            f"{pct(m['paper_batch_dice'])}"]


def model_card(name: str, task: str, config: dict[str, Any], metrics: dict[str, Any], command: str,
               note: str = "") -> str:
    tr = config.get("training", {})
    spec, fit, fc = tr.get("spec", {}), tr.get("fit", {}), tr.get("fit_config", {})
    prep = config.get("preprocessing", {})
    data, terms = DATA_TERMS[task]
    aug = ", ".join(spec.get("augment") or []) or "none"
    lines = [
        f"# {name}", "",
        f"{config['arch']} for {task} segmentation (napari-sdunet), trained from the paper's recipe on CPU with a "
        "reduced budget; see training/RESULTS.md for how it compares with the paper.", "",
        "## Data", f"- {data}", f"- Terms: {terms}", "",
        "## Preprocessing (applied by inference from config.json)",
        f"- input size {prep.get('input_size')} (HxW), {prep.get('channels')} channel(s), "
        + (f"CT window {prep['ct_window']} HU -> [0, 1]" if prep.get("ct_window") else "8-bit / 255 -> [0, 1]"), "",
        "## Recipe",
        f"- loss 0.5 BCE + (1 - soft Dice); Adam lr {fc.get('lr') or spec.get('lr') or TASKS[task].lr}, "
        f"batch {fc.get('batch_size') or spec.get('batch_size') or TASKS[task].batch_size}, "
        f"lr schedule {fc.get('lr_schedule', 'constant')}, "
        f"seed {spec.get('seed')}; augmentation: {aug}; warm start: {spec.get('init_from') or 'none'}",
        f"- trained {fit.get('steps')} steps ({fit.get('seconds')} s) on {tr.get('hardware')}; best validation "
        f"Dice {fit.get('best_val_dice', float('nan')):.4f} at step {fit.get('best_step')}; "
        f"time budget {spec.get('time_budget_s')} s",
        "", f"## Test metrics (measured by training/evaluate.py on the {metrics.get('measured_on')})",
        *metrics_lines(task, metrics),
        f"- test-time flips: {'yes' if metrics.get('flip_tta') else 'no'}",
        *([f"- fp16 storage: max |Δp| {metrics['fp16_check']['max_abs_prob_diff']:.2e}, "
           f"{100 * metrics['fp16_check']['mask_pixels_changed']:.4f} % of mask pixels change (8 images)"]
          if "fp16_check" in metrics else []), "",
        "## Provenance", f"- command: `{command}`", f"- commit: {tr.get('commit')}",
    ]
    if note:
        lines += ["", "## Notes", note]
    return "\n".join(lines) + "\n"


def fp16_drift(fp32: torch.nn.Module, fp16: torch.nn.Module, images: torch.Tensor,
               model_size: list[int]) -> dict[str, float]:
    """How much storing the weights in fp16 changes the output: max |p32 - p16| and mask disagreement."""
    p32 = predict_probs(fp32, images, model_size)
    p16 = predict_probs(fp16, images, model_size)
    return {"max_abs_prob_diff": float((p32 - p16).abs().max()),
            "mask_pixels_changed": float(((p32 > 0.5) != (p16 > 0.5)).float().mean())}


def ship(run: str | Path, name: str | None = None, note: str = "", flip_tta: bool = False,
         data_root: str | None = None, dest: Path = PACKAGE_WEIGHTS, reuse_metrics: bool = False) -> Path:
    """Write the run's model as ``dest/<name>`` (fp16) with config and card; see the module docstring.

    ``reuse_metrics``: put the run's own test metrics (fp32 weights) in the card instead of testing the
    fp16 weights again, and record how much fp16 changes the output on 8 test images (cheap on a CPU).
    """
    run = Path(run)
    rec = json.loads((run / "metrics.json").read_text())
    model, config = load_checkpoint(run / "model")
    task = config["task"]
    name = name or f"{config['arch']}-{task}"
    spec = rec["spec"]
    size = config["preprocessing"]["input_size"]
    cmd = "python -m training fit " + " ".join(_cli_args(spec))
    folder = save_checkpoint(model, dest / name, task=task, preprocessing=config["preprocessing"], half=True,
                             extra={"name": name, "training": config.get("training", {})})
    shipped, _ = load_checkpoint(folder)
    root = data_root or spec.get("data_root")
    if reuse_metrics:
        metrics = dict(rec["test"], measured_on="fp32 weights of the run (training/runner.py)")
        if task == "liver":
            probe = load_split("liver", "val", data_root=root, limit=8).images
        else:
            probe = load_split(task, "test", source=spec.get("source"), data_root=root, limit=8).images
        metrics["fp16_check"] = fp16_drift(model, shipped, probe, size)
    else:
        metrics = test_model(shipped, task, size, root, spec.get("test_source"), flip_tta, spec.get("limit_test"),
                             config["preprocessing"].get("ct_window"))
        metrics["measured_on"] = "shipped fp16 weights"
    config = dict(config, training=config.get("training", {}))
    card = model_card(name, task, config, metrics, cmd, note)
    return save_checkpoint(shipped, folder, task=task, preprocessing=config["preprocessing"], half=True,
                           extra={"name": name, "training": config["training"], "metrics": metrics,
                                  "command": cmd}, card=card)


def _cli_args(spec: dict[str, Any]) -> list[str]:
    args = [f"--task {spec['task']}", f"--arch {spec['arch']}", f"--out {spec['out']}"]
    simple = {"source": "--source", "epochs": "--epochs", "max_steps": "--max-steps", "lr": "--lr",
              "batch_size": "--batch-size", "patience": "--patience", "val_every": "--val-every", "seed": "--seed",
              "init_from": "--init-from", "limit_train": "--limit-train", "limit_val": "--limit-val",
              "limit_test": "--limit-test", "test_source": "--test-source", "data_root": "--data-root",
              "threads": "--threads"}
    for k, flag in simple.items():
        if spec.get(k) is not None and spec.get(k) != "":
            args.append(f"{flag} {spec[k]}")
    if spec.get("ct_window"):
        args.append("--ct-window " + " ".join(f"{v:g}" for v in spec["ct_window"]))
    if spec.get("patience") is None:
        args.append("--patience 0")
    if spec.get("input_size"):
        args.append("--input-size " + "x".join(str(v) for v in spec["input_size"]))
    if spec.get("augment"):
        args.append("--augment " + " ".join(spec["augment"]))
    if spec.get("lr_schedule", "constant") != "constant":
        args.append(f"--lr-schedule {spec['lr_schedule']}")
    if spec.get("time_budget_s"):
        args.append(f"--time-budget {spec['time_budget_s'] / 60:g}")
    if spec.get("model_overrides", {}).get("base_filters"):
        args.append(f"--base-filters {spec['model_overrides']['base_filters']}")
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.ship", description=__doc__)
    ap.add_argument("run", help="run folder written by `python -m training fit`")
    ap.add_argument("--name", help="package model name (default <arch>-<task>)")
    ap.add_argument("--note", default="", help="text for the card's Notes section")
    ap.add_argument("--flip-tta", action="store_true", help="measure the card's metrics with test-time flips")
    ap.add_argument("--data-root")
    ap.add_argument("--reuse-metrics", action="store_true",
                    help="card metrics from the run (fp32) + an fp16 drift check, instead of a full re-test")
    a = ap.parse_args(argv)
    folder = ship(a.run, a.name, a.note, a.flip_tta, a.data_root, reuse_metrics=a.reuse_metrics)
    print(folder)
    print((folder / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
