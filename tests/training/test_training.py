"""Training on small real subsets: the loss falls, the checkpoint reloads, warm start, augmentation."""

from __future__ import annotations

import json

import pytest
import torch

from napari_sdunet.checkpoint import load_checkpoint
from napari_sdunet.models import create_model
from napari_sdunet.train_loop import FitConfig, fit
from tests.conftest import shared_data
from training.datasets import load_split
from training.runner import RunSpec, run_fit, warm_start


def _nuclei(split, n):
    return load_split("nuclei", split, data_root=shared_data("nuclei_96").parent, limit=n)


@pytest.mark.parametrize("task, folder", [("nuclei", "nuclei_96"), ("polyps", "polyps"),
                                          ("liver", "liver_lits_slices")])
def test_loss_falls_on_real_data(task, folder):
    torch.set_num_threads(1)
    data = load_split(task, "train", data_root=shared_data(folder).parent, size=[64, 64], limit=40)
    with_object = [i for i in range(len(data)) if data.masks[i].any()]  # many liver slices show no liver
    train = data.subset(indices=with_object[:8])
    model = create_model("unet", task, base_filters=8, depth=2)
    seen = []
    fit(model, train, None, FitConfig(epochs=20, lr=3e-3, batch_size=4, patience=None), device="cpu",
        on_progress=seen.append)
    losses = [p.loss for p in seen if p.kind == "step"]
    assert len(losses) == 40
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4


def test_run_fit_writes_a_reloadable_checkpoint(tmp_path):
    root = shared_data("nuclei_96").parent
    spec = RunSpec(task="nuclei", arch="unet", out=str(tmp_path / "run"), data_root=str(root), max_steps=4,
                   batch_size=4, val_every=2, limit_train=16, limit_val=8, limit_test=8, patience=None,
                   model_overrides={"base_filters": 8, "depth": 2}, threads=1)
    rec = run_fit(spec, progress=False)
    assert rec["fit"]["steps"] == 4 and rec["test"]["n"] == 8
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3
    model, config = load_checkpoint(tmp_path / "run" / "model")
    assert config["preprocessing"]["input_size"] == [96, 96] and config["task"] == "nuclei"
    assert config["training"]["fit_config"]["lr"] == 1e-3  # Table 5 for nuclei
    x = _nuclei("test", 2).images.float() / 255
    assert torch.isfinite(model(x)).all()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["dice"] == rec["test"]["dice"]
    # the metrics of the reloaded model match the ones recorded
    from training.runner import test_model

    again = test_model(model, "nuclei", [96, 96], str(root), None, limit=8)
    assert abs(again["dice"] - rec["test"]["dice"]) < 1e-6


def test_warm_start_maps_unet_onto_sdunet(tmp_path):
    from napari_sdunet.checkpoint import save_checkpoint

    unet = create_model("unet", "nuclei", base_filters=8)
    save_checkpoint(unet, tmp_path / "u", task="nuclei")
    sd = create_model("sdunet", "nuclei", base_filters=8, sdn_state=4)
    info = warm_start(sd, str(tmp_path / "u"))
    assert info["copied"] > 0.5 * len(unet.state_dict())
    # the VGG block's second conv became the ResSDN block's parallel conv
    key = next(k for k in sd.state_dict() if k.endswith(".cnn.weight"))
    assert torch.equal(sd.state_dict()[key], unet.state_dict()[key.replace(".cnn.", ".")])
    assert torch.equal(sd.state_dict()["head.weight"], unet.state_dict()["head.weight"])
    # with the ResSDN gates opened towards the copied conv, the SD network starts as the U-Net
    assert info["gates_opened"] == 6
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        diff = (torch.sigmoid(unet.eval()(x)) - torch.sigmoid(sd.eval()(x))).abs().max()
    assert diff < 0.02


def test_augment_kinds_of_the_cli_move_image_and_mask_together():
    from napari_sdunet.batches import AugmentConfig, BatchSource

    x = torch.rand(8, 3, 16, 16)
    y = (x[:, :1] > 0.5).float()
    geo = BatchSource(x, y, 4, augment=AugmentConfig.from_kinds(["flip", "rot90"]), seed=1)
    for step in range(6):
        xa, ya = geo.batch(step)
        assert torch.equal((xa[:, :1] > 0.5).float(), ya)
    jit = BatchSource(x, y, 4, augment=AugmentConfig.from_kinds(["intensity"]), seed=2)
    xi, yi = jit.batch(0)
    idx = jit.indices(0)
    assert torch.equal(yi, y[idx]) and not torch.equal(xi, x[idx]) and 0 <= xi.min() and xi.max() <= 1
    with pytest.raises(ValueError, match="unknown augmentation"):
        AugmentConfig.from_kinds(["shear"])


def test_validate_on_stop_scores_the_last_steps():
    train = _nuclei("train", 8)
    val = _nuclei("val", 4)

    def run(flag):
        calls = {"n": 0}

        def stop():
            calls["n"] += 1
            return calls["n"] > 3

        model = create_model("unet", "nuclei", base_filters=8, depth=2)
        cfg = FitConfig(epochs=50, lr=3e-3, batch_size=4, val_every=100, patience=None, validate_on_stop=flag)
        return fit(model, train, val, cfg, device="cpu", should_stop=stop)

    with_val, without = run(True), run(False)
    assert with_val.cancelled and [h["step"] for h in with_val.history] == [3] and with_val.best_step == 3
    assert without.history == [] and without.best_step == 0
