"""Typed task presets and the modality table: one edit adds a modality; config.json records round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_sdunet import tasks
from napari_sdunet.checkpoint import validate_preprocessing
from napari_sdunet.errors import CheckpointError, InputError
from napari_sdunet.inference import effective_preprocessing
from napari_sdunet.preprocess import normalize_intensity
from napari_sdunet.tasks import DEFAULT_CT_WINDOW, MODALITIES, TASKS, Modality, Preprocessing, register_modality
from napari_sdunet.zoo import PACKAGE_WEIGHTS


@pytest.fixture
def mri():
    """A new windowed modality, registered by the one line a contributor would add to tasks.py."""
    yield register_modality(Modality("mri", "MRI (window)", tasks.WINDOW, (0.0, 1000.0)))
    del MODALITIES["mri"]


def test_a_registered_modality_reaches_cli_widget_inference_and_checkpoints(mri):
    from napari_sdunet.cli import build_parser

    args = build_parser().parse_args(["predict", "--model", "m", "--modality", "mri", "in.tif", "--output", "o"])
    assert args.modality == "mri"

    pytest.importorskip("napari")
    from napari_sdunet.widgets.segment import modality_choices

    assert ("MRI (window)", "mri") in modality_choices() and modality_choices()[0] == ("from the model", None)

    prep = effective_preprocessing({"preprocessing": {"channels": 1, "modality": "microscopy"}}, "mri")
    assert prep["modality"] == "mri" and prep["ct_window"] == [0.0, 1000.0]
    x = normalize_intensity(np.array([[-5.0, 500.0, 2000.0]]), prep)
    np.testing.assert_allclose(x, [[0.0, 0.5, 1.0]])
    assert validate_preprocessing({"modality": "mri"})["modality"] == "mri"


def test_unknown_modalities_are_refused_with_the_registered_choices():
    with pytest.raises(InputError, match="choose from microscopy, colonoscopy, ct"):
        effective_preprocessing({"preprocessing": {}}, "mri")
    with pytest.raises(CheckpointError, match="microscopy, colonoscopy, ct or null"):
        validate_preprocessing({"modality": "mri"})
    from napari_sdunet.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--model", "m", "--modality", "mri", "in.tif", "--output", "o"])


def test_the_modality_drives_the_intensity_rule():
    img = np.array([[0, 100, 200]], dtype=np.uint8)
    # a CT record windows (its own window, else the modality's default), whatever the data type
    np.testing.assert_allclose(normalize_intensity(img, {"modality": "ct", "ct_window": [0, 200]}), [[0, 0.5, 1]])
    lo, hi = DEFAULT_CT_WINDOW
    np.testing.assert_allclose(normalize_intensity(np.array([[lo, hi]]), {"modality": "ct"}), [[0, 1]])
    # a microscopy record scales by bit depth, even with a stray window
    np.testing.assert_allclose(normalize_intensity(img, {"modality": "microscopy", "ct_window": [0, 10]}),
                               img / 255.0, rtol=1e-6)
    # no modality (older records): a window if one is set, else bit depth
    np.testing.assert_allclose(normalize_intensity(img, {"ct_window": [0, 200]}), [[0, 0.5, 1]])
    np.testing.assert_allclose(normalize_intensity(img.astype(np.uint16) * 16, {}), img * 16.0 / 4095.0,
                               rtol=1e-6)
    # the record's scale is the first full scale tried (the training data's): 12-bit data of a 12-bit model
    np.testing.assert_allclose(normalize_intensity(np.array([[0, 200]], np.uint16), {"scale": 4095.0}),
                               [[0, 200 / 4095.0]], rtol=1e-6)
    assert normalize_intensity(np.array([[0, 200]], np.uint16), {"scale": 255.0})[0, 1] == pytest.approx(200 / 255)


def test_a_window_given_alone_is_applied_as_before():
    prep = effective_preprocessing({"preprocessing": {"modality": "microscopy", "channels": 1}}, None, (0, 10))
    np.testing.assert_allclose(normalize_intensity(np.array([[5.0]]), prep), [[0.5]])


def test_preprocessing_round_trips_every_shipped_record():
    folders = [p for p in PACKAGE_WEIGHTS.iterdir() if (p / "config.json").is_file()]
    assert folders
    for folder in folders:
        record = json.loads((folder / "config.json").read_text())["preprocessing"]
        five = {k: record[k] for k in ("input_size", "channels", "modality", "scale", "ct_window")}
        assert Preprocessing.from_dict(record).to_dict() == five, folder.name
        assert record["modality"] in MODALITIES


def test_task_presets_are_typed_and_frozen():
    assert list(TASKS) == ["nuclei", "polyps", "liver"]
    liver = TASKS["liver"]
    assert liver.preprocessing.to_dict() == {"input_size": [128, 128], "channels": 1, "modality": "ct",
                                             "scale": None, "ct_window": [-40.0, 160.0]}
    assert TASKS["nuclei"].preprocessing.to_dict() == {"input_size": [96, 96], "channels": 3,
                                                       "modality": "microscopy", "scale": 255.0, "ct_window": None}
    assert (TASKS["polyps"].lr, TASKS["polyps"].batch_size, TASKS["nuclei"].sdn_n_layers) == (1e-4, 20, 2)
    with pytest.raises(AttributeError):
        liver.depth = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="default window"):
        Modality("x", "x", tasks.WINDOW)
