"""Campaign runs on another machine: pack the data and start weights, train from the pack, export the
best weights in small files, import and ship them here, continue on the CPU; and --max-minutes.

Runs on the blob data set that test_campaign makes (no ../shared, no GPU needed).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.training.test_campaign import TOML, StopAfter, make_blobs
from training import campaign
from training import campaign_device as dev
from training.campaign import CampaignError, load_campaign, main, recipe_split, run_campaign, status_rows, train_run

RESIZED = """
[recipe.blobs-resized]
task = "nuclei"
source = "blobs"
input_size = [32, 32]
batch_size = 4
lr = 3e-3
warmup_steps = 2
val_every = 4
patience = 100
model = { base_filters = 4 }

[[run]]
name = "unetpp-nuclei"
arch = "unet"
recipe = "blobs-resized"
steps = 4
"""


def _camp(tmp_path, runs="runs", steps=8, extra=""):
    toml = tmp_path / "c.toml"
    toml.write_text(TOML.format(runs=(tmp_path / runs).as_posix(), steps=steps, every=0.0) + extra)
    return load_campaign(toml), toml


def _same(a, b) -> None:
    assert a.ids == b.ids and a.groups == b.groups and len(a) == len(b)
    for x, y in ((a.images, b.images), (a.masks, b.masks)):
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(x, y))


def test_a_pack_holds_the_same_tensors_as_the_data_folders(tmp_path, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    camp, _ = _camp(tmp_path, extra=RESIZED)
    out = dev.pack_runs(camp, ["unet-nuclei", "unetpp-nuclei"], tmp_path / "pack", data_root=str(data))
    assert out["runs"] == ["unet-nuclei", "unetpp-nuclei"] and len(out["data"]) == 4 and out["weights"] == []
    for entry in camp.runs:  # native sizes (a list of tensors) and resized (one stacked tensor)
        for split in ("train", "val"):
            _same(dev.packed_split(tmp_path / "pack", entry, split), recipe_split(entry, split, str(data)))
    assert not (tmp_path / "pack.tmp").exists()
    # a broken copy is refused, and a split the pack lacks is named
    f = next((tmp_path / "pack" / "data").glob("nuclei-train-*.npz"))
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CampaignError, match="checksum"):
        for entry in camp.runs:
            dev.packed_split(tmp_path / "pack", entry, "train")
    with pytest.raises(CampaignError, match="holds no val split"):
        dev.packed_split(tmp_path / "pack", camp.runs[0], "val", limit=2)
    with pytest.raises(CampaignError, match="not a campaign pack"):
        dev.packed_split(tmp_path, camp.runs[0], "val")


def test_a_pack_over_its_size_limit_is_refused_and_leaves_nothing(tmp_path, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    camp, _ = _camp(tmp_path)
    with pytest.raises(CampaignError, match="over --max-mb"):
        dev.pack_runs(camp, ["unet-nuclei"], tmp_path / "pack", data_root=str(data), max_mb=0.001)
    assert not (tmp_path / "pack").exists() and not (tmp_path / "pack.tmp").exists()
    with pytest.raises(CampaignError, match="no run named nope"):
        dev.pack_runs(camp, ["nope"], tmp_path / "pack", data_root=str(data))


@pytest.mark.slow
def test_training_from_a_pack_equals_training_from_the_data(tmp_path, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    camp, _ = _camp(tmp_path, steps=4)
    dev.pack_runs(camp, ["unet-nuclei"], tmp_path / "pack", data_root=str(data))
    entry = camp.runs[0]
    a = train_run(entry, camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    from safetensors.torch import load_file

    first = load_file(str(camp.run_dir(entry) / "model" / "model.safetensors"))
    shutil.rmtree(camp.run_dir(entry))
    b = train_run(entry, camp, data_root=str(tmp_path / "nowhere"), pack=str(tmp_path / "pack"), threads=1,
                  precision="fp32", progress=False)
    second = load_file(str(camp.run_dir(entry) / "model" / "model.safetensors"))
    assert a["best_val_dice"] == b["best_val_dice"] and a["step"] == b["step"] == 4
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_export_import_ship_and_continue_here(tmp_path, monkeypatch, one_torch_thread):
    """A run stopped elsewhere at step 4 comes back in small files, ships with --partial and continues."""
    import training.campaign_ship as ship

    data = make_blobs(tmp_path / "data")
    weights = tmp_path / "weights"
    monkeypatch.setattr(campaign, "shipped_folder", lambda e: weights / e.name)
    monkeypatch.setattr(ship, "shipped_folder", lambda e: weights / e.name)
    monkeypatch.setattr(dev, "shipped_folder", lambda e: weights / e.name)
    there, _ = _camp(tmp_path, runs="there", steps=8)
    # "the lent machine": trains from a pack until its time is up (here: after 4 steps), saves, exports
    dev.pack_runs(there, ["unet-nuclei"], tmp_path / "pack", data_root=str(data))
    entry = there.runs[0]
    train_run(entry, there, pack=str(tmp_path / "pack"), threads=1, precision="fp32", progress=False,
              stop=StopAfter(4))
    meta = json.loads((there.run_dir(entry) / "state" / "state.json").read_text())
    assert meta["step"] == 4 and not (there.run_dir(entry) / "done.json").exists()
    warned = dev.pack_runs(there, ["unet-nuclei"], tmp_path / "pack-late", data_root=str(data))["warnings"]
    assert "step 4 here is not carried" in warned["unet-nuclei"]  # progress a new pack would not take along
    out = dev.export_runs(there, ["unet-nuclei"], tmp_path / "OUT", max_part_mb=0.05)
    parts = sorted((tmp_path / "OUT").glob("unet-nuclei.part*.safetensors"))
    assert out["unet-nuclei"]["files"] == 1 + len(parts) and len(parts) > 1
    assert all(p.stat().st_size <= 0.05 * 2**20 + 8192 for p in parts)  # + the safetensors header

    # "here": a tampered part is refused, then the run folder is made, shipped, and continued
    here, _ = _camp(tmp_path, runs="here", steps=8)
    good = parts[0].read_bytes()
    parts[0].write_bytes(good[:-4] + b"\0\0\0\0")
    with pytest.raises(CampaignError, match="checksum"):
        dev.import_runs(here, tmp_path / "OUT")
    parts[0].write_bytes(good)
    res = dev.import_runs(here, tmp_path / "OUT")["unet-nuclei"]
    assert res["finished"] is False and res["step"] == meta["step"] and res["next"].endswith("--partial")
    from safetensors.torch import load_file

    best = {k[5:]: v for k, v in load_file(str(there.run_dir(entry) / "state" / "state.safetensors")).items()
            if k.startswith("best.")}
    got = load_file(str(here.run_dir(entry) / "model" / "model.safetensors"))
    assert all(torch.equal(best[k], got[k]) for k in best)
    row = next(r for r in status_rows(here) if r["run"] == "unet-nuclei")
    assert row["state"] == "imported" and row["step"] == meta["step"]
    folder = ship.ship_run(here.runs[0], here, data_root=str(data), partial=True, force=True,
                           dest=tmp_path / "shipped-elsewhere")  # (nothing in the package: the import leads)
    assert json.loads((folder / "config.json").read_text())["campaign"]["step"] == meta["step"]
    # the run's own state here is never overwritten silently
    (here.run_dir(entry) / "state").mkdir()
    with pytest.raises(CampaignError, match="--force"):
        dev.import_runs(here, tmp_path / "OUT")
    dev.import_runs(here, tmp_path / "OUT", force=True)
    assert not (here.run_dir(entry) / "state").exists()
    rec = train_run(here.runs[0], here, data_root=str(data), threads=1, precision="fp32", progress=False)
    log = (here.run_dir(entry) / "log.txt").read_text()
    assert "warm start from the weights imported from" in log and rec["finished"] and rec["step"] == 8
    assert [c["step"] for c in rec["continued"]] == [meta["step"]]
    # a pack for the next lent machine carries the shipped weights the run continues from
    ship.ship_run(here.runs[0], here, data_root=str(data), force=True)
    out = dev.pack_runs(here, ["unet-nuclei"], tmp_path / "pack2", data_root=str(data))
    assert out["weights"] == ["unet-nuclei"]
    assert (tmp_path / "pack2" / "weights" / "unet-nuclei" / "model.safetensors").is_file()


def test_the_command_line_names_unknown_runs_and_devices(tmp_path, capsys):
    _, toml = _camp(tmp_path)
    assert main(["export", str(toml), "nope", "--out", str(tmp_path / "o")]) == 2
    assert "no run named nope" in capsys.readouterr().err
    assert main(["import", str(toml), str(tmp_path)]) == 2
    assert "export.json" in capsys.readouterr().err
    assert main(["run", str(toml), "--only", "nope"]) == 2
    assert "no run named nope" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(toml), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_max_minutes_saves_and_stops(tmp_path, capsys, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    camp, _ = _camp(tmp_path)
    run_campaign(camp, data_root=str(data), threads=1, precision="fp32", max_minutes=1e-9, ship=False)
    assert "time limit (--max-minutes) reached" in capsys.readouterr().out
    meta = json.loads((camp.run_dir(camp.runs[0]) / "state" / "state.json").read_text())
    assert meta["step"] == 0 and not (camp.run_dir(camp.runs[0]) / "done.json").exists()
