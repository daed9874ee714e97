"""Does fine-tuning with the defaults pay off in five minutes? Three domain shifts built from ../shared/data,
the best-validating shipped model of each task, 10 corrected frames, the library's default settings.

    .venv/bin/python benchmarks/finetune_shifts.py --shift all --threads 1 --json-out /tmp/shifts.jsonl

Shifts (the fine-tuning frames are never among the evaluation frames):

* ``polyps``: CVC-ClinicDB test sequence 1 (never seen in training), frames 1-10 fine-tune; evaluated on
  every other frame of the three test sequences (1: frames 11-25, 4 and 21: all), 45 frames, and per
  sequence: the rest of the same video (what a user who corrected part of a video gets) and the other
  polyps. ``--sequence 21`` fine-tunes on the first 10 frames of test sequence 21 instead.
* ``nuclei``: the stained-tissue (H&E-like colour, 320x256) images of DSB2018, 17 % of the training set.
  The 10 of the validation split fine-tune (the shipped model never trained on them; they only chose
  its checkpoint), the 9 of the test split are evaluated.
* ``liver``: the second CT source, the TotalSegmentator example (128x128x30 HU, automatic liver mask,
  another scanner and site than the LiTS/3D-IRCADb training and test data): every third slice (z = 1, 4,
  ..., 28, ten slices) fine-tunes, the 20 others are evaluated (per slice, and 3-D over those slices).

Dice is the mean per-image (per-slice) Dice at the images' full resolution, threshold 0.5, as
``napari-sdunet evaluate`` computes it. *Wall* is the :func:`napari_sdunet.finetune.finetune` call alone
(reading the frames, Dice before on its held-out frames, training, Dice after, saving), the figure that
the time budget bounds. Settings default to the library's defaults; each can be overridden to compare.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TASK_OF_SHIFT = {"polyps": "polyps", "nuclei": "nuclei", "liver": "liver"}


def polyp_shift(sequence: str = "1") -> tuple[list[str], list[str]]:
    rows = list(csv.DictReader(open(DATA / "polyps" / "split.csv")))
    if not any(r["sequence"] == sequence and r["split"] == "test" for r in rows):
        raise SystemExit(f"--sequence {sequence} is not a test sequence of CVC-ClinicDB "
                         f"(test: {sorted({r['sequence'] for r in rows if r['split'] == 'test'}, key=int)})")
    frames = sorted((r["id"] for r in rows if r["sequence"] == sequence), key=int)
    tune = frames[:10]
    test = sorted((r["id"] for r in rows if r["split"] == "test" and r["id"] not in tune), key=int)
    return tune, test


def nuclei_shift() -> tuple[list[str], list[str]]:
    root = DATA / "nuclei"
    split = {r["id"]: r["split"] for r in csv.DictReader(open(root / "split.csv"))}
    colour = sorted(r["id"] for r in csv.DictReader(open(root / "metadata.csv")) if r["grayscale_rgb"] == "0")
    return [i for i in colour if split[i] == "val"], [i for i in colour if split[i] == "test"]


def liver_volume():
    from napari_sdunet.io import read_image, read_mask

    root = DATA / "liver_sample_totalseg"
    vol = read_image(root / "images" / "totalseg_example_ct_sm.nii.gz")
    mask = read_mask(root / "masks" / "totalseg_example_ct_sm.nii.gz") > 0
    return vol.data, mask


LIVER_TUNE = list(range(1, 30, 3))  # 10 slices


def load_2d(task: str, ids: list[str]):
    from napari_sdunet.io import read_image, read_mask

    root = DATA / task
    return [(read_image(root / "images" / f"{i}.png").data, read_mask(root / "masks" / f"{i}.png") > 0) for i in ids]


def score(model_ref: str, shift: str, eval_data, groups: dict[str, list[int]] | None = None) -> dict:
    """Mean per-image Dice (and for the liver the 3-D Dice over the evaluated slices) at full resolution."""
    import numpy as np

    from napari_sdunet.inference import clear_cache, load_model, predict, to_labels
    from napari_sdunet.metrics import dice, summarize

    loaded = load_model(model_ref, "cpu")
    if shift == "liver":
        vol, mask, keep = eval_data
        pred = to_labels(predict(loaded, vol, "ZYX", batch_size=8)).astype(bool)
        out = summarize([pred[k] for k in keep], [mask[k] for k in keep])
        out["dice_3d"] = dice(pred[keep], mask[keep])
    else:
        preds = [to_labels(predict(loaded, im, "YXC", batch_size=4)).astype(bool) for im, _ in eval_data]
        out = summarize(preds, [m for _, m in eval_data])
        if groups:  # e.g. the polyp sequences
            out["by_group"] = {
                g: round(float(summarize([preds[i] for i in idx], [eval_data[i][1] for i in idx])["dice"]), 4)
                for g, idx in groups.items()}
            # which kind of error: a fine-tuned model that over-segments other videos (false-positive
            # pixels) fails differently from one that forgets their polyps (false-negative pixels)
            out["errors_by_group"] = {
                g: {"fp_px": int(sum((preds[i] & ~eval_data[i][1]).sum() for i in idx)),
                    "fn_px": int(sum((~preds[i] & eval_data[i][1]).sum() for i in idx))}
                for g, idx in groups.items()}
    clear_cache()
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}


def sequence_groups(ids: list[str]) -> dict[str, list[int]]:
    seq = {r["id"]: r["sequence"] for r in csv.DictReader(open(DATA / "polyps" / "split.csv"))}
    out: dict[str, list[int]] = {}
    for i, k in enumerate(ids):
        out.setdefault(f"sequence {seq[k]}", []).append(i)
    return out


def main(argv: list[str] | None = None) -> int:
    from napari_sdunet import finetune as ft
    from napari_sdunet.devices import PRECISIONS

    d = ft.FinetuneConfig()  # the widget's and the CLI's defaults
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shift", choices=["polyps", "nuclei", "liver", "all"], default="all")
    ap.add_argument("--model", default=None, help="base model (default: the best-validating shipped one)")
    ap.add_argument("--sequence", default="1",
                    help="polyps: the test sequence whose first 10 frames fine-tune (1, 4 or 21; default 1)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--time-budget", type=float, default=d.time_budget_s, help="seconds; 0: none")
    ap.add_argument("--patience", type=int, default=d.patience, help="validations; 0: none")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup_steps, help="steps of linear lr warm-up")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction)
    ap.add_argument("--trainable", choices=["all", "decoder"], default="all")
    ap.add_argument("--base-weight", type=float, default=d.base_weight,
                    help="share of the base weights mixed back in after training (WiSE-FT)")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--augment-intensity", type=float, default=d.augment_intensity, help="brightness/contrast jitter")
    ap.add_argument("--augment-gamma", action="store_true", help="also a gamma jitter")
    ap.add_argument("--update-bn", dest="freeze_bn", action="store_false")
    ap.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                    help="fine-tuning precision (auto: bf16 autocast where the CPU's bf16 pays); "
                         "scoring uses predict's auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--work", default="/tmp/napari-sdunet-finetune-shifts", help="scratch folder")
    ap.add_argument("--json-out", default=None, help="append each result as one JSON line to this file")
    ap.add_argument("--tag", default="", help="free text stored with the result (e.g. which setting changed)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from napari_sdunet.zoo import best_shipped_for_task

    torch.set_num_threads(args.threads)
    shifts = ["polyps", "nuclei", "liver"] if args.shift == "all" else [args.shift]
    for shift in shifts:
        task = TASK_OF_SHIFT[shift]
        base = args.model or best_shipped_for_task(task)
        if base is None:
            print(f"{shift}: no shipped {task} model; skipped")
            continue
        if shift == "liver":
            vol, mask = liver_volume()
            keep = [k for k in range(vol.shape[0]) if k not in LIVER_TUNE]
            tune_mask = np.zeros_like(mask, dtype=np.uint8)
            tune_mask[LIVER_TUNE] = mask[LIVER_TUNE]
            data = [ft.LabelledImage(vol, tune_mask, "ZYX", name="totalseg_example_ct_sm")]
            eval_data = (vol, mask, keep)
            groups = None
            what = f"TotalSegmentator CT, slices {LIVER_TUNE} fine-tune, {len(keep)} others evaluated"
        else:
            tune_ids, eval_ids = polyp_shift(args.sequence) if shift == "polyps" else nuclei_shift()
            data = [ft.LabelledImage(im, m.astype(np.uint8), "YXC", name=i)
                    for i, (im, m) in zip(tune_ids, load_2d(task, tune_ids))]
            eval_data = load_2d(task, eval_ids)
            groups = sequence_groups(eval_ids) if shift == "polyps" else None
            what = f"{len(tune_ids)} frames fine-tune ({tune_ids[0][:12]}..), {len(eval_ids)} evaluated"
        print(f"{shift}: {what}; base {base}; torch threads {torch.get_num_threads()}", flush=True)
        out = Path(args.work) / f"{shift}-{int(time.time())}"
        wall0, cpu0 = time.perf_counter(), time.process_time()
        vals = []
        cfg = ft.FinetuneConfig(steps=args.steps or None, time_budget_s=args.time_budget or None,
                                patience=args.patience or None, lr=args.lr, warmup_steps=args.warmup,
                                batch_size=args.batch_size,
                                trainable=args.trainable, augment=args.augment, freeze_bn=args.freeze_bn,
                                base_weight=args.base_weight, augment_intensity=args.augment_intensity,
                                augment_gamma=args.augment_gamma, val_fraction=args.val_fraction,
                                precision=args.precision)
        res = ft.finetune(base, data, out, cfg, device="cpu",
                          on_progress=lambda p, v=vals: p.kind == "val" and v.append((p.step, round(p.val_dice, 4))))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        # the base is scored after fine-tuning (the fine-tuning's wall time is measured in a process that
        # has not segmented yet, as when the widget's first action is Fine-tune)
        before = score(base, shift, eval_data, groups)
        print(f"  before: Dice {before['dice']:.4f} ± {before['dice_sd']:.4f}"
              + (f", 3-D {before['dice_3d']:.4f}" if "dice_3d" in before else "")
              + (f" {before['by_group']}" if "by_group" in before else ""), flush=True)
        after = score(str(out), shift, eval_data, groups)
        print(f"  after:  Dice {after['dice']:.4f} ± {after['dice_sd']:.4f}"
              + (f", 3-D {after['dice_3d']:.4f}" if "dice_3d" in after else "")
              + (f" {after['by_group']}" if "by_group" in after else "")
              + f"  (gain {after['dice'] - before['dice']:+.4f})")
        if "errors_by_group" in after:
            print("  error pixels (false positive / false negative), before -> after: " + "; ".join(
                f"{g}: FP {before['errors_by_group'][g]['fp_px']} -> {e['fp_px']}, "
                f"FN {before['errors_by_group'][g]['fn_px']} -> {e['fn_px']}"
                for g, e in after["errors_by_group"].items()), flush=True)
        print(f"  {res.steps} steps ({res.stopped_by}; kept step {res.best_step}), {res.n_train} train / "
              f"{res.n_val} held-out frames, wall {wall:.0f} s, CPU {cpu:.0f} s; held-out Dice "
              f"{res.dice_before:.4f} -> {res.dice_after:.4f}; validations {vals}", flush=True)
        record = {
            "shift": shift, "what": what, "sequence": args.sequence if shift == "polyps" else None,
            "base": base, "tag": args.tag, "steps_cap": args.steps,
            "time_budget_s": args.time_budget, "patience": args.patience, "lr": args.lr, "warmup": args.warmup,
            "batch_size": args.batch_size, "trainable": args.trainable, "base_weight": args.base_weight,
            "augment": args.augment, "augment_intensity": args.augment_intensity,
            "augment_gamma": args.augment_gamma,
            "freeze_bn": args.freeze_bn, "threads": torch.get_num_threads(), "precision": args.precision,
            "dice_before": before["dice"], "dice_before_sd": before["dice_sd"],
            "dice_after": after["dice"], "dice_after_sd": after["dice_sd"],
            "dice_3d_before": before.get("dice_3d"), "dice_3d_after": after.get("dice_3d"),
            "by_group_before": before.get("by_group"), "by_group_after": after.get("by_group"),
            "errors_by_group_before": before.get("errors_by_group"),
            "errors_by_group_after": after.get("errors_by_group"),
            "gain": after["dice"] - before["dice"], "steps": res.steps, "stopped_by": res.stopped_by,
            "best_step": res.best_step, "wall_s": wall, "cpu_s": cpu, "train_s": res.seconds,
            "val_dice_before": res.dice_before, "val_dice_after": res.dice_after, "validations": vals,
        }
        print(json.dumps(record), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
