"""``napari-sdunet predict`` and ``evaluate`` on files of every supported kind, with exact expected scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_sdunet import io
from napari_sdunet.cli import main
from tests.conftest import shared_data
from tests.test_inference import make_checkpoint


def _masks(tmp_path):
    """Images (PNG, JPEG, TIFF; various sizes) and masks with known foreground counts."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    fg = {}
    for name, (h, w), ext, mext in [("a", (40, 60), "png", "png"), ("b", (97, 33), "jpg", "png"),
                                    ("c", (64, 64), "tif", "tif")]:
        io.write_image(images / f"{name}.{ext}", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        m = np.zeros((h, w), np.uint8)
        m[: h // 3, : w // 2] = 255
        io.write_image(masks / f"{name}.{mext}", m)
        fg[name] = (int((m > 0).sum()), h * w)
    io.write_image(images / "no_mask.png", np.zeros((8, 8), np.uint8))
    return images, masks, fg


def test_evaluate_all_foreground_model_scores_exactly(tmp_path, capsys):
    images, masks, fg = _masks(tmp_path)
    model = make_checkpoint(tmp_path / "all_fg", bias=10.0)
    assert main(["evaluate", "--model", str(model), "--images", str(images), "--masks", str(masks),
                 "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    dice = [2 * g / (g + n) for g, n in fg.values()]  # prediction = every pixel
    jac = [g / n for g, n in fg.values()]
    assert result["n"] == 3
    assert result["dice"] == pytest.approx(np.mean(dice))
    assert result["jaccard"] == pytest.approx(np.mean(jac))
    assert "no_mask" in captured.err  # unmatched image reported, not scored


def test_evaluate_nifti_volumes(tmp_path, capsys):
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    for name, z in (("v1", 5), ("v2", 3)):
        ct = np.full((z, 32, 32), -1000, np.int16)
        ct[:, 8:24, 8:24] = 100
        io.write_nifti(tmp_path / "images" / f"{name}.nii.gz", ct, affine=affine)
        m = np.zeros_like(ct, dtype=np.uint8)
        m[1:, 8:24, 8:24] = 1
        io.write_nifti(tmp_path / "masks" / f"{name}.nii.gz", m, affine=affine)
    model = make_checkpoint(tmp_path / "none", task="liver", bias=-10.0)  # predicts nothing
    assert main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {**result, "n": 2, "dice": 0.0, "jaccard": 0.0}
    # --tta cannot mirror CT slices (the anatomy has a side): said, not silently ignored
    assert main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--json", "-q", "--tta"]) == 0
    captured = capsys.readouterr()
    assert "--tta has no effect" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["dice"] == 0.0


def test_evaluate_per_slice_rows_in_output_json_and_csv(tmp_path, capsys):
    """--per-slice: each slice with foreground in either mask, scored exactly, in all three outputs."""
    import csv

    from napari_sdunet.metrics import metric_rows

    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    ct = np.full((4, 32, 32), 100, np.int16)
    io.write_nifti(tmp_path / "images" / "v.nii.gz", ct, affine=affine)
    m = np.zeros((4, 32, 32), np.uint8)
    m[1, :16] = 1  # half of slice 1
    m[3] = 1  # all of slice 3; slices 0 and 2: foreground in the prediction only
    io.write_nifti(tmp_path / "masks" / "v.nii.gz", m, affine=affine)
    io.write_image(tmp_path / "images" / "flat.png", np.zeros((20, 30), np.uint8))
    io.write_image(tmp_path / "masks" / "flat.png", np.full((20, 30), 255, np.uint8))
    model = make_checkpoint(tmp_path / "all_fg", task="liver", bias=10.0)  # predicts every voxel
    table = tmp_path / "out" / "scores.csv"
    assert main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--per-slice", "--csv", str(table), "--json"]) == 0
    out = capsys.readouterr().out
    expected, n_empty = metric_rows(np.ones_like(m), m)
    assert n_empty == 0 and [r["row"] for r in expected] == ["slice 0", "slice 1", "slice 2", "slice 3", "overall"]
    assert [r["dice"] for r in expected[:4]] == [0.0, pytest.approx(2 * 512 / (512 + 1024)), 0.0, 1.0]
    assert "  slice 1: dice 0.6667 jaccard 0.5000 (TP 512 FP 512 FN 0)" in out
    assert expected[-1]["dice"] == pytest.approx(2 * 1536 / (2 * 1536 + 2560))  # TP 512 + 1024, FP 4096 - 1536
    assert "v.nii.gz: dice 0.5455" in out and "flat.png: dice 1.0000" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["per_slice"] == [{"image": "v.nii.gz", "mask": "v.nii.gz", **r} for r in expected[:4]]
    rows = list(csv.DictReader(open(table)))
    assert [(r["image"], r["row"]) for r in rows] == [("flat.png", "overall")] + [
        ("v.nii.gz", r["row"]) for r in expected]
    assert rows[2]["dice"] == "0.6667" and rows[2]["TP"] == "512" and rows[-1]["dice"] == "0.5455"
    # without --per-slice: one row per image, and no per-slice lines or JSON key
    assert main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--csv", str(table), "--json"]) == 0
    out = capsys.readouterr().out
    assert "  slice" not in out and "per_slice" not in json.loads(out.strip().splitlines()[-1])
    assert [r["row"] for r in csv.DictReader(open(table))] == ["overall", "overall"]
    rc = main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
               "--masks", str(tmp_path / "masks"), "--csv", str(tmp_path)])
    assert rc != 0 and "is a folder" in capsys.readouterr().err


def test_predict_writes_masks_in_source_space(tmp_path, capsys):
    import nibabel as nib

    images, _, _ = _masks(tmp_path)
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    ct = np.zeros((4, 24, 20), np.int16)
    io.write_nifti(images / "vol.nii.gz", ct, affine=affine)
    model = make_checkpoint(tmp_path / "all_fg", bias=10.0)
    liver = make_checkpoint(tmp_path / "liver", task="liver", bias=10.0)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), str(images / "a.png"), str(images / "b.jpg"),
                 str(images / "c.tif"), "--output", str(out)]) == 0
    assert main(["predict", "--model", str(liver), str(images / "vol.nii.gz"), "-o", str(out),
                 "--probabilities"]) == 0
    a = io.read_image(out / "a.png").data
    assert a.shape == (40, 60) and a.min() == 255
    assert io.read_image(out / "b.png").data.shape == (97, 33)
    vol = nib.load(str(out / "vol.nii.gz"))
    assert np.allclose(vol.affine, affine) and np.asarray(vol.dataobj).shape == (20, 24, 4)
    assert np.asarray(vol.dataobj).min() == 1
    assert (out / "vol_prob.nii.gz").is_file()
    # a grey TIFF stack is segmented slice by slice and written as a TIFF stack
    io.write_image(tmp_path / "stack.tif", np.zeros((3, 20, 30), np.uint16))
    assert main(["predict", "--model", str(model), str(tmp_path / "stack.tif"), "-o", str(out)]) == 0
    stack = io.read_image(out / "stack.tif")
    assert stack.data.shape == (3, 20, 30) and stack.data.min() == 1


def test_user_errors_are_messages_not_tracebacks(tmp_path, capsys):
    images, masks, _ = _masks(tmp_path)
    rc = main(["evaluate", "--model", str(tmp_path / "nope"), "--images", str(images), "--masks", str(masks)])
    assert rc == 1 and "no model named" in capsys.readouterr().err
    model = make_checkpoint(tmp_path / "m")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["evaluate", "--model", str(model), "--images", str(empty), "--masks", str(masks)])
    assert rc == 1 and "no image" in capsys.readouterr().err
    rc = main(["predict", "--model", str(model), str(images / "a.png"), "-o", str(images)])
    assert rc == 1 and "overwrite" in capsys.readouterr().err


def test_evaluate_real_nuclei_pairs(tmp_path, capsys):
    """Real DSB2018 pairs at full resolution run end to end; the scores equal a direct computation."""
    from napari_sdunet.inference import load_model, predict, to_labels
    from napari_sdunet.metrics import dice

    root = shared_data("nuclei")
    names = sorted(p.name for p in (root / "images").iterdir())[:2]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).symlink_to(root / sub / n)
    model = make_checkpoint(tmp_path / "m", base_filters=8)
    assert main(["evaluate", "--model", str(model), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_model(model, "cpu")
    direct = [dice(to_labels(predict(loaded, io.read_image(root / "images" / n).data, "YXC")),
                   io.read_mask(root / "masks" / n)) for n in names]
    assert result["n"] == 2 and result["dice"] == pytest.approx(np.mean(direct))


def test_predict_precision_option(tmp_path, capsys, precision_calls):
    # --precision fp32|bf16|auto reaches inference (bf16 autocast on CPU); a wrong value is a usage error
    images, _, _ = _masks(tmp_path)
    model = make_checkpoint(tmp_path / "all_fg", bias=10.0)
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"out_{precision}"
        assert main(["predict", "--model", str(model), str(images / "a.png"), "-o", str(out),
                     "--device", "cpu", "--precision", precision]) == 0
        assert io.read_image(out / "a.png").data.min() == 255
    assert precision_calls == ["fp32", "bf16"]
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(model), str(images / "a.png"), "--precision", "fp16"])
    assert exc.value.code == 2 and "fp16" in capsys.readouterr().err
