"""Measure what fine-tuning buys: fine-tune a model on a few frames of one test sequence / image type,
score it on the rest of that sequence / type, before and after, with the CPU time it took.

    .venv/bin/python benchmarks/finetune_measure.py --task polyps --sequence 1 --n-finetune 10
    .venv/bin/python benchmarks/finetune_measure.py --task nuclei --nuclei-type colour-320x256 --n-finetune 5

The base model is the shipped ``<arch>-<task>`` (``--model`` to choose another, or a checkpoint
folder). Without shipped weights, ``--train-base STEPS`` first trains a base model briefly on the
task's training split (never on the test frames) and says so in the output. Scores are mean
per-image Dice at the images' full resolution, threshold 0.5, exactly as ``napari-sdunet evaluate``
computes them; the script also prints the equivalent CLI commands. Data: ../shared/data (links only,
nothing is copied).
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
NUCLEI_TYPES = {  # name -> (width, height, grayscale_rgb)
    "grey-256x256": ("256", "256", "1"),
    "colour-320x256": ("320", "256", "0"),
    "grey-696x520": ("696", "520", "1"),
    "grey-360x360": ("360", "360", "1"),
}


def polyp_frames(sequence: int, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` frames of a CVC-ClinicDB sequence (fine-tune) and the rest of it (evaluate)."""
    rows = list(csv.DictReader(open(DATA / "polyps" / "split.csv")))
    ids = sorted((r["id"] for r in rows if r["sequence"] == str(sequence)), key=int)
    if not ids:
        raise SystemExit(f"no sequence {sequence} in polyps/split.csv")
    if {r["split"] for r in rows if r["sequence"] == str(sequence)} != {"test"}:
        print(f"warning: sequence {sequence} is not a test sequence (test: 1, 4, 21)", file=sys.stderr)
    return ids[:n], ids[n:]


def nuclei_frames(kind: str, n: int, split: str = "test") -> tuple[list[str], list[str]]:
    """The first ``n`` (sorted ids) test images of one nuclei image type, and the other test images of it."""
    root = DATA / "nuclei"
    splits = {r["id"]: r["split"] for r in csv.DictReader(open(root / "split.csv"))}
    w, h, grey = NUCLEI_TYPES[kind]
    ids = sorted(r["id"] for r in csv.DictReader(open(root / "metadata.csv"))
                 if (r["width"], r["height"], r["grayscale_rgb"]) == (w, h, grey) and splits[r["id"]] == split)
    return ids[:n], ids[n:]


def link_pairs(root: Path, ids: list[str], dest: Path) -> tuple[Path, Path]:
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in ids:
        for sub, folder in (("images", images), ("masks", masks)):
            link = folder / f"{i}.png"
            if not link.exists():
                link.symlink_to(root / sub / f"{i}.png")
    return images, masks


def evaluate(model_ref: str, images: Path, masks: Path) -> dict:
    """Mean per-image Dice at full resolution (same computation as ``napari-sdunet evaluate``)."""
    from napari_sdunet.axes import propose_axes
    from napari_sdunet.inference import clear_cache, load_model, predict, to_labels
    from napari_sdunet.io import list_images, read_image, read_mask
    from napari_sdunet.metrics import summarize

    loaded = load_model(model_ref, "cpu")
    preds, refs = [], []
    for path in list_images(images):
        vol = read_image(path)
        prob = predict(loaded, vol.data, vol.axes or propose_axes(vol.data.shape), batch_size=4)
        preds.append(to_labels(prob).astype(bool))
        refs.append(read_mask(masks / path.name))
    clear_cache()
    return summarize(preds, refs)


def train_base(task: str, arch: str, out: Path, steps: int, lr: float, batch_size: int) -> Path:
    """A briefly trained base model (training split only) for when no shipped weights exist."""
    import torch

    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.finetune import LabelledImage, augment_config, frames_dataset, labelled_frames
    from napari_sdunet.io import read_image, read_mask
    from napari_sdunet.models import create_model
    from napari_sdunet.tasks import TASKS
    from napari_sdunet.train_loop import FitConfig, fit

    root = DATA / task
    rows = list(csv.DictReader(open(root / "split.csv")))
    prep = TASKS[task].preprocessing.to_dict()
    frames = {"train": [], "val": []}
    for r in rows:
        if r["split"] in frames:
            vol = read_image(root / "images" / f"{r['id']}.png")
            item = LabelledImage(vol.data, read_mask(root / "masks" / f"{r['id']}.png"), vol.axes, name=r["id"])
            frames[r["split"]].extend(labelled_frames(item))
    train, val = frames_dataset(frames["train"], prep), frames_dataset(frames["val"][:40], prep)
    torch.manual_seed(0)
    model = create_model(arch, task=task)
    batches = train.batches(batch_size, augment=augment_config(True, 0.1, False))
    res = fit(model, batches, val, FitConfig(max_steps=steps, epochs=10**6, lr=lr, batch_size=batch_size,
                                                      val_every=max(1, steps // 5), patience=None), device="cpu",
              on_progress=lambda p: p.kind == "val" and print(f"  base step {p.step}: val Dice {p.val_dice:.4f}",
                                                              flush=True))
    return save_checkpoint(model, out, task=task, preprocessing=prep, extra={"base_training": {
        "note": "briefly trained by benchmarks/finetune_measure.py for lack of shipped weights",
        "steps": res.steps, "lr": lr, "batch_size": batch_size, "best_val_dice": res.best_val_dice,
        "seconds": res.seconds, "data": f"{task} training split ({len(train)} frames)"}})


def main(argv: list[str] | None = None) -> int:
    from napari_sdunet.finetune import FinetuneConfig

    d = FinetuneConfig()

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["polyps", "nuclei"], required=True)
    ap.add_argument("--arch", default="sdunet", help="architecture of the shipped model (default sdunet)")
    ap.add_argument("--model", default=None, help="base model name or folder (default: shipped <arch>-<task>)")
    ap.add_argument("--sequence", type=int, default=1, help="polyps: CVC-ClinicDB test sequence (1, 4 or 21)")
    ap.add_argument("--nuclei-type", choices=sorted(NUCLEI_TYPES), default="colour-320x256")
    ap.add_argument("--n-finetune", type=int, default=10, help="frames/images to fine-tune on")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction)
    ap.add_argument("--val-split", choices=["end", "random"], default="end")
    ap.add_argument("--trainable", choices=["all", "decoder"], default="all")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--update-bn", dest="freeze_bn", action="store_false",
                    help="let BatchNorm statistics follow the fine-tuning frames (default: keep the base's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--train-base", type=int, default=0, metavar="STEPS",
                    help="no shipped model: train a base this many steps on the training split first")
    ap.add_argument("--work", default="/tmp/napari-sdunet-finetune-measure", help="scratch folder")
    ap.add_argument("--json-out", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)

    import torch

    from napari_sdunet.finetune import finetune
    from napari_sdunet.zoo import list_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) / f"{args.task}-{int(time.time())}"
    work.mkdir(parents=True)
    if args.task == "polyps":
        tune_ids, eval_ids = polyp_frames(args.sequence, args.n_finetune)
        what = f"CVC-ClinicDB test sequence {args.sequence}"
    else:
        tune_ids, eval_ids = nuclei_frames(args.nuclei_type, args.n_finetune)
        what = f"DSB2018 test images of type {args.nuclei_type}"
    if not eval_ids:
        raise SystemExit("nothing left to evaluate on; lower --n-finetune")
    root = DATA / args.task
    tune_img, tune_mask = link_pairs(root, tune_ids, work / "finetune")
    eval_img, eval_mask = link_pairs(root, eval_ids, work / "evaluate")

    base = args.model or f"{args.arch}-{args.task}"
    base_note = "shipped" if base in list_pretrained() else "given"
    if args.model is None and base not in list_pretrained():
        if not args.train_base:
            raise SystemExit(f"no shipped {base} (have: {list_pretrained() or 'none'}); pass --model or --train-base")
        print(f"no shipped {base}: training a base model for {args.train_base} steps on the training split")
        t0 = time.perf_counter()
        base = str(train_base(args.task, args.arch, work / f"{base}-base", args.train_base,
                              1e-3 if args.task == "nuclei" else 3e-4, 8))
        base_note = f"briefly trained here ({args.train_base} steps, {time.perf_counter() - t0:.0f} s)"

    print(f"{what}: fine-tune on {len(tune_ids)} ({tune_ids[0]}..{tune_ids[-1]}), evaluate on {len(eval_ids)}; "
          f"base {base} ({base_note}); torch threads {torch.get_num_threads()}", flush=True)
    out = work / "finetuned"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    res = finetune(base, (tune_img, tune_mask), out, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                   trainable=args.trainable, augment=args.augment, freeze_bn=args.freeze_bn,
                   val_fraction=args.val_fraction, val_split=args.val_split, device="cpu",
                   on_progress=lambda p: p.kind == "status" and print(f"  {p.message}", flush=True))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    # the base is scored after fine-tuning, as in finetune_shifts.py
    before = evaluate(base, eval_img, eval_mask)
    print(f"before: Dice {before['dice']:.4f} ± {before['dice_sd']:.4f} on {before['n']} held-out frames", flush=True)
    after = evaluate(str(out), eval_img, eval_mask)
    print(f"after:  Dice {after['dice']:.4f} ± {after['dice_sd']:.4f}")
    print(f"fine-tuning: {res.steps} steps, {res.n_train} train / {res.n_val} val frames, "
          f"wall {wall:.0f} s, CPU time {cpu:.0f} s (all threads); its own val Dice "
          f"{res.dice_before:.4f} -> {res.dice_after:.4f}")
    print("\nthe same with the CLI:")
    print(f"  napari-sdunet evaluate --model {base} --images {eval_img} --masks {eval_mask} --device cpu -q")
    print(f"  napari-sdunet finetune --model {base} --images {tune_img} --masks {tune_mask} --output {out} "
          f"--steps {args.steps} --lr {args.lr:g} --batch-size {args.batch_size} --device cpu"
          + ("" if args.freeze_bn else " --update-bn") + ("" if args.augment else " --no-augment")
          + ("" if args.trainable == "all" else f" --trainable {args.trainable}")
          + ("" if args.val_fraction == d.val_fraction else f" --val-fraction {args.val_fraction:g}")
          + ("" if args.val_split == "end" else f" --val-split {args.val_split}"))
    print(f"  napari-sdunet evaluate --model {out} --images {eval_img} --masks {eval_mask} --device cpu -q")
    record = {
        "task": args.task, "what": what, "base": base, "base_note": base_note, "n_finetune": len(tune_ids),
        "n_eval": len(eval_ids), "finetune_ids": tune_ids, "steps": res.steps, "lr": args.lr,
        "batch_size": args.batch_size, "val_fraction": args.val_fraction, "val_split": args.val_split,
        "trainable": args.trainable,
        "augment": args.augment, "freeze_bn": args.freeze_bn, "threads": torch.get_num_threads(),
        "dice_before": before["dice"], "dice_before_sd": before["dice_sd"],
        "dice_after": after["dice"], "dice_after_sd": after["dice_sd"],
        "wall_s": wall, "cpu_s": cpu, "val_dice_before": res.dice_before, "val_dice_after": res.dice_after,
        "output": str(out),
    }
    print(json.dumps(record))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
