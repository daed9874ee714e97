"""Fine-tuning engine and CLI: real frames get better, cancel writes nothing, a failed save keeps the old model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from napari_sdunet.checkpoint import load_checkpoint, read_config, save_checkpoint
from napari_sdunet.errors import InputError
from napari_sdunet.finetune import (
    FinetuneError,
    LabelledImage,
    finetune,
    labelled_frames,
    pairs_from_folders,
    split_frames,
)
from napari_sdunet.models import create_model
from napari_sdunet.tasks import TASKS
from tests.conftest import shared_data


def _nuclei_256(n: int, split: str = "train") -> list[str]:
    """Ids of the first ``n`` grey 256x256 nuclei images of ``split`` (full resolution, real data)."""
    root = shared_data("nuclei")
    splits = {r["id"]: r["split"] for r in csv.DictReader(open(root / "split.csv"))}
    ids = [r["id"] for r in csv.DictReader(open(root / "metadata.csv"))
           if r["width"] == "256" and r["height"] == "256" and splits[r["id"]] == split]
    return sorted(ids)[:n]


def _folders(tmp_path, ids):
    """Folders of links to real image/mask files (nothing copied)."""
    root = shared_data("nuclei")
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in ids:
        (images / f"{i}.png").symlink_to(root / "images" / f"{i}.png")
        (masks / f"{i}.png").symlink_to(root / "masks" / f"{i}.png")
    return images, masks


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def base_model(tmp_path):
    """A small untrained U-Net saved as a nuclei checkpoint (96x96 input), the model to fine-tune."""
    torch.manual_seed(0)
    model = create_model("unet", task="nuclei", base_filters=8, depth=2)
    return save_checkpoint(model, tmp_path / "base", task="nuclei",
                           preprocessing=TASKS["nuclei"].preprocessing.to_dict(), card="# base\n")


@pytest.fixture
def pretrained_base(tmp_path):
    """A small U-Net trained for a few seconds on 12 colour (H&E-like) nuclei training images: a base
    model with real BatchNorm statistics that is weak on the grey fluorescence images used below."""
    from napari_sdunet.finetune import LabelledImage, augment_config, frames_dataset, labelled_frames
    from napari_sdunet.io import read_image, read_mask
    from napari_sdunet.train_loop import FitConfig, fit

    root = shared_data("nuclei")
    splits = {r["id"]: r["split"] for r in csv.DictReader(open(root / "split.csv"))}
    ids = sorted(r["id"] for r in csv.DictReader(open(root / "metadata.csv"))
                 if r["grayscale_rgb"] == "0" and splits[r["id"]] == "train")[:12]
    prep = TASKS["nuclei"].preprocessing.to_dict()
    frames = [f for i in ids for f in labelled_frames(LabelledImage(
        read_image(root / "images" / f"{i}.png").data, read_mask(root / "masks" / f"{i}.png"), "YXC"))]
    torch.manual_seed(0)
    model = create_model("unet", task="nuclei", base_filters=8, depth=2)
    fit(model, frames_dataset(frames, prep).batches(6, augment=augment_config(True, 0.1, False)), None,
        FitConfig(epochs=1000, max_steps=60, lr=3e-3, batch_size=6, patience=None), device="cpu")
    return save_checkpoint(model, tmp_path / "base", task="nuclei", preprocessing=prep, card="# base\n")


def _weights(folder):
    model, _ = load_checkpoint(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.shared_data
def test_finetune_on_real_frames_lowers_loss_and_improves_dice(tmp_path, pretrained_base):
    base_model = pretrained_base
    images, masks = _folders(tmp_path, _nuclei_256(8))
    seen = []
    res = finetune(base_model, (images, masks), tmp_path / "tuned", steps=40, patience=None, lr=3e-3, batch_size=4,
                   val_fraction=0.25, device="cpu", on_progress=seen.append)
    assert not res.cancelled and res.path == tmp_path / "tuned"
    assert (res.n_train, res.n_val, res.dice_on) == (6, 2, "validation")
    losses = [p.loss for p in seen if p.kind == "step"]
    assert len(losses) == 40 == res.steps
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert res.dice_after > res.dice_before + 0.1, (res.dice_before, res.dice_after)
    assert seen[0].kind == "status" and seen[0].message  # stages are reported on the same channel
    first = next(p for p in seen if p.kind != "status")
    assert first.kind == "val" and first.step == 0 and first.val_dice == pytest.approx(res.dice_before)
    # a normal checkpoint folder, with its provenance and a card naming the base model
    cfg = read_config(res.path)
    assert cfg["task"] == "nuclei" and cfg["preprocessing"] == TASKS["nuclei"].preprocessing.to_dict()
    ft = cfg["finetune"]
    assert ft["base_model"] == "base" and ft["steps"] == 40 and ft["n_train"] == 6
    assert ft["dice_after"] == pytest.approx(res.dice_after)
    card = (res.path / "README.md").read_text()
    assert "Fine-tuned from **base**" in card and "before" in card
    tuned, base = _weights(res.path), _weights(base_model)
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    # the base model's BatchNorm statistics are kept by default (freeze_bn=True)
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(tuned[k], base[k]) for k in stats)
    assert ft["freeze_bn"] is True


@pytest.mark.shared_data
def test_finetuned_folder_works_in_evaluate_cli(tmp_path, base_model, capsys):
    from napari_sdunet.cli import main

    images, masks = _folders(tmp_path, _nuclei_256(6))
    out = tmp_path / "tuned"
    rc = main(["finetune", "--model", str(base_model), "--images", str(images), "--masks", str(masks),
               "--output", str(out), "--steps", "6", "--lr", "3e-3", "--device", "cpu", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["path"] == str(out) and summary["steps"] == 6 and summary["n_val"] == 1
    assert 0.0 <= summary["dice_before"] <= 1.0 and 0.0 <= summary["dice_after"] <= 1.0
    rc = main(["evaluate", "--model", str(out), "--images", str(images), "--masks", str(masks), "--json", "-q",
               "--device", "cpu"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 6 and 0.0 <= ev["dice"] <= 1.0
    # the same output again without --overwrite is refused before any training
    rc = main(["finetune", "--model", str(base_model), "--images", str(images), "--masks", str(masks),
               "--output", str(out), "--steps", "20"])
    assert rc == 1 and "already holds a model" in capsys.readouterr().err


@pytest.mark.shared_data
def test_cancel_leaves_no_model(tmp_path, base_model):
    images, masks = _folders(tmp_path, _nuclei_256(4))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    out = tmp_path / "models" / "tuned"
    res = finetune(base_model, (images, masks), out, steps=50, device="cpu", should_stop=stop)
    assert res.cancelled and res.path is None and res.steps < 50
    assert not out.exists()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.shared_data
def test_interrupted_save_keeps_the_previous_model(tmp_path, base_model, monkeypatch):
    import safetensors.torch

    images, masks = _folders(tmp_path, _nuclei_256(4))
    out = tmp_path / "models" / "tuned"
    finetune(base_model, (images, masks), out, steps=2, lr=1e-3, device="cpu")
    before = _weights(out)
    config_before = (out / "config.json").read_text()
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, *a, **k):
        real_save(dict(list(tensors.items())[:2]), filename)  # a partial file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        finetune(base_model, (images, masks), out, steps=3, lr=1e-2, device="cpu", overwrite=True)
    monkeypatch.undo()
    assert (out / "config.json").read_text() == config_before
    after = _weights(out)  # loads: checksum still matches
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tuned"]  # no temporary folder left


def test_labelled_frames_of_a_stack_are_the_painted_and_marked_slices():
    image = np.random.default_rng(0).integers(0, 255, (5, 32, 40), dtype=np.uint8)
    labels = np.zeros((5, 32, 40), np.uint8)
    labels[1, 3:9, 4:9] = 1
    labels[3, 10:20, 10:20] = 7  # instance labels count as foreground
    frames = labelled_frames(LabelledImage(image, labels, "ZYX", frames=[0], name="stack"))
    assert [f.index for f in frames] == [0, 1, 3]
    assert frames[2].mask.dtype == bool and frames[2].mask.sum() == 100
    assert not frames[0].mask.any()
    with pytest.raises(InputError, match="do not match"):
        labelled_frames(LabelledImage(image, labels[:, :30], "ZYX"))
    with pytest.raises(InputError, match="outside"):
        labelled_frames(LabelledImage(image, labels, "ZYX", frames=[9]))
    rgb = np.zeros((32, 40, 3), np.uint8)
    two_d = labelled_frames(LabelledImage(rgb, np.zeros((32, 40), np.uint8)))
    assert len(two_d) == 1 and two_d[0].has_c  # a 2-D pair counts even with no object


def test_split_frames():
    frames = list(range(10))
    assert split_frames(frames, 0.2) == (list(range(8)), [8, 9])  # the last frames: not near-copies
    train, val = split_frames(frames, 0.2, seed=1, how="random")
    assert len(val) == 2 and sorted(train + val) == frames and val != [8, 9]
    assert split_frames([0], 0.5) == ([0], [])
    with pytest.raises(FinetuneError):
        split_frames(frames, 1.0)


def test_bad_requests_fail_before_training(tmp_path, base_model):
    from napari_sdunet.zoo import PACKAGE_WEIGHTS

    img = np.zeros((40, 40, 3), np.uint8)
    lab = np.zeros((5, 40, 40), np.uint8)
    with pytest.raises(FinetuneError, match="no labelled frame|none of the given"):
        finetune(base_model, [LabelledImage(np.zeros((5, 40, 40), np.uint8), lab, "ZYX")], tmp_path / "o")
    with pytest.raises(FinetuneError, match="shipped weights"):
        finetune(base_model, [(img, lab[0])], PACKAGE_WEIGHTS / "mine")
    with pytest.raises(FinetuneError, match="trainable"):
        finetune(base_model, [(img, lab[0])], tmp_path / "o", trainable="encoder")
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "x.txt").write_text("x")
    with pytest.raises(FinetuneError, match="not a model folder"):
        finetune(base_model, [(img, lab[0])], tmp_path / "notmodel")
    with pytest.raises(FinetuneError, match="same file stem"):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        pairs_from_folders(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "o").exists()


def test_decoder_only_keeps_the_encoder(tmp_path, base_model):
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):
        m = np.zeros((64, 64), np.uint8)
        cy, cx = rng.integers(16, 48, 2)
        m[cy - 8:cy + 8, cx - 8:cx + 8] = 1
        pairs.append(((m * 180 + rng.integers(0, 60, m.shape)).astype(np.uint8), m))
    res = finetune(base_model, pairs, tmp_path / "dec", steps=4, lr=1e-2, trainable="decoder",
                   val_fraction=0.0, device="cpu", freeze_bn=False)
    assert res.dice_on == "training" and res.n_val == 0 and not math.isnan(res.dice_after)
    tuned, base = _weights(res.path), _weights(base_model)
    params = [k for k, _ in load_checkpoint(base_model)[0].named_parameters()]
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k.endswith("running_mean"))  # freeze_bn=False
    assert all(torch.equal(tuned[k], base[k]) for k in params if k.split(".")[0] in ("downs", "inc"))
    assert any(not torch.equal(tuned[k], base[k]) for k in params if k.split(".")[0] in ("ups", "head"))


def test_nifti_volume_pairs_use_their_labelled_slices(tmp_path):
    """A CT volume + liver mask from folders: the slices with liver are the training frames."""
    sample = __import__("tests.conftest", fromlist=["REPO"]).REPO / "sample_data"
    if not (sample / "ct_image.nii.gz").is_file():
        pytest.skip("needs sample_data/ct_image.nii.gz")
    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    (tmp_path / "im" / "ct.nii.gz").symlink_to(sample / "ct_image.nii.gz")
    (tmp_path / "ma" / "ct.nii.gz").symlink_to(sample / "ct_liver_mask.nii.gz")
    (item,) = pairs_from_folders(tmp_path / "im", tmp_path / "ma")
    assert item.axes == "ZYX" and item.image.shape == item.labels.shape
    frames = labelled_frames(item)
    with_liver = [k for k in range(item.labels.shape[0]) if item.labels[k].any()]
    assert [f.index for f in frames] == with_liver and len(frames) > 0


def test_folder_pairs_come_in_natural_name_order(tmp_path):
    from PIL import Image

    for d in ("im", "ma"):
        (tmp_path / d).mkdir()
    for n in (10, 2, 1):
        Image.fromarray(np.full((8, 8), n, np.uint8)).save(tmp_path / "im" / f"frame{n}.png")
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "ma" / f"frame{n}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "im" / "unpaired.png")
    items = pairs_from_folders(tmp_path / "im", tmp_path / "ma")
    assert [it.name for it in items] == ["frame1.png", "frame2.png", "frame10.png"]
    assert [int(it.image[0, 0]) for it in items] == [1, 2, 10] and items[0].labels.all()


def test_epochs_instead_of_steps(tmp_path, base_model):
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 255, (40, 40), dtype=np.uint8), (rng.random((40, 40)) > 0.7).astype(np.uint8))
             for _ in range(6)]
    res = finetune(base_model, pairs, tmp_path / "ep", steps=None, epochs=3, batch_size=2, val_fraction=0.0,
                   device="cpu")
    assert res.steps == 9 and read_config(res.path)["finetune"]["steps"] == 9  # 3 epochs of 6 frames / 2
    with pytest.raises(FinetuneError, match="steps or epochs"):
        finetune(base_model, pairs, tmp_path / "x", steps=None, epochs=None, time_budget_s=None)


def _random_pairs(n, size=40, seed=2):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (size, size), dtype=np.uint8), (rng.random((size, size)) > 0.7).astype(np.uint8))
            for _ in range(n)]


def test_reported_total_is_what_fit_runs(tmp_path, base_model):
    """5 training frames, batch 4, 2 epochs: fit's loader drops the partial batch, so 2 steps, and every
    report (the first, with the Dice before, included) announces 2."""
    seen = []
    res = finetune(base_model, _random_pairs(5), tmp_path / "sched", steps=None, epochs=2, batch_size=4,
                   val_data=_random_pairs(1, seed=3), device="cpu", on_progress=seen.append)
    assert res.steps == 2
    training = [p for p in seen if p.kind != "status"]
    assert {p.total_steps for p in training} == {2}
    assert training[0].kind == "val" and training[0].step == 0
    from napari_sdunet.batches import BatchSource
    from napari_sdunet.train_loop import FitConfig, plan_steps

    def plan(n, batch, epochs, steps):
        src = BatchSource(torch.zeros(n, 1, 8, 8), torch.zeros(n, 1, 8, 8), batch)
        return plan_steps(FitConfig(epochs=epochs or 10**9, max_steps=steps, batch_size=batch), src)

    assert plan(5, 4, 2, None) == (1, 2) and plan(4, 4, 2, None) == (1, 2)
    assert plan(9, 4, None, 5) == (2, 5) and plan(9, 4, 3, 100) == (2, 6)


def test_time_budget_ends_the_run_and_saves(tmp_path, base_model):
    res = finetune(base_model, _random_pairs(6, size=64), tmp_path / "budget", steps=None, time_budget_s=4.0,
                   patience=None, batch_size=2, device="cpu")
    assert res.path is not None and not res.cancelled and res.stopped_by == "time budget"
    assert res.steps >= 1 and res.total_seconds < 4.0 + 3.0
    info = read_config(res.path)["finetune"]
    assert info["stopped_by"] == "time budget" and info["time_budget_s"] == 4.0
    with pytest.raises(FinetuneError, match="time budget"):
        finetune(base_model, _random_pairs(2), tmp_path / "x", time_budget_s=-1)


def test_patience_stops_when_held_out_dice_stops_improving(tmp_path, base_model):
    res = finetune(base_model, _random_pairs(6), tmp_path / "pat", steps=300, time_budget_s=None, patience=2,
                   batch_size=2, lr=1e-5, val_fraction=0.34, device="cpu")
    assert res.stopped_by in ("no better held-out Dice (patience)", "steps")
    assert res.stopped_by != "steps" or res.steps == 300


def test_unwritable_output_fails_before_training(tmp_path, base_model, monkeypatch):
    import tempfile

    seen = []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(FinetuneError, match="is a file, not a folder"):
        finetune(base_model, _random_pairs(2), blocker / "model", device="cpu", on_progress=seen.append)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # as a read-only folder would (root ignores chmod)
    with pytest.raises(FinetuneError, match="not writable"):
        finetune(base_model, _random_pairs(2), tmp_path / "ro" / "model", device="cpu", on_progress=seen.append)
    assert seen == []  # refused before the Dice before / any training step
    assert not (tmp_path / "ro").exists()


def test_base_weights_are_kept_when_no_step_beats_them(tmp_path, base_model, monkeypatch):
    """fit keeps its best validation step but never compares it with the base model (step 0); when the
    held-out frames score the base higher, the saved model is the base."""
    import napari_sdunet.train_loop as tl

    def ruinous_fit(model, train_set, val_set, cfg, **kwargs):
        with torch.no_grad():
            model.head.bias.fill_(50.0)  # predicts foreground everywhere
        return tl.FitResult(0.0, 3, 3, False, False, 0.1, [])

    monkeypatch.setattr(tl, "fit", ruinous_fit)
    pairs = [(np.full((40, 40), 20, np.uint8), np.zeros((40, 40), np.uint8)) for _ in range(4)]  # nothing there
    res = finetune(base_model, pairs, tmp_path / "kept", steps=3, device="cpu")
    assert res.dice_before > 0.5  # the base finds nothing, rightly
    assert res.dice_after == res.dice_before and res.best_step == 0
    info = read_config(res.path)["finetune"]
    assert info["kept"].startswith("base weights") and info["best_step"] == 0
    tuned, base = _weights(res.path), _weights(base_model)
    assert all(torch.equal(tuned[k], base[k]) for k in base)


def test_finetune_after_segmenting_with_an_sdn_model(tmp_path):
    """Segment, then Fine-tune, in one napari session: the user's path. (The fused C++ SDN sweep once
    reused buffers made under torch.inference_mode in the fine-tuning's forward; fixed in 750d710.)"""
    from napari_sdunet.inference import segment
    from napari_sdunet.zoo import list_pretrained

    if "sdunet-polyps" not in list_pretrained():
        pytest.skip("needs the shipped sdunet-polyps")
    img = (np.random.default_rng(0).random((144, 192, 3)) * 255).astype(np.uint8)
    segment("sdunet-polyps", img, "YXC", device="cpu")
    pairs = [(img, (np.arange(144 * 192).reshape(144, 192) % 7 == 0).astype(np.uint8)) for _ in range(3)]
    res = finetune("sdunet-polyps", pairs, tmp_path / "after-segment", steps=2, time_budget_s=None, device="cpu")
    assert res.steps == 2


def test_a_native_resolution_model_finetunes_on_native_patches(tmp_path, monkeypatch):
    """A model that infers in tiles at native scale must not see its frames shrunk to its input size:
    fine-tuning draws random patches of the input size from the frames at their own pixel size."""
    import napari_sdunet.train_loop as tl
    from napari_sdunet.batches import BatchSource

    model = create_model("unet", task="nuclei", base_filters=4, depth=2)
    prep = dict(TASKS["nuclei"].preprocessing.to_dict(), input_size=[32, 32], mode="tiles", tile_size=[64, 64])
    base = save_checkpoint(model, tmp_path / "native", task="nuclei", preprocessing=prep, card="# n\n")
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8), (rng.random((150, 200)) > 0.6).astype(np.uint8))
             for _ in range(4)]
    seen = {}
    real_fit = tl.fit

    def spy(model, train, val, cfg, **kw):
        seen["train"], seen["val"] = train, val
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(tl, "fit", spy)
    res = finetune(base, pairs, tmp_path / "out", steps=3, time_budget_s=None, batch_size=2, device="cpu")
    assert res.steps == 3 and res.path is not None
    assert isinstance(seen["train"], BatchSource)
    assert [tuple(x.shape) for x in seen["train"].images] == [(3, 150, 200)] * len(seen["train"])
    x, y = seen["train"].batch(0)
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 1, 32, 32)
    vx, _ = seen["val"][0]
    assert vx.shape == (3, 256, 256)  # held-out frames scored on their central 256x256
    assert load_checkpoint(res.path)[1]["preprocessing"]["mode"] == "tiles"


def test_unreadable_folder_pairs_are_skipped_with_a_warning(tmp_path):
    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(images / "a.png")
    Image.fromarray(np.ones((20, 20), np.uint8) * 255).save(masks / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    Image.fromarray(np.ones((20, 20), np.uint8) * 255).save(masks / "b.png")
    with pytest.warns(UserWarning, match="1 image/mask pair"):
        items = pairs_from_folders(images, masks)
    assert [it.name for it in items] == ["a.png"]


def test_cli_time_budget_and_patience(tmp_path, base_model, capsys):
    from PIL import Image

    from napari_sdunet.cli import main

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k, (img, mask) in enumerate(_random_pairs(5)):
        Image.fromarray(img).save(images / f"f{k}.png")
        Image.fromarray(mask * 255).save(masks / f"f{k}.png")
    out = tmp_path / "tuned"
    assert main(["finetune", "--model", str(base_model), "--images", str(images), "--masks", str(masks),
                 "-o", str(out), "--steps", "3", "--time-budget", "0", "--patience", "0", "--device", "cpu",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 3 and read_config(out)["finetune"]["time_budget_s"] is None
    assert read_config(out)["finetune"]["patience"] is None


def test_one_finetune_config_for_the_cli_the_widget_and_the_engine():
    """The defaults live in FinetuneConfig alone: the CLI's defaults are its fields; unknown settings fail."""
    import argparse

    from napari_sdunet.cli import finetune as cli_finetune
    from napari_sdunet.finetune import FinetuneConfig

    parser = argparse.ArgumentParser()
    cli_finetune.register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--model", "m", "--images", "i", "--masks", "k", "-o", "out"])
    d = FinetuneConfig()
    assert (args.steps, args.time_budget, args.patience, args.lr, args.batch_size, args.val_fraction,
            args.precision) == (d.steps, d.time_budget_s, d.patience, d.lr, d.batch_size, d.val_fraction,
                                d.precision)
    assert d.with_settings(steps=5).steps == 5 and d.steps == 400
    with pytest.raises(FinetuneError, match="unknown fine-tuning setting"):
        d.with_settings(stepz=5)
    with pytest.raises(FinetuneError, match="learning rate"):
        FinetuneConfig(lr=0).check()


def test_precision_setting_reaches_the_training_loop(tmp_path, base_model):
    # "auto" trains under bf16 autocast + channels_last only where the CPU's bf16 pays; "bf16" forces
    # it, "fp32" turns it off; the saved record says which ran, and the saved weights are contiguous
    import torch

    from napari_sdunet.batches import BatchSource
    from napari_sdunet.finetune import FinetuneConfig, fit_config
    from napari_sdunet.models.sdn.cpu import bf16_gemm_pays

    cpu = torch.device("cpu")
    src = BatchSource(torch.zeros(4, 3, 16, 16), torch.zeros(4, 1, 16, 16), batch_size=2)
    for precision, want in (("fp32", False), ("bf16", True), ("auto", bf16_gemm_pays())):
        cfg, _ = fit_config(FinetuneConfig(precision=precision), src, True, cpu)
        assert cfg.cpu_bf16 is want and cfg.channels_last is want
    assert fit_config(FinetuneConfig(precision="bf16"), src, True, torch.device("meta"))[0].cpu_bf16 is False
    with pytest.raises(FinetuneError, match="precision"):
        FinetuneConfig(precision="fp16").check()
    res = finetune(base_model, _random_pairs(6), tmp_path / "bf16", steps=3, batch_size=2, device="cpu",
                   precision="bf16")
    rec = read_config(res.path)["finetune"]
    assert rec["precision"] == "bf16 autocast" and rec["steps"] == 3
    assert math.isfinite(res.dice_after)
    assert "bf16 autocast" in (res.path / "README.md").read_text()


def test_warmup_setting_reaches_the_training_loop():
    # the fine-tuning lr ramps up linearly over warmup_steps (fit's own schedule), then stays constant
    import torch

    from napari_sdunet.batches import BatchSource
    from napari_sdunet.finetune import FinetuneConfig, fit_config
    from napari_sdunet.train_loop import lr_factor

    src = BatchSource(torch.zeros(4, 3, 16, 16), torch.zeros(4, 1, 16, 16), batch_size=2)
    cfg, total = fit_config(FinetuneConfig(warmup_steps=4), src, True, torch.device("cpu"))
    assert cfg.warmup_steps == 4
    assert [lr_factor(cfg, s, total) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert fit_config(FinetuneConfig(), src, True, torch.device("cpu"))[0].warmup_steps == 0
    with pytest.raises(FinetuneError, match="warmup_steps"):
        FinetuneConfig(warmup_steps=-1).check()


@pytest.mark.parametrize("task,mirrors", [("liver", False), ("nuclei", True)])
def test_ct_models_are_never_fine_tuned_on_mirrored_slices(tmp_path, monkeypatch, task, mirrors):
    """A CT slice has a side (the liver is on the patient's right): its augmentation zooms, never flips or turns."""
    import napari_sdunet.train_loop as tl

    model = create_model("unet", task=task, base_filters=4, depth=2)
    base = save_checkpoint(model, tmp_path / "base", task=task, preprocessing=TASKS[task].preprocessing.to_dict(),
                           card="# b\n")
    rng = np.random.default_rng(0)
    ch = TASKS[task].in_channels
    shape = (64, 64, 3) if ch == 3 else (64, 64)
    pairs = [(rng.integers(0, 255, shape, dtype=np.uint8), (rng.random((64, 64)) > 0.6).astype(np.uint8))
             for _ in range(4)]
    seen = {}
    real_fit = tl.fit

    def spy(model, train, val, cfg, **kw):
        seen["augment"] = train.augment
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(tl, "fit", spy)
    res = finetune(base, pairs, tmp_path / "out", steps=2, time_budget_s=None, batch_size=2, device="cpu")
    aug = seen["augment"]
    assert (aug.flips, aug.rot90) == (mirrors, mirrors)
    assert (tuple(aug.scale) != (1.0, 1.0)) == (not mirrors) and aug.intensity > 0
    card = (res.path / "README.md").read_text()
    assert ("augmentation: flips/rotations/intensity" if mirrors else "augmentation: zoom/intensity") in card
