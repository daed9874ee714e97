"""Image/NIfTI I/O, the napari reader and writer, and the sample data."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sdunet import io
from napari_sdunet._reader import get_reader, layer_data
from napari_sdunet._sample_data import load_sample, sample_path
from napari_sdunet._writer import write_labels


def test_suffix_and_stem():
    assert io.suffix("a/b.NII.GZ") == ".nii.gz" and io.stem("a/b.c.nii.gz") == "b.c"
    assert io.stem("x/1.png") == "1" and io.suffix("x/1.TIF") == ".tif"


def test_png_tiff_roundtrip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    io.write_image(tmp_path / "a.png", rgb)
    vol = io.read_image(tmp_path / "a.png")
    assert vol.axes == "YXC" and np.array_equal(vol.data, rgb)
    stack = np.random.default_rng(1).integers(0, 4000, (4, 20, 30), dtype=np.uint16)
    io.write_image(tmp_path / "s.tif", stack)
    vol = io.read_image(tmp_path / "s.tif")
    assert vol.data.shape == (4, 20, 30) and np.array_equal(vol.data, stack)
    mask = np.zeros((20, 30), bool)
    mask[5:10] = True
    io.write_mask_like(tmp_path / "m.png", mask.astype(np.uint8), vol)
    assert set(np.unique(io.read_image(tmp_path / "m.png").data)) == {0, 255}
    assert np.array_equal(io.read_mask(tmp_path / "m.png"), mask)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_corrupt_files_give_value_errors(tmp_path):
    for name in ("bad.png", "bad.tif", "bad.nii.gz"):
        (tmp_path / name).write_bytes(b"garbage")
        with pytest.raises(ValueError, match="cannot read"):
            io.read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        io.read_image(tmp_path / "missing.png")


def test_nifti_roundtrip_keeps_affine_and_header(tmp_path):
    import nibabel as nib

    src = sample_path("ct_image.nii.gz")
    vol = io.read_nifti(src)
    assert vol.data.shape == (30, 128, 128) and vol.axes == "ZYX"
    raw = np.asarray(nib.load(str(src)).dataobj)
    assert np.array_equal(vol.data[7], raw[:, :, 7].T)  # slice k is nifti[:, :, k].T
    assert vol.spacing == (3.0, 3.0, 3.0)
    mask = (vol.data > 100).astype(np.uint8)
    out = io.write_mask_like(tmp_path / "ct_mask.nii.gz", mask, vol)
    back = nib.load(str(out))
    assert np.allclose(back.affine, nib.load(str(src)).affine)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj).T, mask)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import nibabel as nib

    target = tmp_path / "m.nii.gz"
    io.write_nifti(target, np.ones((2, 3, 4), np.uint8))
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_nifti(target, np.zeros((2, 3, 4), np.uint8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


def test_reader_and_writer(tmp_path):
    import nibabel as nib

    assert get_reader("x.png") is None and get_reader("x.nii.gz") is not None
    data, kw, kind = layer_data(sample_path("ct_image.nii.gz"))
    assert kind == "image" and kw["scale"] == [3.0, 3.0, 3.0] and kw["axis_labels"] == ["z", "y", "x"]
    affine = nib.load(str(sample_path("ct_image.nii.gz"))).affine
    assert kw["translate"] == pytest.approx(list(affine[:3, 3][::-1]))
    mdata, mkw, mkind = layer_data(sample_path("ct_liver_mask.nii.gz"))
    assert mkind == "labels" and mdata.shape == data.shape
    # writing a labels layer back: the source affine is used
    paths = write_labels(str(tmp_path / "liver.nii.gz"), mdata, {"metadata": mkw["metadata"]})
    assert np.allclose(nib.load(paths[0]).affine, affine)
    # without NIfTI metadata the affine comes from scale/translate
    paths = write_labels(str(tmp_path / "plain.nii.gz"), mdata, {"scale": (2.0, 1.0, 0.5), "translate": (0, 0, 0)})
    assert np.allclose(np.diag(nib.load(paths[0]).affine)[:3], [0.5, 1.0, 2.0])
    paths = write_labels(str(tmp_path / "liver.tif"), mdata, {})
    assert np.array_equal(io.read_image(paths[0]).data, mdata)
    # a TIFF stack of labels reads back as labels
    _, _, kind = layer_data(paths[0])
    assert kind == "labels"


@pytest.mark.parametrize("name,shapes", [("nuclei", [(256, 256, 3), (256, 256)]),
                                         ("polyps", [(288, 384, 3), (288, 384)]),
                                         ("ct", [(30, 128, 128), (30, 128, 128)])])
def test_samples_load(name, shapes):
    layers = load_sample(name)
    assert [d.shape for d, _, _ in layers] == shapes
    assert [k for _, _, k in layers] == ["image", "labels"]
    assert layers[1][0].max() > 0


def test_natural_key_orders_numbers_as_numbers():
    names = ["frame10", "Frame2", "frame1", "volume-100", "volume-9"]
    assert sorted(names, key=io.natural_key) == ["frame1", "Frame2", "frame10", "volume-9", "volume-100"]
