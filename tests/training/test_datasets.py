"""Data loaders: our layouts and the original download layouts (tiny fake trees built from real images)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import shared_data
from training.datasets import (
    ct_prep,
    cvc_sequence_split,
    detect_layout,
    load_split,
    load_volumes,
    random_split,
    read_volume,
    spread,
)


def _split_table(path):
    with open(path, newline="") as f:
        return {r["id"]: r["split"] for r in csv.DictReader(f)}


def test_nuclei_96_split_and_shapes():
    root = shared_data("nuclei_96")
    ds = load_split("nuclei", "test", data_root=root.parent, limit=6)
    assert len(ds) == 6 and ds.images.shape == (6, 3, 96, 96) and ds.masks.shape == (6, 1, 96, 96)
    x, y = ds[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and set(y.unique().tolist()) <= {0.0, 1.0}
    table = _split_table(root / "split.csv")
    assert all(table[i] == "test" for i in ds.ids)


def test_random_split_reproduces_the_shared_nuclei_split():
    table = _split_table(shared_data("nuclei_96") / "split.csv")
    assert random_split(list(table)) == table


def test_cvc_sequence_split_reproduces_the_shared_polyp_split():
    root = shared_data("polyps")
    with open(root / "sequences.csv", newline="") as f:
        shared = {int(r["sequence"]): r["split"] for r in csv.DictReader(f)}
    assert cvc_sequence_split() == shared


def test_full_resolution_nuclei_are_resized():
    root = shared_data("nuclei")
    ds = load_split("nuclei", "val", source=root, limit=2)
    assert ds.images.shape == (2, 3, 96, 96)


def test_dsb2018_download_layout(tmp_path):
    src = shared_data("nuclei")
    labels_dir = src / "labels"
    ids = sorted(p.stem for p in (src / "images").iterdir())[:4]
    for i in ids:
        (tmp_path / "stage1_train" / i / "images").mkdir(parents=True)
        (tmp_path / "stage1_train" / i / "masks").mkdir()
        rgba = np.asarray(Image.open(src / "images" / f"{i}.png").convert("RGBA"))
        Image.fromarray(rgba).save(tmp_path / "stage1_train" / i / "images" / f"{i}.png")
        lab = np.asarray(Image.open(labels_dir / f"{i}.png"))
        for k in np.unique(lab)[1:4]:  # three nuclei, one mask file each (as in DSB2018)
            m = Image.fromarray(((lab == k) * 255).astype(np.uint8))
            m.save(tmp_path / "stage1_train" / i / "masks" / f"m{k}.png")
    assert detect_layout(tmp_path) == "dsb2018"
    table = random_split(ids)
    want = [i for i in ids if table[i] == "train"]
    ds = load_split("nuclei", "train", source=tmp_path, size=(64, 64))
    assert ds.ids == want and ds.images.shape == (len(want), 3, 64, 64)
    lab = np.asarray(Image.open(labels_dir / f"{want[0]}.png"))
    union = np.isin(lab, np.unique(lab)[1:4]).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(union)[None, None], size=(64, 64), mode="bilinear",
                                          antialias=True) >= 0.5
    assert torch.equal(ds.masks[0, 0].bool(), ref[0, 0])


def test_cvc_clinicdb_download_layout(tmp_path):
    src = shared_data("polyps")
    (tmp_path / "Original").mkdir()
    (tmp_path / "Ground Truth").mkdir()
    frames = [1, 2, 30, 31]  # sequence 1 (test) and 2 (train)
    for n in frames:
        Image.open(src / "images" / f"{n}.png").save(tmp_path / "Original" / f"{n}.tif")
        Image.open(src / "masks" / f"{n}.png").save(tmp_path / "Ground Truth" / f"{n}.tif")
    assert detect_layout(tmp_path) == "cvc_clinicdb"
    test = load_split("polyps", "test", source=tmp_path)
    ours = load_split("polyps", "test", source=src, limit=None)
    assert test.ids == ["1", "2"] and test.images.shape == (2, 3, 144, 192)
    k = ours.ids.index("1")
    assert torch.equal(test.images[0], ours.images[k]) and torch.equal(test.masks[0], ours.masks[k])
    assert load_split("polyps", "train", source=tmp_path).ids == ["30", "31"]


def test_lits_download_layout_and_window(tmp_path):
    import nibabel as nib

    src = shared_data("liver")
    img = nib.load(str(src / "images" / "ircadb1_07.nii.gz"))
    ct = np.asarray(img.dataobj)[:, :, 60:66]
    seg = np.asarray(nib.load(str(src / "masks" / "ircadb1_07.nii.gz")).dataobj)[:, :, 60:66]
    aff = img.affine  # stored in the training orientation: read as stored
    nib.save(nib.Nifti1Image(ct.astype(np.int16), aff), str(tmp_path / "volume-3.nii"))
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), aff), str(tmp_path / "segmentation-3.nii"))
    nib.save(nib.Nifti1Image(ct.astype(np.int16), aff), str(tmp_path / "volume-40.nii"))
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), aff), str(tmp_path / "segmentation-40.nii"))
    shutil.copy(src / "lits_paper_split.csv", tmp_path / "lits_paper_split.csv")
    assert detect_layout(tmp_path) == "lits"
    vols = load_volumes(tmp_path, "test")
    assert [v[0] for v in vols] == ["volume-3"]  # LiTS batch 1 is the paper's test set
    vid, arr, mask = vols[0]
    assert np.array_equal(arr[2], ct[:, :, 2].T) and np.array_equal(mask[2], seg[:, :, 2].T > 0)
    # the same scan stored with another orientation (RAS: x and y flipped) reads back the same
    flip = aff @ np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = aff[:3, :3] @ (np.array(ct.shape) - 1) * [1, 1, 0] + aff[:3, 3]
    ras = tmp_path / "ras"
    ras.mkdir()
    nib.save(nib.Nifti1Image(ct[::-1, ::-1].astype(np.int16), flip), str(ras / "volume-3.nii"))
    nib.save(nib.Nifti1Image(seg[::-1, ::-1].astype(np.uint8), flip), str(ras / "segmentation-3.nii"))
    shutil.copy(src / "lits_paper_split.csv", ras / "lits_paper_split.csv")
    _, arr2, mask2 = load_volumes(ras, "test")[0]
    assert np.array_equal(arr2, arr) and np.array_equal(mask2, mask)
    ds = load_split("liver", ["train", "val"], source=tmp_path, ct_window=(-40, 160))
    assert ds.images.shape == (6, 1, 128, 128) and set(ds.groups) == {"volume-40"}
    assert ds.masks.sum() > 0
    # the window: -40 HU -> 0, 160 HU -> 1, clipped outside
    from napari_sdunet.preprocess import normalize_intensity

    hu = np.array([[-1000, -40, 60, 160, 900]], np.int16)
    assert np.allclose(normalize_intensity(hu, ct_prep(None, (-40, 160))), [[0, 0, 0.5, 1, 1]])
    # paper's window is an option
    wide = load_split("liver", "train", source=tmp_path, ct_window=(-1000, 1000))
    assert not torch.equal(wide.images, ds.images)


def test_hu_volume_folder_and_lits_slices():
    vols = load_volumes(shared_data("liver"), "test", limit=1)
    assert vols[0][0] == "ircadb1_01" and vols[0][1].shape[1:] == (256, 256) and vols[0][2].any()
    assert read_volume(shared_data("liver", "images", "ircadb1_01.nii.gz")).dtype == np.int16
    ds = load_split("liver", "val", data_root=shared_data("liver_lits_slices").parent, limit=20)
    assert ds.images.shape == (20, 1, 128, 128) and len(set(ds.groups)) > 1  # spread over volumes


def test_spread():
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], None) == [1, 2]


def test_clear_errors(tmp_path):
    from training.datasets import DataError

    with pytest.raises(DataError, match="not found"):
        load_split("nuclei", "train", source=tmp_path / "nope")
    with pytest.raises(DataError, match="unknown task"):
        load_split("brain", "train")
    with pytest.raises(DataError, match="layout"):
        load_split("nuclei", "train", source=tmp_path)


def test_a_training_sample_and_an_inference_input_run_through_the_same_function(tmp_path, monkeypatch):
    """Training data is preprocessed by the engine's to_model_input, the function inference feeds the
    model with: counted on both paths, and the stored sample equals the inference input (8-bit)."""
    import napari_sdunet.preprocess as pp
    from napari_sdunet import create_model, save_checkpoint
    from napari_sdunet.inference import load_model, predict

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(((img[..., 0] > 128) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "split.csv").write_text("id,split\na,train\n")
    calls = []
    real = pp.to_model_input

    def counted(image, prep, channel_axis=None):
        calls.append(np.shape(image))
        return real(image, prep, channel_axis)

    monkeypatch.setattr(pp, "to_model_input", counted)
    ds = load_split("polyps", "train", source=tmp_path, size=(32, 48))
    assert calls == [(40, 52, 3)]
    prep = {"input_size": [32, 48], "channels": 3}
    want = real(img, prep, channel_axis=True)
    assert torch.allclose(ds[0][0], want, atol=0.5 / 255 + 1e-6)
    folder = save_checkpoint(create_model("unet", "polyps", base_filters=4, depth=2), tmp_path / "m",
                             task="polyps", preprocessing=dict(prep, modality="colonoscopy", scale=255.0))
    predict(load_model(folder, "cpu"), img, "YXC")
    assert calls == [(40, 52, 3), (40, 52, 3)]
