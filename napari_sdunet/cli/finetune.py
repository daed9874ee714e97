"""``napari-sdunet finetune``: fine-tune a model on image/mask pairs and save it as a new model folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..devices import PRECISIONS
    from ..finetune import FinetuneConfig

    d = FinetuneConfig()  # the one set of defaults (the widget and the benchmarks read it too)
    p = sub.add_parser(
        "finetune", help="fine-tune a model on corrected masks and save it as a new model",
        description="Pairs files of --images and --masks by file stem (PNG, JPEG, TIFF at any resolution, "
                    "stacks or NIfTI volumes: their slices with a non-empty mask are used), holds out a "
                    "fraction of the frames for validation (or uses --val-images/--val-masks), fine-tunes "
                    "--model and writes a new model folder to --output that works as --model in predict "
                    "and evaluate. Prints the validation Dice before and after.")
    p.add_argument("--model", required=True, metavar="NAME_OR_FOLDER",
                   help="the base model: a shipped or user model name, or a checkpoint folder")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images or volumes")
    p.add_argument("--masks", required=True, metavar="DIR", help="folder of corrected masks, same stems")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the new model")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimiser steps (default {d.steps})")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training frames (caps --steps)")
    p.add_argument("--time-budget", type=float, default=d.time_budget_s, metavar="SECONDS",
                   help=f"seconds for the whole run, reading to saving (default {d.time_budget_s:g}; 0: none)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after this many validations without a better held-out Dice "
                        f"(default {d.patience}; 0: never)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"frames per step (default {d.batch_size})")
    p.add_argument("--trainable", choices=["all", "decoder"], default="all",
                   help="train all weights (default) or only the decoder")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random flips, rotations and intensity jitter")
    p.add_argument("--update-bn", dest="freeze_bn", action="store_false",
                   help="let BatchNorm statistics follow the new frames (default: keep the base model's, "
                        "which is better for a few frames)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"fraction of frames held out for validation (default {d.val_fraction}; 0: none)")
    p.add_argument("--val-split", choices=["end", "random"], default="end",
                   help="which frames --val-fraction holds out: the last ones in file-name order (default; "
                        "for video frames these are not near-copies of the training frames) or random ones")
    p.add_argument("--val-images", metavar="DIR", default=None, help="validation images (instead of a fraction)")
    p.add_argument("--val-masks", metavar="DIR", default=None, help="validation masks for --val-images")
    p.add_argument("--axes", default=None, help="axes of every input (YX, YXC, ZYX, TYX, TYXC); default: from the file")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto (default): bf16 autocast on CPUs with fast bf16 (AMX, AVX512-BF16), else fp32")
    p.add_argument("--seed", type=int, default=0, help="random seed (validation split, order, augmentation)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from tqdm import tqdm

    from ..finetune import FinetuneConfig, finetune, pairs_from_folders

    if (args.val_images is None) != (args.val_masks is None):
        raise ValueError("give both --val-images and --val-masks, or neither")
    data = pairs_from_folders(args.images, args.masks, args.axes)
    val = pairs_from_folders(args.val_images, args.val_masks, args.axes) if args.val_images else None
    bar = None
    last_val = math.nan

    def progress(p) -> None:
        nonlocal bar, last_val
        if p.kind == "status":
            tqdm.write(p.message)
            return
        if p.kind == "val":
            last_val = p.val_dice
            if p.step == 0:
                tqdm.write(f"Dice before fine-tuning: {p.val_dice:.4f}")
        if bar is None:  # the step cap; a time budget or early stop may end the run sooner
            bar = tqdm(total=p.total_steps, desc="finetune (at most)", unit="step")
        if p.kind == "step":
            bar.update(p.step - bar.n)
            bar.set_postfix(loss=f"{p.loss:.4f}", val_dice=f"{last_val:.4f}")

    try:
        cfg = FinetuneConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, time_budget_s=args.time_budget or None,
                             patience=args.patience or None, batch_size=args.batch_size, trainable=args.trainable,
                             augment=args.augment, freeze_bn=args.freeze_bn, val_fraction=args.val_fraction,
                             val_split=args.val_split, seed=args.seed, precision=args.precision)
        res = finetune(args.model, data, args.output, cfg, val_data=val, device=args.device,
                       overwrite=args.overwrite, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    stopped = getattr(res, "stopped_by", None)
    print(f"{res.n_train} training / {res.n_val} validation frames, {res.steps} steps in {res.seconds:.1f} s"
          + (f" (stopped by: {stopped})" if stopped else ""))
    print(f"Dice on the {res.dice_on} frames: before {res.dice_before:.4f}, after {res.dice_after:.4f}")
    print(f"saved the fine-tuned model to {res.path}")
    if args.json:
        print(json.dumps({"path": str(res.path), "dice_before": res.dice_before, "dice_after": res.dice_after,
                          "dice_on": res.dice_on, "n_train": res.n_train, "n_val": res.n_val,
                          "steps": res.steps, "seconds": res.seconds, "total_seconds": res.total_seconds}))
    return 0
