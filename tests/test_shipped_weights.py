"""Shipped weights: present, loadable without network, and their model-card numbers reproduce."""

import csv
import json
import re

import pytest

from napari_sdunet.cli import main
from napari_sdunet.zoo import PACKAGE_WEIGHTS, list_pretrained, load_pretrained
from tests.conftest import shared_data


def test_every_task_ships_an_sd_model_with_a_card():
    names = list_pretrained()
    for task in ("nuclei", "polyps", "liver"):
        assert f"sdunet-{task}" in names
    total = sum(f.stat().st_size for f in PACKAGE_WEIGHTS.rglob("*") if f.is_file())
    # all twelve networks in fp16 are 174 MiB of weights (sum of 2 bytes x parameters), plus cards
    # and learning curves: a stray fp32 copy or a forgotten state file would exceed this
    assert total < 190 * 2**20
    for name in names:
        card = (PACKAGE_WEIGHTS / name / "README.md").read_text()
        assert "## Data" in card and "## Test metrics" in card and "command:" in card
        cfg = json.loads((PACKAGE_WEIGHTS / name / "config.json").read_text())
        assert cfg["preprocessing"]["input_size"] and cfg["task"] in name


def test_load_pretrained_by_name():
    model, cfg = load_pretrained("sdunet-liver")
    assert cfg["arch"] == "sdunet" and cfg["preprocessing"]["ct_window"] == [-40.0, 160.0]
    assert model.in_channels == 1


def _test_split_links(tmp_path, root):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    with open(root / "split.csv") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                (images / f"{row['id']}.png").symlink_to(root / "images" / f"{row['id']}.png")
                (masks / f"{row['id']}.png").symlink_to(root / "masks" / f"{row['id']}.png")
    return images, masks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet-nuclei", "sdunet-nuclei"])
def test_card_dice_reproduces_with_evaluate(name, tmp_path, capsys):
    """The card's test Dice is what `napari-sdunet evaluate` gives on the test split the card names:
    the full-resolution `nuclei/` set for native-resolution (campaign) models, else `nuclei_96/`."""
    cfg = json.loads((PACKAGE_WEIGHTS / name / "config.json").read_text())
    native = cfg["metrics"].get("protocol") == "native"
    images, masks = _test_split_links(tmp_path, shared_data("nuclei" if native else "nuclei_96"))
    assert main(["evaluate", "--model", name, "--images", str(images), "--masks", str(masks), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    card = (PACKAGE_WEIGHTS / name / "README.md").read_text()
    want = float(re.search(r"per-image Dice:? \*\*([0-9.]+)", card).group(1))
    assert got["n"] == 67
    assert got["dice"] * 100 == pytest.approx(want, abs=0.1)
    assert got["dice"] == pytest.approx(cfg["metrics"]["dice"], abs=1e-3)
