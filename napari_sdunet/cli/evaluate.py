"""``napari-sdunet evaluate``: mean per-image Dice and Jaccard of a model on image/mask pairs.

Per-image (and with ``--per-slice`` per-slice) rows are those of :func:`napari_sdunet.metrics.metric_rows`,
the same the Compare widget shows, so a table from the viewer and one from the command line agree.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import add_model_options, check_model_options, note_tta, predict_volume, report_failures, run_batch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model on a folder of images and reference masks",
        description="Pairs files of --images and --masks by file stem (PNG, JPEG, TIFF at any resolution, "
                    "or NIfTI volumes: one 3-D Dice per volume), segments each image and prints per-image "
                    "Dice/Jaccard and their means (--per-slice: each slice of a volume too; --csv: as a table). "
                    "Mask: any non-zero value is foreground (negative values too). A pair that cannot be "
                    "read is reported and skipped; the exit status is then 1.")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images or volumes")
    p.add_argument("--masks", required=True, metavar="DIR", help="folder of reference masks, same stems")
    add_model_options(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (dice, jaccard, n, ...) as the last line")
    p.add_argument("--per-slice", action="store_true",
                   help="also score each slice of a volume (first axis; NIfTI: axial slice k as stored) that "
                        "has foreground in the mask or the prediction: printed under its volume, in the JSON "
                        "as 'per_slice' and in the --csv table")
    p.add_argument("--csv", metavar="FILE", default=None,
                   help="write a table: one row per image (its overall scores and TP/FP/FN pixel counts), "
                        "preceded by its slices' rows with --per-slice; four fixed decimals, like the Compare "
                        "widget's table")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-image (or per-slice) lines")
    p.set_defaults(func=run)


def pairs(images_dir: str, masks_dir: str) -> tuple[list[tuple], list[str]]:
    """(image, mask) paths matched by stem, and the image stems without a mask."""
    from ..io import list_images, stem

    masks = {}
    for m in list_images(masks_dir):
        masks.setdefault(stem(m), m)
    out, missing = [], []
    for im in list_images(images_dir):
        s = stem(im)
        if s in masks:
            out.append((im, masks[s]))
        else:
            missing.append(s)
    return out, missing


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` (``image``, ``mask`` and a :func:`~napari_sdunet.metrics.score_row`) as CSV, atomically."""
    import csv

    from ..io import atomic_path
    from ..metrics import ROW_COLUMNS, SCORE_NAMES

    path = Path(path).expanduser()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "row", *ROW_COLUMNS])
        for r in rows:
            w.writerow([r["image"], r["mask"], r["row"],
                        *[f"{r[c]:.4f}" if c in SCORE_NAMES else r[c] for c in ROW_COLUMNS]])
    return path


def _line(name: str, row: dict[str, Any]) -> str:
    return f"{name}: dice {row['dice']:.4f} jaccard {row['jaccard']:.4f}"


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tqdm import tqdm

    from ..errors import InputError, OutputError
    from ..inference import load_model, to_labels
    from ..io import read_image, read_mask
    from ..metrics import metric_rows, summarize

    check_model_options(args)
    if args.csv and Path(args.csv).expanduser().is_dir():
        raise OutputError(f"--csv {args.csv} is a folder; give a file name such as {Path(args.csv) / 'scores.csv'}")
    matched, missing = pairs(args.images, args.masks)
    if not matched:
        raise InputError(f"no image in {args.images} has a mask with the same file stem in {args.masks}")
    if missing:
        print(f"warning: {len(missing)} image(s) have no mask and are skipped: {', '.join(missing[:5])}"
              f"{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    loaded = load_model(args.model, args.device)
    note_tta(loaded, args)
    print(f"model {loaded.name} ({loaded.config.get('arch')}, task {loaded.config.get('task')}) "
          f"on {loaded.device}; {len(matched)} image/mask pairs")
    preds, refs = [], []
    table: list[dict[str, Any]] = []  # per image (and slice) rows, for --csv and the JSON
    per_slice = bool(getattr(args, "per_slice", False))

    def work(pair: tuple) -> None:
        im_path, mask_path = pair
        vol = read_image(im_path)
        ref = read_mask(mask_path, like=vol)
        pred = to_labels(predict_volume(loaded, vol, args, im_path.name), args.threshold).astype(bool)
        if pred.shape != ref.shape:
            raise InputError(f"{mask_path.name}: mask shape {ref.shape} differs from the image's "
                             f"{pred.shape} ({im_path.name})")
        rows, n_empty = metric_rows(pred, ref, per_slice=per_slice)
        if not args.quiet:
            tqdm.write(_line(im_path.name, rows[-1]))
            for r in rows[:-1]:
                tqdm.write(f"  {_line(r['row'], r)} (TP {r['TP']} FP {r['FP']} FN {r['FN']})")
            if n_empty:
                tqdm.write(f"  ({n_empty} slice(s) empty in both not listed)")
        preds.append(pred)
        refs.append(ref)
        table.extend({"image": im_path.name, "mask": mask_path.name, **r} for r in rows)

    failed = run_batch(tqdm(matched, desc="evaluate", unit="image"), work, lambda p: p[0].name,
                       lambda m: tqdm.write(m, file=sys.stderr))
    if not preds:
        raise InputError(f"none of the {len(matched)} image/mask pairs could be scored "
                         f"(first problem: {failed[0][1]})")
    if not any(r.any() for r in refs):
        print(f"warning: every reference mask is empty (no non-zero pixel in {args.masks}); Dice only "
              "says whether the model also found nothing. Are these the right masks?", file=sys.stderr)
    summary = summarize(preds, refs)
    print(f"n={summary['n']}  mean Dice {summary['dice']:.4f} ± {summary['dice_sd']:.4f}  "
          f"mean Jaccard {summary['jaccard']:.4f} ± {summary['jaccard_sd']:.4f}  "
          f"(global Dice {summary['global_dice']:.4f})")
    if args.csv:
        print(f"table of {len(table)} row(s) written to {write_csv(args.csv, table)}")
    rc = report_failures(failed, len(matched), "image/mask pair(s)")
    if args.json:
        summary.update(model=str(loaded.folder), threshold=args.threshold, failed=len(failed),
                       empty_references=sum(not r.any() for r in refs))
        if per_slice:
            summary["per_slice"] = [r for r in table if r["row"] != "overall"]
        print(json.dumps(summary))
    return rc
