"""``napari-sdunet evaluate``: mean per-image Dice and Jaccard of a model on image/mask pairs."""

from __future__ import annotations

import argparse

from ._common import add_model_options, check_model_options, predict_volume, report_failures, run_batch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model on a folder of images and reference masks",
        description="Pairs files of --images and --masks by file stem (PNG, JPEG, TIFF at any resolution, "
                    "or NIfTI volumes: one 3-D Dice per volume), segments each image and prints per-image "
                    "Dice/Jaccard and their means. Mask: any non-zero value is foreground (negative values "
                    "too). A pair that cannot be read is reported and skipped; the exit status is then 1.")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images or volumes")
    p.add_argument("--masks", required=True, metavar="DIR", help="folder of reference masks, same stems")
    add_model_options(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (dice, jaccard, n, ...) as the last line")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-image lines")
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


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tqdm import tqdm

    from ..errors import InputError
    from ..inference import load_model, to_labels
    from ..io import read_image, read_mask
    from ..metrics import confusion, scores, summarize

    check_model_options(args)
    matched, missing = pairs(args.images, args.masks)
    if not matched:
        raise InputError(f"no image in {args.images} has a mask with the same file stem in {args.masks}")
    if missing:
        print(f"warning: {len(missing)} image(s) have no mask and are skipped: {', '.join(missing[:5])}"
              f"{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    loaded = load_model(args.model, args.device)
    print(f"model {loaded.name} ({loaded.config.get('arch')}, task {loaded.config.get('task')}) "
          f"on {loaded.device}; {len(matched)} image/mask pairs")
    preds, refs = [], []

    def work(pair: tuple) -> None:
        im_path, mask_path = pair
        vol = read_image(im_path)
        ref = read_mask(mask_path, like=vol)
        pred = to_labels(predict_volume(loaded, vol, args, im_path.name), args.threshold).astype(bool)
        if pred.shape != ref.shape:
            raise InputError(f"{mask_path.name}: mask shape {ref.shape} differs from the image's "
                             f"{pred.shape} ({im_path.name})")
        if not args.quiet:
            s = scores(*confusion(pred, ref)[:3])
            tqdm.write(f"{im_path.name}: dice {s['dice']:.4f} jaccard {s['jaccard']:.4f}")
        preds.append(pred)
        refs.append(ref)

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
    rc = report_failures(failed, len(matched), "image/mask pair(s)")
    if args.json:
        summary.update(model=str(loaded.folder), threshold=args.threshold, failed=len(failed),
                       empty_references=sum(not r.any() for r in refs))
        print(json.dumps(summary))
    return rc
