"""CPU time of Segment (``napari_sdunet.inference.predict``) with the shipped SD models on large inputs.

    .venv/bin/python benchmarks/bench_inference.py --threads 2
    .venv/bin/python benchmarks/bench_inference.py --models sdunet-nuclei --image 256 --volume 128 128 10

Inputs are synthetic and of the size a user brings: a 1024x1024 RGB microscopy image (uint8) for
the nuclei and polyp models, a 512x512x100 CT volume in HU (int16, axes ZYX) for the liver model.
What is timed is exactly what the Segment widget runs: ``predict(load_model(name), data, axes)``,
one warm-up call on a small input first (so the timing excludes building the C++ sweep kernels
and loading the weights). The mode printed is the model's preprocessing mode at the time of the
run: ``tiles`` (native resolution, overlapping tiles) or ``resize`` (each frame resized to the
training input size and the probabilities resized back).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_sdunet.devices import PRECISIONS, pick_precision  # noqa: E402
from napari_sdunet.inference import effective_preprocessing, load_model, predict  # noqa: E402

#: model -> kind of input it gets
MODELS = {"sdunet-nuclei": "image", "sdnunet-nuclei": "image", "sdunet-polyps": "image", "sdnunet-polyps": "image",
          "sdunet-liver": "volume", "sdnunet-liver": "volume"}


def synthetic(kind: str, image: int, volume: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, str]:
    """A blobby RGB image (uint8, YXC) or a CT-like HU volume (int16, ZYX)."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        yy, xx = np.mgrid[:image, :image]
        blobs = (np.sin(yy / 9.0) * np.cos(xx / 11.0) > 0.6).astype(np.float32)
        img = 30 + 180 * blobs[..., None] * np.array([0.9, 0.6, 0.8]) + rng.normal(0, 10, (image, image, 3))
        return np.clip(img, 0, 255).astype(np.uint8), "YXC"
    h, w, d = volume
    zz, yy, xx = np.mgrid[:d, :h, :w]
    organ = ((yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 3) ** 2 + (zz - d / 2) ** 2 / (d / 2) ** 2) < 1
    hu = np.where(organ, 60, -900) + rng.normal(0, 20, (d, h, w))
    return hu.astype(np.int16), "ZYX"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--image", type=int, default=1024, help="side of the square RGB image")
    ap.add_argument("--volume", type=int, nargs=3, default=[512, 512, 100], metavar=("H", "W", "D"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1, help="timed calls (best is kept)")
    ap.add_argument("--tiles", action="store_true",
                    help="force native-resolution tiled inference (preprocessing mode 'tiles', tiles of the "
                         "training input size) for the image models, whatever their config says")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=PRECISIONS,
                    help="Segment's precision setting(s), timed side by side (auto: bf16 autocast where it pays)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), best of {a.repeats}")
    print()
    # speed relative to the first precision listed (2.00x: twice as fast as it)
    print(f"| model | input | mode | precision | seconds | per frame (s) | speed vs {a.precisions[0]} |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in a.models:
        try:
            loaded = load_model(name, device="cpu")
        except Exception as err:  # a model not shipped in this checkout
            print(f"| {name} | not available: {err} | | | | | |")
            continue
        kind = MODELS[name]
        if a.tiles and kind == "image":  # a modified copy: the cached model keeps its own config
            loaded = dataclasses.replace(loaded, config=dict(
                loaded.config, preprocessing=dict(loaded.preprocessing, mode="tiles")))
        data, axes = synthetic(kind, a.image, tuple(a.volume))
        small, _ = synthetic(kind, 64, (64, 64, 2))
        prep = effective_preprocessing(loaded.config)
        mode = prep.get("mode") or "resize"
        if mode == "resize" and prep.get("input_size"):
            mode += f" to {prep['input_size'][0]}x{prep['input_size'][1]}"
        frames = data.shape[0] if kind == "volume" else 1
        shape = "x".join(str(s) for s in data.shape)
        first = None
        for precision in a.precisions:
            predict(loaded, small, axes, precision=precision)  # warm-up: C++ kernels built, weights loaded
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                prob = predict(loaded, data, axes, precision=precision)
                best = min(best, time.perf_counter() - t0)
            assert prob.shape == data.shape[:3 if kind == "volume" else 2]
            first = first or best
            dt = pick_precision(precision, loaded.device)
            label = f"{precision} ({'bf16' if dt is not None else 'fp32'})" if precision == "auto" else precision
            print(f"| {name} | {shape} {data.dtype} ({axes}) | {mode} | {label} | {best:.2f} | {best / frames:.3f} "
                  f"| {first / best:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
