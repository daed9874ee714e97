"""Tiled native-resolution inference: seams blend away, any image size works, the engine uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sdunet.tiling import blend_window, predict_tiled, tile_starts


def test_tiles_cover_the_image_with_the_overlap():
    for length, tile, overlap in ((100, 32, 8), (32, 32, 8), (20, 32, 8), (257, 64, 16)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) >= length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_a_pointwise_model_is_reproduced_exactly():
    """A per-pixel function gives the same output tiled or not: blending weights sum out."""
    x = torch.rand(3, 150, 203)

    def fn(b):
        return torch.sigmoid(b.sum(1, keepdim=True) * 2 - 3)

    full = fn(x[None])[0, 0]
    tiled = predict_tiled(fn, x, (64, 64), overlap=16, multiple=8)
    assert tiled.shape == (150, 203)
    assert torch.allclose(tiled, full, atol=1e-6)


def test_blend_window_is_positive_and_one_inside():
    w = blend_window((32, 40), 8)
    assert float(w.min()) > 0 and float(w[16, 20]) == 1.0


def test_a_unet_runs_tiled_on_odd_sizes():
    from napari_sdunet.models import create_model

    model = create_model("unet", "nuclei", base_filters=4).eval()
    x = torch.rand(3, 77, 130)
    with torch.no_grad():
        p = predict_tiled(lambda b: torch.sigmoid(model(b)), x, (64, 64), overlap=16, multiple=8)
    assert p.shape == (77, 130) and torch.isfinite(p).all()


def test_inference_runs_a_tiles_model_at_native_size(tmp_path):
    """A model whose config says mode=tiles sees the image at its own size (no resize to input_size)."""
    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.inference import load_model, predict
    from napari_sdunet.models import create_model

    model = create_model("unet", "nuclei", base_filters=4).eval()
    prep = {"input_size": [32, 32], "channels": 3, "modality": "microscopy", "ct_window": None,
            "mode": "tiles", "tile_size": [64, 64], "tile_overlap": 16}
    folder = save_checkpoint(model, tmp_path / "m", task="nuclei", preprocessing=prep)
    loaded = load_model(folder, "cpu")
    img = (np.random.default_rng(0).random((150, 180, 3)) * 255).astype(np.uint8)
    seen = []
    prob = predict(loaded, img, "YXC", precision="fp32", on_progress=lambda p: seen.append((p.step, p.total_steps)))
    assert prob.shape == (150, 180) and seen[-1] == (1, 1)
    x = torch.from_numpy(np.moveaxis(img, -1, 0).astype(np.float32) / 255)
    with torch.no_grad():
        ref = predict_tiled(lambda b: torch.sigmoid(model(b)), x, (64, 64), overlap=16, multiple=8)
    assert np.allclose(prob, ref.numpy(), atol=1e-5)
    half = predict(loaded, img, "YXC", scale=0.5)  # objects shown at half their size
    assert half.shape == (150, 180) and not np.allclose(half, prob)


def test_cli_scale_option_reaches_the_tiled_model(tmp_path, capsys):
    from PIL import Image

    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.cli import main
    from napari_sdunet.models import create_model

    model = create_model("unet", "nuclei", base_filters=4).eval()
    prep = {"input_size": [32, 32], "channels": 3, "modality": "microscopy", "ct_window": None,
            "mode": "tiles", "tile_size": [64, 64], "tile_overlap": 16}
    folder = save_checkpoint(model, tmp_path / "m", task="nuclei", preprocessing=prep)
    img = (np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "im.png")
    outs = []
    for scale in ("1", "0.5"):
        out = tmp_path / f"out{scale}"
        assert main(["predict", "--model", str(folder), "--scale", scale, "-o", str(out),
                     str(tmp_path / "im.png")]) == 0
        outs.append(sorted(out.iterdir()))
    assert outs[0] and outs[1]
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(folder), "--scale", "0", "-o", str(tmp_path / "x"), str(tmp_path / "im.png")])
    assert "between 0.05 and 20" in capsys.readouterr().err
