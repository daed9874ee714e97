"""Reproduction table/plot and shipping a run as a package model (tiny real runs)."""

from __future__ import annotations

import json

from napari_sdunet.checkpoint import load_checkpoint
from tests.conftest import shared_data
from training.reproduce import PAPER_TABLE2, make_table, reproduce
from training.ship import ship


def _kw(root):
    return dict(data_root=str(root), max_steps=2, batch_size=4, val_every=1, limit_train=8, limit_val=4,
                limit_test=4, patience=None, model_overrides={"base_filters": 8, "depth": 2}, threads=1)


def test_reproduce_table_plot_and_ship(tmp_path):
    root = shared_data("nuclei_96").parent
    out = tmp_path / "repro"
    rows = reproduce("nuclei", 2, out, archs=["unet"], spec_kwargs=_kw(root), progress=False)
    assert [r["seed"] for r in rows] == [0, 1]
    table = (out / "table.md").read_text()
    assert "| U-Net | 2 |" in table and "91.79 ± 0.32" in table
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().count("\n") == 3
    # a second call reuses the finished runs
    mtime = (out / "unet" / "run0" / "metrics.json").stat().st_mtime
    reproduce("nuclei", 2, out, archs=["unet"], spec_kwargs=_kw(root), progress=False)
    assert (out / "unet" / "run0" / "metrics.json").stat().st_mtime == mtime

    from training.report import runs_block

    block = runs_block("nuclei", out)
    assert "### nuclei" in block and "| U-Net run0 | 2 |" in block and "| U-Net run1 | 2 |" in block

    folder = ship(out / "unet" / "run0", name="unet-nuclei", data_root=str(root), dest=tmp_path / "weights")
    model, config = load_checkpoint(folder)
    assert config["weights"]["dtype"] == "float16" and config["preprocessing"]["input_size"] == [96, 96]
    card = (folder / "README.md").read_text()
    assert "per-image Dice" in card and "python -m training fit" in card and "CC0" in card
    run_dice = json.loads((out / "unet/run0/metrics.json").read_text())["test"]["dice"]
    assert abs(config["metrics"]["dice"] - run_dice) < 0.02  # fp16 weights score like the fp32 run
    cheap = ship(out / "unet" / "run1", name="unet-nuclei-2", data_root=str(root), dest=tmp_path / "weights",
                 reuse_metrics=True)
    _, cfg2 = load_checkpoint(cheap)
    assert cfg2["metrics"]["fp16_check"]["max_abs_prob_diff"] < 0.01
    assert "fp16 storage" in (cheap / "README.md").read_text()


def test_table_lists_paper_values():
    rows = [{"arch": "sdunet", "dice": 90.0, "jaccard": 82.0, "global_dice": 91.0, "paper_batch_dice": 92.0},
            {"arch": "sdunet", "dice": 92.0, "jaccard": 84.0, "global_dice": 93.0, "paper_batch_dice": 94.0}]
    t = make_table("polyps", rows)
    assert "| SDU-Net | 2 | 91.00 ± 1.41 | 83.00 ± 1.41 |" in t and "80.62 ± 0.79" in t
    assert set(PAPER_TABLE2) == {"nuclei", "polyps", "liver"}


def test_cli_fit_then_evaluate(tmp_path, capsys):
    from training.__main__ import main

    root = str(shared_data("nuclei_96").parent)
    out = tmp_path / "run"
    assert main(["fit", "--task", "nuclei", "--arch", "unet", "--base-filters", "8", "--data-root", root,
                 "--limit-train", "8", "--limit-val", "4", "--limit-test", "4", "--max-steps", "2",
                 "--batch-size", "4", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert main(["evaluate", str(out / "model"), "--data-root", root, "--limit-test", "4",
                 "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["n"] == 4
    assert abs(saved["dice"] - json.loads((out / "metrics.json").read_text())["test"]["dice"]) < 1e-6


def test_liver_paper_window_from_hu_volumes(tmp_path):
    """Train on LiTS-layout HU volumes through the paper's window [-1000, 1000]; config and test use it."""
    import shutil

    import nibabel as nib
    import numpy as np

    from training.__main__ import main

    src = shared_data("liver")
    ct = np.asarray(nib.load(str(src / "images" / "ircadb1_07.nii.gz")).dataobj)[:, :, 60:64]
    seg = np.asarray(nib.load(str(src / "masks" / "ircadb1_07.nii.gz")).dataobj)[:, :, 60:64]
    lits = tmp_path / "lits"
    lits.mkdir()
    for n in (3, 40, 41):  # 3: paper test volume; 40, 41: train/val volumes of lits_paper_split.csv
        nib.save(nib.Nifti1Image(ct.astype(np.int16), np.eye(4)), str(lits / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), str(lits / f"segmentation-{n}.nii"))
    shutil.copy(src / "lits_paper_split.csv", lits / "lits_paper_split.csv")
    out = tmp_path / "run"
    assert main(["fit", "--task", "liver", "--arch", "unet", "--base-filters", "4", "--source", str(lits),
                 "--test-source", str(lits), "--ct-window", "-1000", "1000", "--max-steps", "1",
                 "--batch-size", "4", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    _, config = load_checkpoint(out / "model")
    assert config["preprocessing"]["ct_window"] == [-1000.0, 1000.0]
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["ct_window"] == [-1000.0, 1000.0] and [v["id"] for v in test["volumes"]] == ["volume-3"]


def test_paired_block_compares_same_seeds(tmp_path):
    from training.report import paired_block

    dice = {("unet", 0): 0.80, ("unet", 1): 0.70, ("sdunet", 0): 0.85, ("sdunet", 1): 0.68, ("sdunet", 2): 0.9}
    for (arch, seed), d in dice.items():
        run = tmp_path / arch / f"run{seed}"
        run.mkdir(parents=True)
        rec = {"spec": {"arch": arch, "seed": seed}, "fit": {"steps": 1, "seconds": 1.0},
               "test": {"dice": d, "jaccard": d, "global_dice": d, "paper_batch_dice": d}}
        (run / "metrics.json").write_text(json.dumps(rec))
    block = paired_block("nuclei", tmp_path)
    # seed 2 has no U-Net partner: left out; differences +5 and -2 points
    assert "| SDU-Net − U-Net | 2 | +1.50 ± 4.95 | 1 of 2 |" in block and "U-Net++" not in block
