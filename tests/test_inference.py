"""Inference engine: devices, model cache, axes, batching, resizing back, CT window, cancel, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_sdunet import CheckpointError, create_model, save_checkpoint
from napari_sdunet.errors import InputError
from napari_sdunet.inference import (
    Cancelled,
    LoadedModel,
    clear_cache,
    effective_preprocessing,
    frames_of,
    load_model,
    predict,
    segment,
    to_labels,
)
from napari_sdunet.tasks import TASKS


def make_checkpoint(folder: Path, task: str = "nuclei", bias: float | None = None, base_filters: int = 4) -> Path:
    """A small U-Net checkpoint; with ``bias`` its output is that constant logit everywhere."""
    model = create_model("unet", task=task, base_filters=base_filters)
    if bias is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(bias)
    return save_checkpoint(model, folder, task=task, preprocessing=TASKS[task].preprocessing.to_dict())


class Brightness(nn.Module):
    """Logit = 40 * (mean input - 0.5): the mask is 'normalised intensity >= 0.5'; flip-equivariant."""

    in_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x.mean(1, keepdim=True) - 0.5)


def brightness_model(prep: dict) -> LoadedModel:
    return LoadedModel(Brightness(), {"preprocessing": prep}, Path("brightness"), torch.device("cpu"))


def test_load_model_caches_and_reloads_after_resave(tmp_path):
    clear_cache()
    folder = make_checkpoint(tmp_path / "m", bias=3.0)
    a = load_model(folder, "cpu")
    assert load_model(str(folder), "cpu") is a
    make_checkpoint(folder, bias=-3.0)  # fine-tuning overwrote the folder
    b = load_model(folder, "cpu")
    assert b is not a and float(b.model.head.bias.detach()) == -3.0


def test_corrupt_checkpoint_is_reported(tmp_path):
    folder = make_checkpoint(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(folder, "cpu")
    with pytest.raises(CheckpointError, match="no model named"):
        load_model(tmp_path / "missing", "cpu")


def test_frames():
    frames, has_c = frames_of(np.zeros((64, 48, 3)), "YXC")
    assert frames.shape == (1, 64, 48, 3) and has_c
    with pytest.raises(InputError, match="dimensions"):
        frames_of(np.zeros((4, 64, 48)), "YX")
    with pytest.raises(InputError, match="colour"):
        frames_of(np.zeros((4, 64, 48)), "YXC")


@pytest.mark.parametrize("axes,shape", [("YX", (50, 70)), ("YXC", (50, 70, 3)), ("ZYX", (5, 50, 70)),
                                        ("TYX", (3, 50, 70)), ("TYXC", (3, 50, 70, 4))])
def test_predict_shapes_and_values(axes, shape):
    """Mask follows image intensity through resize to 96x96 and back, for every layout."""
    rng = np.random.default_rng(0)
    data = np.zeros(shape, dtype=np.uint8)
    if axes.endswith("C"):
        data[..., 10:40, 20:60, :] = 200
    else:
        data[..., 10:40, 20:60] = 200
    data = data + rng.integers(0, 20, size=shape, dtype=np.uint8)
    prep = {"input_size": [96, 96], "channels": 1, "ct_window": None}
    calls = []
    prob = predict(brightness_model(prep), data, axes, batch_size=2,
                   on_progress=lambda p: calls.append((p.step, p.total_steps)))
    spatial = tuple(s for s, a in zip(shape, axes) if a != "C")
    assert prob.shape == spatial and prob.dtype == np.float32
    mask = to_labels(prob)
    ref = np.zeros(spatial, bool)
    ref[..., 10:40, 20:60] = True
    tp = np.count_nonzero(mask.astype(bool) & ref)
    dice = 2 * tp / (mask.sum() + ref.sum())
    assert dice > 0.95
    n = 1 if axes in ("YX", "YXC") else shape[0]
    assert calls[0] == (0, n) and calls[-1] == (n, n) and len(calls) == 1 + -(-n // 2)


def test_ct_window_is_applied_and_overridable():
    hu = np.array([[[-500, 0, 50, 100, 400]]], dtype=np.int16).repeat(8, axis=1)  # (1, 8, 5) ZYX
    prep = {"input_size": None, "channels": 1, "ct_window": [-40.0, 160.0]}
    loaded = brightness_model(prep)
    # window [-40, 160]: 0.5 <-> 60 HU
    assert to_labels(predict(loaded, hu, "ZYX"))[0, 0].tolist() == [0, 0, 0, 1, 1]
    # user window [-200, 200]: 0.5 <-> 0 HU
    assert to_labels(predict(loaded, hu, "ZYX", ct_window=(-200, 200)))[0, 0].tolist() == [0, 1, 1, 1, 1]
    # microscopy preset on the same numbers: no window, percentile scaling
    assert effective_preprocessing({"preprocessing": prep}, "microscopy")["ct_window"] is None
    assert effective_preprocessing({"preprocessing": {}}, "ct")["ct_window"] == [-40.0, 160.0]
    with pytest.raises(InputError, match="CT window"):
        predict(loaded, hu, "ZYX", ct_window=(100, 100))


def test_tta_and_batch_size_do_not_change_an_equivariant_model():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, size=(7, 40, 30), dtype=np.uint8)
    loaded = brightness_model({"input_size": [32, 32], "channels": 1})
    a = predict(loaded, data, "ZYX", batch_size=1)
    b = predict(loaded, data, "ZYX", batch_size=7, tta=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


class LeftSided(nn.Module):
    """Foreground = the left half of the image: a model with a side, like the liver's."""

    in_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        side = torch.where(torch.arange(w) < w // 2, 8.0, -8.0).expand_as(x[:, :1])
        return side + 0.0 * x[:, :1]


@pytest.mark.parametrize("prep,flipped", [
    ({"input_size": [32, 32], "channels": 1, "modality": "ct", "ct_window": [-40.0, 160.0]}, False),
    ({"input_size": [32, 32], "channels": 1, "ct_window": [-40.0, 160.0]}, False),  # no modality: a window is CT
    ({"input_size": [32, 32], "channels": 1, "modality": "microscopy"}, True),
])
def test_tta_flips_only_where_flipped_images_mean_the_same(prep, flipped):
    """CT slices have a side (the liver is on the patient's right): test-time flips stay off for them."""
    loaded = LoadedModel(LeftSided(), {"preprocessing": prep}, Path("sided"), torch.device("cpu"))
    data = np.zeros((2, 32, 32), np.int16)
    plain = predict(loaded, data, "ZYX", precision="fp32")
    tta = predict(loaded, data, "ZYX", tta=True, precision="fp32")
    assert plain[:, :, :16].min() > 0.99 and plain[:, :, 16:].max() < 0.01
    if flipped:  # the mirrored predictions average the two halves to 0.5
        np.testing.assert_allclose(tta, 0.5, atol=1e-4)
    else:
        np.testing.assert_array_equal(tta, plain)


def test_cancel_between_batches():
    loaded = brightness_model({"input_size": [32, 32], "channels": 1})
    seen = []
    with pytest.raises(Cancelled):
        predict(loaded, np.zeros((10, 32, 32), np.uint8), "ZYX", batch_size=2,
                on_progress=lambda p: seen.append(p.step), should_stop=lambda: len(seen) >= 2)
    assert seen == [0, 2]


@pytest.mark.parametrize("data,axes,msg", [
    (np.full((32, 32), np.nan, np.float32), "YX", "NaN"),
    (np.zeros((0, 32, 32), np.uint8), "ZYX", "empty"),
    (np.zeros((32, 32), np.complex64), "YX", "pixel type"),
    (np.zeros((2, 3, 32, 32), np.uint8), "TYXC", "colour"),
])
def test_bad_input(data, axes, msg):
    loaded = brightness_model({"input_size": [32, 32], "channels": 1})
    with pytest.raises(InputError, match=msg):
        predict(loaded, data, axes)


def test_segment_with_checkpoint(tmp_path):
    folder = make_checkpoint(tmp_path / "all", bias=8.0)
    mask, prob = segment(folder, np.zeros((33, 47, 3), np.uint8), "YXC", device="cpu")
    assert mask.shape == (33, 47) and mask.all() and prob.min() > 0.99
    with pytest.raises(ValueError, match="threshold"):
        to_labels(prob, 1.5)


def test_precision_choice_and_bf16_predictions_match_fp32(tmp_path, monkeypatch):
    # "auto" runs bf16 autocast only on a CPU whose bf16 GEMMs pay (the host probe), never on a GPU;
    # bf16 probabilities stay within bf16 rounding of the fp32 ones and the masks agree
    import torch

    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.devices import pick_precision
    from napari_sdunet.inference import load_model, predict
    from napari_sdunet.models import create_model
    from napari_sdunet.models.sdn.cpu import bf16_gemm_pays

    cpu = torch.device("cpu")
    assert pick_precision("fp32", cpu) is None
    assert pick_precision("bf16", cpu) is torch.bfloat16
    assert pick_precision("auto", cpu) is (torch.bfloat16 if bf16_gemm_pays() else None)
    assert pick_precision("bf16", torch.device("cuda")) is None
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_BF16", "0")
    assert pick_precision("auto", cpu) is None
    with pytest.raises(ValueError, match="precision"):
        pick_precision("fp16", cpu)
    torch.manual_seed(0)
    model = create_model("sdunet", "nuclei", base_filters=4, sdn_state=8).eval()
    folder = save_checkpoint(model, tmp_path / "m", task="nuclei")
    loaded = load_model(folder, "cpu")
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    p32 = predict(loaded, img, "YXC", precision="fp32")
    p16 = predict(loaded, img, "YXC", precision="bf16")
    assert p16.dtype == np.float32 and p16.shape == p32.shape
    assert 0 < np.abs(p16 - p32).max() < 0.03
    assert ((p16 > 0.5) == (p32 > 0.5)).mean() > 0.98
