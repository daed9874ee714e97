"""The Segment widget: every sample through a checkpoint, layer properties, cancel, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sdunet._sample_data import load_sample
from napari_sdunet.widgets import SegmentWidget

TASK = {"nuclei": "nuclei", "polyps": "polyps", "ct": "liver"}


def _viewer_with(make_napari_viewer, sample):
    viewer = make_napari_viewer()
    for data, kwargs, kind in load_sample(sample):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    return viewer


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)


@pytest.mark.parametrize("sample", ["nuclei", "polyps", "ct"])
def test_segment_each_sample(make_napari_viewer, qtbot, checkpoints, errors, sample):
    viewer = _viewer_with(make_napari_viewer, sample)
    source = viewer.layers[0]
    before = [(layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers]
    w = SegmentWidget(viewer)
    w.models.add_folder(checkpoints[TASK[sample]])
    w.image.value = source
    assert w.axes.value == ("ZYX" if sample == "ct" else "YXC")
    assert w.axes.value in w.axes_hint.value  # the proposal is shown, not applied silently
    w.add_prob.value = True
    worker = w.run()
    assert worker is not None
    _wait(qtbot, w)
    assert errors == [] and w.runner.status.value.startswith("done")
    assert len(viewer.layers) == len(before) + 2
    for (name, data), layer in zip(before, viewer.layers):  # the user's layers are untouched
        assert layer.name == name and np.array_equal(layer.data, data)
    mask = viewer.layers[-2]
    prob = viewer.layers[-1]
    assert mask.name == f"unet-{TASK[sample]} mask [{source.name}]"
    assert prob.name == f"unet-{TASK[sample]} probability [{source.name}]"
    spatial = source.data.shape[:-1] if source.rgb else source.data.shape
    assert mask.data.shape == spatial and mask.data.all()  # the checkpoint predicts foreground everywhere
    assert np.allclose(mask.scale, source.scale) and np.allclose(mask.translate, source.translate)
    assert tuple(mask.axis_labels) == tuple(source.axis_labels)
    if sample == "ct":
        assert np.allclose(mask.metadata["nifti_affine"], source.metadata["nifti_affine"])
        assert w.ct_lo.enabled and w.ct_lo.value == -40.0
    # running again never overwrites: a second layer with a new name
    w.run()
    _wait(qtbot, w)
    names = [layer.name for layer in viewer.layers]
    assert len(names) == len(set(names)) == len(before) + 4


def test_lists_shipped_and_user_models(make_napari_viewer, tmp_path, monkeypatch):
    from napari_sdunet import zoo
    from tests.test_inference import make_checkpoint

    shipped = tmp_path / "weights"
    make_checkpoint(shipped / "unet-nuclei")
    monkeypatch.setattr(zoo, "PACKAGE_WEIGHTS", shipped)
    w = SegmentWidget(make_napari_viewer())
    labels = [label for label, _ in w.models.listed()]
    assert "unet-nuclei: nuclei, no test Dice recorded (shipped)" in labels
    assert w.models.model == "unet-nuclei"  # the only model: preselected, the box is never empty
    make_checkpoint(zoo.user_models_dir() / "unet-mine")  # e.g. saved by fine-tuning
    w.models.refresh()
    assert "unet-mine: nuclei, no test Dice recorded (yours)" in [label for label, _ in w.models.listed()]


def test_lists_real_shipped_weights(make_napari_viewer):
    from napari_sdunet.zoo import list_pretrained

    names = list_pretrained()
    if not names:
        pytest.skip("no shipped weights in napari_sdunet/weights yet")
    w = SegmentWidget(make_napari_viewer())
    labels = [label for label, _ in w.models.listed()][: len(names)]
    assert [label.split(":")[0] for label in labels] == names
    assert all(label.endswith("(shipped)") and "Dice" in label for label in labels)  # task and Dice shown


def test_cancel(make_napari_viewer, qtbot, checkpoints, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (400, 96, 96), dtype=np.uint8), name="movie")
    w = SegmentWidget(viewer)
    w.models.add_folder(checkpoints["nuclei"])
    w.axes.value = "TYX"
    w.batch_size.value = 1
    worker = w.run()
    assert worker is not None, errors
    qtbot.waitUntil(lambda: w.progress_value() >= 2, timeout=60_000)
    w.runner.cancel_button.changed.emit(True)
    _wait(qtbot, w)
    assert w.runner.status.value == "cancelled" and w.runner.last_result == "cancelled"
    assert len(viewer.layers) == 1 and errors == []
    assert w.run_button.enabled and not w.runner.cancel_button.enabled
    del worker


@pytest.mark.parametrize("case", ["wrong_ndim", "nan", "empty", "corrupt_checkpoint", "no_model", "cuda"])
def test_bad_input_notifies(make_napari_viewer, qtbot, checkpoints, errors, tmp_path, case):
    viewer = make_napari_viewer()
    data = np.zeros((3, 32, 32), np.float32)
    if case == "nan":
        data[1, 5, 5] = np.nan
    if case == "empty":
        data = np.zeros((0, 32, 32), np.uint8)
    viewer.add_image(data, name="img")
    w = SegmentWidget(viewer)
    model = checkpoints["nuclei"]
    if case == "corrupt_checkpoint":
        import shutil

        model = shutil.copytree(model, tmp_path / "corrupt")
        (model / "model.safetensors").write_bytes(b"\0" * 100)
    if case != "no_model":
        w.models.add_folder(model)
    else:  # the box is preselected whenever models exist; the user emptied it
        w.models.combo.value = None
    if case == "wrong_ndim":
        w.axes.value = "YX"
    if case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        w.device.value = "cuda"
    w.run()
    _wait(qtbot, w)
    assert len(errors) == 1, errors
    expected = {"wrong_ndim": "dimensions", "nan": "NaN", "empty": "empty", "corrupt_checkpoint": "checksum",
                "no_model": "choose a model", "cuda": "CUDA"}[case]
    assert expected in errors[0]
    assert len(viewer.layers) == 1 and w.run_button.enabled


def test_object_scale_is_offered_for_native_resolution_models(make_napari_viewer, qtbot, tmp_path, errors):
    """The scale box is live only for models that infer in tiles at native scale, and it reaches them."""
    import torch

    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.models import create_model

    viewer = _viewer_with(make_napari_viewer, "nuclei")
    w = SegmentWidget(viewer)
    torch.manual_seed(0)
    model = create_model("unet", "nuclei", base_filters=4, depth=2)
    prep = {"input_size": [32, 32], "channels": 3, "modality": "microscopy", "ct_window": None,
            "mode": "tiles", "tile_size": [64, 64], "tile_overlap": 16}
    native = save_checkpoint(model, tmp_path / "native-nuclei", task="nuclei", preprocessing=prep)
    w.models.add_folder(native)
    assert w.scale.enabled
    probs = []
    for scale in (1.0, 0.5):
        w.scale.value = scale
        w.add_prob.value = True
        w.run()
        _wait(qtbot, w)
        probs.append(np.asarray(viewer.layers[-1].data))
    assert errors == [] and probs[0].shape == probs[1].shape and not np.allclose(probs[0], probs[1])
    resized = save_checkpoint(model, tmp_path / "resize-nuclei", task="nuclei",
                              preprocessing=dict(prep, mode="resize"))
    w.models.add_folder(resized)
    assert not w.scale.enabled


def test_a_nifti_volume_in_another_orientation_is_segmented_in_the_models(make_napari_viewer, qtbot, tmp_path,
                                                                            errors):
    """The same scan stored with x/y flipped gives the same mask, back in the layer's own storage."""
    import nibabel as nib

    from napari_sdunet._reader import read_layers
    from tests.test_inference import make_checkpoint

    ct = load_sample("ct")[0]
    data, meta = ct[0], ct[1]["metadata"]
    affine = np.asarray(meta["nifti_affine"])
    import torch

    torch.manual_seed(0)
    folder = make_checkpoint(tmp_path / "liver", task="liver")  # random weights: the output depends on the image
    flip = affine @ np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = affine[:3, :3] @ (np.array(data.shape[::-1]) - 1) * [1, 1, 0] + affine[:3, 3]
    arr = np.transpose(np.asarray(data), (2, 1, 0))  # numpy (z, y, x) -> NIfTI (x, y, z)
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr[::-1, ::-1]), flip), str(tmp_path / "b.nii.gz"))
    masks = []
    for name in ("a", "b"):
        viewer = make_napari_viewer()
        path = str(tmp_path / f"{name}.nii.gz")
        for layer_data, kwargs, kind in read_layers(path):
            getattr(viewer, f"add_{kind}")(layer_data, **kwargs)
        w = SegmentWidget(viewer)
        w.models.add_folder(folder)
        w.image.value = viewer.layers[0]
        w.add_prob.value = True
        w.run()
        _wait(qtbot, w)
        masks.append(np.asarray(viewer.layers[-1].data))
    assert errors == []
    a, b = masks
    assert not np.allclose(a, a.mean())  # the probabilities vary over the volume
    assert np.allclose(b[:, ::-1, ::-1], a, atol=1e-5)  # same scan, same answer, in b's storage


def test_precision_choice_reaches_inference_and_is_shown(make_napari_viewer, qtbot, checkpoints, errors,
                                                         precision_calls):
    viewer = _viewer_with(make_napari_viewer, "nuclei")
    w = SegmentWidget(viewer)
    assert w.precision.value == "auto" and list(w.precision.choices) == ["auto", "fp32", "bf16"]
    w.models.add_folder(checkpoints["nuclei"])
    w.image.value = viewer.layers[0]
    messages = []
    for choice in ("fp32", "bf16"):
        w.precision.value = choice
        assert w.run() is not None
        _wait(qtbot, w)
    assert errors == [] and precision_calls == ["fp32", "bf16"]
    assert w.runner.status.value.startswith("done")
    from napari_sdunet.widgets.segment import segment_job

    for choice in ("fp32", "bf16"):  # the status line says which precision ran
        gen = segment_job(str(checkpoints["nuclei"]), "cpu", viewer.layers[0].data, "YXC", None, None, 8, False,
                          precision=choice)
        try:
            while True:
                messages.append(next(gen).message)
        except StopIteration:
            pass
        assert any(f"on cpu, {choice}:" in m for m in messages), messages


def test_test_time_flips_are_off_for_ct_models(make_napari_viewer, checkpoints):
    """A CT model (and the CT modality preset) greys out test-time flips: mirrored slices mean another anatomy."""
    viewer = _viewer_with(make_napari_viewer, "nuclei")
    w = SegmentWidget(viewer)
    w.models.add_folder(checkpoints["nuclei"])
    w.tta.value = True
    assert w.tta.enabled and w.tta.value
    w.models.add_folder(checkpoints["liver"])
    assert not w.tta.enabled and not w.tta.value and "side" in w.tta.tooltip
    w.models.add_folder(checkpoints["nuclei"])
    assert w.tta.enabled
    w.modality.value = "ct"
    assert not w.tta.enabled
    w.modality.value = "microscopy"
    assert w.tta.enabled
