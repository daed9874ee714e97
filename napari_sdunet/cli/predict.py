"""``napari-sdunet predict``: write masks for images, stacks and NIfTI volumes.

Existing files are never replaced unless ``--overwrite`` is given (``predict -o DATA/masks
DATA/images`` must not destroy reference masks), and an input is never overwritten by its own mask.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    add_model_options,
    check_model_options,
    expand_inputs,
    note_tta,
    predict_volume,
    report_failures,
    run_batch,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="segment images or volumes and write their masks",
        description="Segment each INPUT (PNG/JPEG/TIFF image or stack, NIfTI volume, or a folder of them) "
                    "and write its mask to DIR under the same stem: PNG (0/255) for 2-D images, TIFF for "
                    "stacks, .nii.gz with the source affine and header for NIfTI. Files already in DIR are "
                    "kept (and listed) unless --overwrite is given. A file that cannot be read is reported "
                    "and skipped; the exit status is then 1.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image/volume files or folders")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the masks")
    add_model_options(p)
    p.add_argument("--format", choices=["png", "tif"], default=None,
                   help="file type for 2-D masks (default png; stacks are always tif)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write float32 probabilities as <stem>_prob.tif / .nii.gz")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files that already exist in DIR (default: keep them and say so)")
    p.set_defaults(func=run)


def output_paths(path: Path, out_dir: Path, spatial_ndim: int, args: argparse.Namespace) -> list[Path]:
    """The mask file (first) and, with --probabilities, the probability file of one input."""
    from ..io import is_nifti, stem

    s = stem(path)
    if is_nifti(path):
        names = [f"{s}.nii.gz", f"{s}_prob.nii.gz"]
    else:
        names = [f"{s}.{'tif' if spatial_ndim > 2 else (args.format or 'png')}", f"{s}_prob.tif"]
    return [out_dir / n for n in names[: 2 if args.probabilities else 1]]


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from ..axes import propose_axes
    from ..errors import OutputError
    from ..inference import load_model, to_labels
    from ..io import is_nifti, read_image, write_image, write_mask_like, write_nifti

    check_model_options(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--output {out_dir} is a file; give a folder for the masks")
    inputs = expand_inputs(args.inputs)
    inputs_resolved = {p.resolve() for p in inputs}
    loaded = load_model(args.model, args.device)
    note_tta(loaded, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"model {loaded.name} ({loaded.config.get('arch')}, task {loaded.config.get('task')}) "
          f"on {loaded.device}")
    written: dict[Path, str] = {}
    kept: list[str] = []
    n_masks = 0

    def work(path: Path) -> None:
        nonlocal n_masks
        vol = read_image(path)
        axes = (args.axes or vol.axes or propose_axes(vol.data.shape)).upper()
        targets = output_paths(path, out_dir, len(axes.replace("C", "")), args)
        for t in targets:  # decided before any computation
            if t.resolve() in inputs_resolved:
                raise OutputError(f"{t} would overwrite an input; choose another --output folder")
            if t in written:
                raise OutputError(f"{t.name} was already written for {written[t]} (same file stem); "
                                  "rename one of the inputs")
        existing = [t for t in targets if t.exists()]
        if existing and not args.overwrite:
            kept.extend(t.name for t in existing)
            tqdm.write(f"{path.name}: kept the existing {', '.join(t.name for t in existing)} "
                       "(pass --overwrite to replace)", file=sys.stderr)
            return
        prob = predict_volume(loaded, vol, args, path.name)
        mask = to_labels(prob, args.threshold)
        write_mask_like(targets[0], mask, vol)
        written[targets[0]] = path.name
        if args.probabilities:
            if is_nifti(path):
                write_nifti(targets[1], prob, affine=vol.affine, header=vol.header)
            else:
                write_image(targets[1], prob)
            written[targets[1]] = path.name
        n_masks += 1
        tqdm.write(f"{path.name} -> {targets[0].name}  foreground {100.0 * mask.mean():.2f} %")

    failed = run_batch(tqdm(inputs, desc="predict", unit="image"), work, lambda p: p.name,
                       lambda m: tqdm.write(m, file=sys.stderr))
    print(f"wrote {n_masks} mask(s) to {out_dir}")
    if kept:
        print(f"kept {len(kept)} existing file(s) in {out_dir}, not overwritten (pass --overwrite to replace "
              f"them): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}", file=sys.stderr)
    return report_failures(failed, len(inputs), "input(s)")
