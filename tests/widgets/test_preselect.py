"""The model box preselects a model that suits the layer: remembered choice, then the layer rule, then the
best-validating shipped model of the task (read from config.json); labels show task and Dice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from napari_sdunet import zoo
from napari_sdunet._sample_data import load_sample
from napari_sdunet.widgets import SegmentWidget
from napari_sdunet.widgets._preselect import task_of_layer
from tests.test_inference import make_checkpoint

SAMPLE_TASK = {"nuclei": "nuclei", "polyps": "polyps", "ct": "liver"}


def _layer(data, rgb=False, metadata=None, path=None, name="img"):
    return SimpleNamespace(data=data, rgb=rgb, metadata=metadata or {}, source=SimpleNamespace(path=path),
                           name=name)


def _with_metrics(folder, task, val, test, key="dice"):
    """Write training/metrics sections into a checkpoint's config.json as the training runner does."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["training"] = {"fit": {"best_val_dice": val}}
    cfg["metrics"] = {key: test}
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Fake shipped weights: two models per task, the *worse-named* one validating better."""
    weights = tmp_path / "weights"
    specs = {  # name: (task, best_val_dice, test dice)
        "unet-nuclei": ("nuclei", 0.70, 0.81), "sdunet-nuclei": ("nuclei", 0.86, 0.87),
        "unet-polyps": ("polyps", 0.66, 0.52), "sdunet-polyps": ("polyps", 0.61, 0.55),
        "unet-liver": ("liver", 0.64, 0.80), "sdunet-liver": ("liver", 0.78, 0.83),
    }
    for name, (task, val, test) in specs.items():
        _with_metrics(make_checkpoint(weights / name, task=task), task, val, test,
                      "dice_3d" if task == "liver" else "dice")
    monkeypatch.setattr(zoo, "PACKAGE_WEIGHTS", weights)
    return {"nuclei": "sdunet-nuclei", "polyps": "unet-polyps", "liver": "sdunet-liver"}  # best validating


def test_rules_on_hand_made_layers():
    rng = np.random.default_rng(0)
    assert task_of_layer(_layer(rng.integers(0, 255, (30, 64, 64), dtype=np.uint8)))[0] == "liver"  # volume
    hu = rng.integers(-1000, 1000, (64, 64)).astype(np.int16)
    assert task_of_layer(_layer(hu))[0] == "liver"  # a single CT slice in HU
    assert task_of_layer(_layer(np.zeros((64, 64), np.uint8), metadata={"nifti_affine": np.eye(4)}))[0] == "liver"
    assert task_of_layer(_layer(np.zeros((64, 64), np.float32), path="/x/scan.nii.gz"))[0] == "liver"
    reddish = np.stack([rng.integers(120, 200, (48, 64)), rng.integers(40, 90, (48, 64)),
                        rng.integers(20, 60, (48, 64))], -1).astype(np.uint8)
    assert task_of_layer(_layer(reddish, rgb=True))[0] == "polyps"
    assert task_of_layer(_layer(np.stack([reddish] * 5), rgb=True)) == ("polyps", "colour video (colonoscopy)")
    purple = np.stack([np.full((48, 64), 170), np.full((48, 64), 140), np.full((48, 64), 200)], -1).astype(np.uint8)
    assert task_of_layer(_layer(purple, rgb=True))[0] == "nuclei"  # stained tissue (H&E-like)
    grey_rgb = np.repeat(rng.integers(0, 80, (48, 64, 1), dtype=np.uint8), 3, -1)
    assert task_of_layer(_layer(grey_rgb, rgb=True))[0] == "nuclei"  # fluorescence stored as RGB
    assert task_of_layer(_layer(rng.integers(0, 4000, (64, 64)).astype(np.uint16)))[0] == "nuclei"
    assert task_of_layer(None)[0] is None
    # a colour image not flagged RGB: colour by the axes rule (YXC), so not a volume
    assert task_of_layer(_layer(purple, rgb=False))[0] == "nuclei" and purple.shape[-1] == 3


@pytest.mark.parametrize("sample", ["nuclei", "polyps", "ct"])
def test_rules_on_the_real_samples(sample):
    data, kwargs, _ = load_sample(sample)[0]
    layer = _layer(data, rgb=kwargs.get("rgb", False), metadata=kwargs.get("metadata"))
    assert task_of_layer(layer)[0] == SAMPLE_TASK[sample]


def test_best_validating_model_and_labels_come_from_config(shipped):
    for task, best in shipped.items():
        assert zoo.best_shipped_for_task(task) == best
    assert zoo.best_shipped_for_task("retina") is None
    labels = dict((ref, label) for label, ref in __import__("napari_sdunet.widgets._common",
                                                            fromlist=["model_choices"]).model_choices())
    assert labels["unet-polyps"] == "unet-polyps: polyps, test Dice 0.520 (shipped)"
    assert labels["sdunet-liver"] == "sdunet-liver: liver, test 3-D Dice 0.830 (shipped)"


@pytest.mark.parametrize("sample", ["nuclei", "polyps", "ct"])
def test_segment_preselects_for_each_sample(make_napari_viewer, shipped, sample):
    viewer = make_napari_viewer()
    for data, kwargs, kind in load_sample(sample):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    w = SegmentWidget(viewer)
    assert w.models.model == shipped[SAMPLE_TASK[sample]]
    assert SAMPLE_TASK[sample] in w.models.why.value and "best-validating" in w.models.why.value
    assert not w.models.manual


def test_box_never_starts_empty(make_napari_viewer, shipped):
    w = SegmentWidget(make_napari_viewer())  # no layer at all
    assert w.models.model in [ref for _, ref in w.models.listed()]


def test_preselection_follows_the_layer_unless_picked_by_hand(make_napari_viewer, shipped):
    viewer = make_napari_viewer()
    nuclei = load_sample("nuclei")[0]
    ct = load_sample("ct")[0]
    a = viewer.add_image(nuclei[0], **nuclei[1])
    b = viewer.add_image(ct[0], **ct[1])
    w = SegmentWidget(viewer)
    w.image.value = a
    assert w.models.model == shipped["nuclei"]
    w.image.value = b
    assert w.models.model == shipped["liver"]
    w.models.combo.value = "unet-liver"  # by hand
    assert w.models.manual and w.models.why.value == "chosen by hand"
    w.image.value = a
    assert w.models.model == "unet-liver"  # the user's choice stays


def test_remembered_choice_survives_a_restart(make_napari_viewer, qtbot, shipped, errors):
    from napari_sdunet import settings

    def open_polyps(viewer):
        data, kwargs, _ = load_sample("polyps")[0]
        return viewer.add_image(data, **kwargs)

    viewer = make_napari_viewer()
    layer = open_polyps(viewer)
    w = SegmentWidget(viewer)
    assert w.models.model == shipped["polyps"]
    w.models.combo.value = "sdunet-polyps"  # the user prefers the other polyp model
    assert w.run() is not None
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    assert errors == [] and w.runner.status.value.startswith("done")
    saved = json.loads(settings.settings_path().read_text())
    assert saved["model_by_layer"][settings.layer_key(layer)] == "sdunet-polyps"
    assert saved["model_by_kind"]["polyps"] == "sdunet-polyps"
    viewer.close()

    # "restart": a new viewer and widget, the same sample opened again -> the remembered model
    viewer2 = make_napari_viewer()
    open_polyps(viewer2)
    w2 = SegmentWidget(viewer2)
    assert w2.models.model == "sdunet-polyps" and w2.models.why.value == "last used on this layer"
    assert not w2.models.manual
    # another layer of the same kind (a colonoscopy video) -> the last model used for that kind
    frames = np.stack([load_sample("polyps")[0][0]] * 3)
    w2.image.value = viewer2.add_image(frames, rgb=True, name="my video")
    assert w2.models.model == "sdunet-polyps" and w2.models.why.value == "last used for polyps images"
    # a remembered model that no longer exists is skipped
    settings.save({"model_by_kind": {"nuclei": "gone-model"}})
    nuc = load_sample("nuclei")[0]
    w2.image.value = viewer2.add_image(nuc[0], **nuc[1])
    assert w2.models.model == shipped["nuclei"]


def test_remembered_checkpoint_folder_is_preselected_again(make_napari_viewer, qtbot, tmp_path, shipped, errors):
    folder = make_checkpoint(tmp_path / "elsewhere" / "my-ct-model", task="liver")
    viewer = make_napari_viewer()
    data, kwargs, _ = load_sample("ct")[0]
    viewer.add_image(data, **kwargs)
    w = SegmentWidget(viewer)
    w.models.add_folder(folder)  # Choose directory
    assert w.run() is not None
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    assert errors == []
    viewer2 = make_napari_viewer()
    viewer2.add_image(data, **kwargs)
    w2 = SegmentWidget(viewer2)
    assert w2.models.model == str(folder.resolve()) and "(folder)" in dict(
        (ref, label) for label, ref in w2.models.listed())[str(folder.resolve())]


def test_broken_settings_file_is_ignored(make_napari_viewer, shipped):
    from napari_sdunet import settings

    settings.settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings.settings_path().write_text("{not json")
    viewer = make_napari_viewer()
    data, kwargs, _ = load_sample("ct")[0]
    viewer.add_image(data, **kwargs)
    assert SegmentWidget(viewer).models.model == shipped["liver"]


def test_finetune_base_model_follows_the_first_pair(make_napari_viewer, shipped):
    from napari_sdunet.widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in load_sample("ct"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    w = FinetuneWidget(viewer)
    assert w.models.model == shipped["liver"]
    data, kwargs, _ = load_sample("polyps")[0]
    w.pairs[0].image_combo.value = viewer.add_image(data, **kwargs)
    assert w.models.model == shipped["polyps"]


def test_every_picker_refreshes_when_a_model_is_saved(make_napari_viewer, shipped, qtbot):
    import threading

    from napari_sdunet.widgets.finetune import FinetuneWidget

    v1, v2 = make_napari_viewer(), make_napari_viewer()
    pickers = [SegmentWidget(v1).models, FinetuneWidget(v1).models, SegmentWidget(v2).models]
    mine = zoo.user_models_dir() / "polyps-mine"
    saver = threading.Thread(target=make_checkpoint, args=(mine,), kwargs={"task": "polyps"})
    saver.start()  # saved in a worker thread, as fine-tuning does: the zoo signal reaches the GUI thread
    saver.join()
    mine = str(mine)
    qtbot.waitUntil(lambda: all(mine in p.combo.choices for p in pickers), timeout=5000)
    assert "polyps-mine: polyps, no test Dice recorded (yours)" in [label for label, _ in pickers[0].listed()]


def test_liver_models_are_ranked_by_a_validation_metric_they_share(shipped):
    """One liver model validated per CT volume (0.91), another per slice (0.87): ranked by their own
    numbers the first would win by the metric alone. Both record both: the per-volume Dice decides."""
    weights = zoo.PACKAGE_WEIGHTS

    def campaign(name, shipped_val, by_metric):
        cfg_path = weights / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["campaign"] = {"val_dice_shipped": shipped_val, "val_dice_by_metric": by_metric}
        cfg_path.write_text(json.dumps(cfg))

    campaign("sdunet-liver", 0.912, {"group": 0.912, "image": 0.821})
    campaign("unet-liver", 0.869, {"group": 0.916, "image": 0.869})
    assert zoo.best_shipped_for_task("liver") == "unet-liver"
    campaign("unet-liver", 0.869, {"group": 0.905, "image": 0.869})
    assert zoo.best_shipped_for_task("liver") == "sdunet-liver"
    # without a shared metric each model's own validation Dice is all there is
    campaign("unet-liver", 0.969, {"image": 0.969})
    assert zoo.best_shipped_for_task("liver") == "unet-liver"


def test_the_shipped_models_of_a_task_share_a_validation_metric():
    """The real weights: where a task's campaign models were validated by different metrics, every one
    of them records a common one (else the preselection would compare a per-volume with a per-slice Dice)."""
    for task in ("nuclei", "polyps", "liver"):
        sums = [zoo.summary_of(n) for n in zoo.list_pretrained()]
        sums = [s for s in sums if s["task"] == task and s["val_dice"] is not None]
        own = {s.get("val_metric") for s in sums}
        if len(own) > 1:
            assert any(all(m in s["val_dice_by_metric"] for s in sums) for m in ("group", "image")), task
