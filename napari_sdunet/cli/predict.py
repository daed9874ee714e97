"""``napari-sdunet predict``: write masks for images, stacks and NIfTI volumes."""

from __future__ import annotations

import argparse

from ._common import add_model_options, expand_inputs, predict_volume


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="segment images or volumes and write their masks",
        description="Segment each INPUT (PNG/JPEG/TIFF image or stack, NIfTI volume, or a folder of them) "
                    "and write its mask to DIR under the same stem: PNG (0/255) for 2-D images, TIFF for "
                    "stacks, .nii.gz with the source affine and header for NIfTI.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image/volume files or folders")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the masks")
    add_model_options(p)
    p.add_argument("--format", choices=["png", "tif"], default=None,
                   help="file type for 2-D masks (default png; stacks are always tif)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write float32 probabilities as <stem>_prob.tif / .nii.gz")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ..inference import load_model, to_labels
    from ..io import is_nifti, read_image, stem, write_image, write_mask_like, write_nifti

    inputs = expand_inputs(args.inputs)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, args.device)
    print(f"model {loaded.name} ({loaded.config.get('arch')}, task {loaded.config.get('task')}) "
          f"on {loaded.device}")
    written = 0
    for path in tqdm(inputs, desc="predict", unit="image"):
        vol = read_image(path)
        prob = predict_volume(loaded, vol, args, path.name)
        mask = to_labels(prob, args.threshold)
        if is_nifti(path):
            target = out_dir / f"{stem(path)}.nii.gz"
        else:
            ext = "tif" if mask.ndim > 2 else (args.format or "png")
            target = out_dir / f"{stem(path)}.{ext}"
        if target.resolve() == path.resolve():
            raise ValueError(f"{target} would overwrite its input; choose another --output folder")
        write_mask_like(target, mask, vol)
        if args.probabilities:
            if is_nifti(path):
                write_nifti(out_dir / f"{stem(path)}_prob.nii.gz", prob, affine=vol.affine, header=vol.header)
            else:
                write_image(out_dir / f"{stem(path)}_prob.tif", prob)
        tqdm.write(f"{path.name} -> {target.name}  foreground {100.0 * mask.mean():.2f} %")
        written += 1
    print(f"wrote {written} mask(s) to {out_dir}")
    return 0
