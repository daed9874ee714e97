"""The training campaign: kill -9 and resume lose nothing, status, new-machine continuation, warm start.

Runs on a small data set the test makes (no ../shared needed): blob images in the uniform layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_sdunet.models.registry import get_arch
from training.campaign import (
    CampaignError,
    _Stop,
    choose_precision,
    format_status,
    load_campaign,
    status_rows,
    train_run,
)

REPO = Path(__file__).resolve().parents[2]

TOML = """
[campaign]
runs_dir = "{runs}"
state_every_minutes = {every}

[recipe.blobs]
task = "nuclei"
source = "blobs"
native = true
patch = [32, 32]
val_crop = 48
batch_size = 4
lr = 3e-3
warmup_steps = 2
val_every = 4
patience = 100
tile_size = [64, 64]
model = {{ base_filters = 4 }}
augment = {{ flips = true, rot90 = true, scale = [0.8, 1.25], intensity = 0.1 }}

[[run]]
name = "unet-nuclei"
arch = "unet"
recipe = "blobs"
steps = {steps}
"""


def make_blobs(root: Path, n_train: int = 8, n_val: int = 3, n_test: int = 3) -> Path:
    """images/ + masks/ + split.csv of bright discs on a dark, noisy background."""
    rng = np.random.default_rng(0)
    folder = root / "blobs"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = ["id,split"]
    for k in range(n_train + n_val + n_test):
        h, w = (56, 72) if k % 2 else (64, 60)
        yy, xx = np.mgrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for _ in range(4):
            cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 7)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = np.clip(40 + 150 * mask + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(np.repeat(img[..., None], 3, -1)).save(folder / "images" / f"b{k}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"b{k}.png")
        split = "train" if k < n_train else ("val" if k < n_train + n_val else "test")
        rows.append(f"b{k},{split}")
    (folder / "split.csv").write_text("\n".join(rows) + "\n")
    return root


def write_toml(path: Path, runs: Path, steps: int = 12, every: float = 0.0) -> Path:
    path.write_text(TOML.format(runs=runs.as_posix(), steps=steps, every=every))
    return path


class StopAfter(_Stop):
    """Asks a run to stop after ``n`` steps (fit asks once before each step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def due(self) -> bool:
        self.n -= 1
        self.asked = self.asked or self.n < 0
        return self.asked


def blob_campaign(tmp_path: Path, monkeypatch, steps: int = 8):
    """(data root, campaign, its one run) on blob data, with the package's weights folder in tmp_path."""
    import training.campaign as campaign
    import training.campaign_ship as ship

    data = make_blobs(tmp_path / "data")
    weights = tmp_path / "weights"
    monkeypatch.setattr(campaign, "shipped_folder", lambda e: weights / e.name)
    monkeypatch.setattr(ship, "shipped_folder", lambda e: weights / e.name)
    camp = load_campaign(write_toml(tmp_path / "c.toml", tmp_path / "runs", steps=steps))
    return data, camp, camp.runs[0]


def _cli(toml: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "campaign", "run", str(toml), "--data-root", str(data),
            "--threads", "1", "--precision", "fp32", "--no-ship", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _final(runs: Path) -> tuple[dict, list[str]]:
    from safetensors.torch import load_file

    state = load_file(str(runs / "unet-nuclei" / "state" / "state.safetensors"))
    rows = (runs / "unet-nuclei" / "log.csv").read_text().splitlines()
    return state, rows


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_blobs(tmp_path / "data")
    ref_runs, kill_runs = tmp_path / "ref", tmp_path / "killed"
    ref = write_toml(tmp_path / "ref.toml", ref_runs)
    subprocess.run(_cli(ref, data), check=True, env=_env(), cwd=REPO, capture_output=True, timeout=600)

    toml = write_toml(tmp_path / "k.toml", kill_runs)
    proc = subprocess.Popen(_cli(toml, data), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state_json = kill_runs / "unet-nuclei" / "state" / "state.json"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state_json.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert 5 <= step < 12, f"the run was not caught mid-way (step {step})"
    resumed_at = json.loads(state_json.read_text())["step"]
    assert resumed_at >= 5
    out = subprocess.run(_cli(toml, data), check=True, env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert "resuming from" in out.stdout
    meta = json.loads(state_json.read_text())
    assert meta["step"] == 12 and (kill_runs / "unet-nuclei" / "done.json").is_file()
    a, a_rows = _final(ref_runs)
    b, b_rows = _final(kill_runs)
    # the same weights and optimizer moments at the end: the resumed run lost nothing and jumped nowhere
    for k in a:
        if k.startswith(("model.", "opt.")):
            assert torch.equal(a[k], b[k]), k
    val = [r.split(",")[3] for r in a_rows[1:]]
    assert val == [r.split(",")[3] for r in b_rows[1:]][-len(val):]


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_resumes(tmp_path):
    data = make_blobs(tmp_path / "data")
    runs = tmp_path / "runs"
    toml = write_toml(tmp_path / "c.toml", runs, steps=2000, every=60)
    proc = subprocess.Popen(_cli(toml, data), env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    log = runs / "unet-nuclei" / "log.csv"
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at step" in out
    meta = json.loads((runs / "unet-nuclei" / "state" / "state.json").read_text())
    assert 8 <= meta["step"] < 2000 and not (runs / "unet-nuclei" / "done.json").exists()
    rows = status_rows(load_campaign(toml))
    assert rows[0]["state"] == "started" and rows[0]["step"] == meta["step"]


def test_status_on_a_tiny_queue(tmp_path, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    runs = tmp_path / "runs"
    toml = write_toml(tmp_path / "c.toml", runs, steps=4)
    camp = load_campaign(toml)
    rows = status_rows(camp)
    assert [r["state"] for r in rows] == ["queued"]
    train_run(camp.runs[0], camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    rows = status_rows(camp)
    assert rows[0]["state"] == "done" and rows[0]["step"] == 4 and rows[0]["precision"] == "fp32"
    assert rows[0]["epoch"] == "2.0/2.0" and 0 <= rows[0]["best_val_dice"] <= 1
    text = format_status(rows)
    for col in ("run", "epoch", "best_val_dice", "cpu_hours", "precision", "eta_hours", "host"):
        assert col in text.splitlines()[0]
    out = subprocess.run([sys.executable, "-m", "training", "campaign", "status", str(toml), "--json"],
                         env=_env(), cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout)[0]["state"] == "done"


def test_a_new_machine_continues_from_the_shipped_weights(tmp_path, monkeypatch, one_torch_thread):
    """No run folder, but shipped weights from this run: continue at their step, fresh optimizer."""
    import training.campaign as campaign
    import training.campaign_ship as ship

    data, camp, entry = blob_campaign(tmp_path, monkeypatch)
    stop = campaign._Stop()
    import napari_sdunet.train_loop as tl

    real_fit = tl.fit

    def fit_until_4(*args, **kwargs):
        inner = kwargs["should_stop"]
        kwargs["should_stop"] = lambda: inner() or (json.loads(
            (camp.run_dir(entry) / "run.json").read_text()).get("step", 0) >= 4)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tl, "fit", fit_until_4)
    rec = train_run(entry, camp, data_root=str(data), threads=1, precision="fp32", stop=stop, progress=False)
    monkeypatch.setattr(tl, "fit", real_fit)
    assert not rec["finished"] and rec["step"] == 4
    folder = ship.ship_run(entry, camp, data_root=str(data), partial=True, force=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["campaign"]["step"] == 4 and cfg["campaign"]["partial"] is True
    from napari_sdunet.zoo import model_summary

    summary = model_summary(cfg)  # what the model pickers show and rank by
    assert summary["val_dice"] == cfg["campaign"]["val_dice_shipped"] and summary["test_dice"] is not None
    card = (folder / "README.md").read_text()
    assert (folder / "learning_curve.png").is_file() and "CPU-hours" in card
    assert card.index("## Target") < card.index("## Provenance")  # the target and what limits it
    import shutil

    shutil.rmtree(camp.run_dir(entry))  # "a new machine"
    rec = train_run(entry, camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    log = (camp.run_dir(entry) / "log.txt").read_text()
    assert "warm start from the shipped weights" in log and "fresh optimizer" in log
    assert rec["finished"] and rec["step"] == 8
    rows = (camp.run_dir(entry) / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [8]  # validations continue the step count
    # the finished run's card and record keep its history: where it started from and the change of machine
    folder = ship.ship_run(entry, camp, data_root=str(data), force=True)
    rec = json.loads((folder / "config.json").read_text())["campaign"]
    assert rec["finished"] and rec["warm_start"] == cfg["campaign"]["warm_start"]
    assert str(tmp_path) not in (folder / "config.json").read_text()  # no path of this machine in the record
    assert [c["step"] for c in rec["continued"]] == [4]
    assert "continued on a new machine at step 4" in (folder / "README.md").read_text()
    # without the run folder, status reads the epochs from the shipped record (older records: from n_train)
    shutil.rmtree(camp.run_dir(entry))
    spe = rec["steps_per_epoch"]
    assert spe == max(1, rec["n_train"] // entry.recipe.batch_size)
    row = status_rows(camp)[0]
    assert row["state"] == "done" and row["epoch"] == f"{8 / spe:.1f}/{8 / spe:.1f}"
    full = json.loads((folder / "config.json").read_text())
    del full["campaign"]["steps_per_epoch"]
    (folder / "config.json").write_text(json.dumps(full))
    assert status_rows(camp)[0]["epoch"] == row["epoch"]


def test_warm_start_maps_a_unet_onto_an_sdunet(tmp_path):
    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.models import ResSDN, create_model
    from training.runner import warm_start

    unet = create_model("unet", "nuclei", base_filters=8)
    folder = save_checkpoint(unet, tmp_path / "unet", task="nuclei")
    sd = create_model("sdunet", "nuclei", base_filters=8, sdn_state=8)
    info = warm_start(sd, str(folder), gate_bias=3.0)
    assert info["copied"] == len(unet.state_dict()) and info["gates_opened"] > 0
    own = sd.state_dict()
    for k, v in unet.state_dict().items():
        target = k if k in own else None
        if target is None:  # the plain block's 2nd conv became the ResSDN's parallel conv
            target = next(n for n in own if n.replace(".cnn.", ".") == k)
        assert torch.equal(own[target], v), k
    gate = next(m for m in sd.modules() if isinstance(m, ResSDN)).sdn.project_out
    half = gate.out_channels // 2
    assert torch.all(gate.bias[half:] == 3.0) and torch.all(gate.weight[half:] == 0)


def test_precision_is_chosen_by_timing(one_torch_thread):
    from napari_sdunet.batches import BatchSource
    from napari_sdunet.models import create_model

    ims = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    src = BatchSource(ims, (ims[:, :1] > 128).to(torch.uint8), 2)
    choice = choose_precision(create_model("unet", "nuclei", base_filters=4), src, steps=1)
    assert choice["precision"] in ("fp32", "bf16")
    t = choice["step_seconds"]
    assert choice["precision"] == ("bf16" if t["bf16"] < t["fp32"] else "fp32")


def test_bad_campaign_files_give_clear_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[recipe.a]\ntask = "nuclei"\n[[run]]\narch = "unet"\nrecipe = "b"\nsteps = 3\n')
    with pytest.raises(CampaignError, match="recipe 'b' is not defined"):
        load_campaign(p)
    p.write_text('[recipe.a]\ntask = "nuclei"\nlr_typo = 1\n')
    with pytest.raises(CampaignError, match="unknown keys"):
        load_campaign(p)
    p.write_text("not toml [")
    with pytest.raises(CampaignError, match="cannot read"):
        load_campaign(p)


def test_the_committed_campaign_file_parses():
    camp = load_campaign(REPO / "training" / "campaign.toml")
    names = [r.name for r in camp.runs]
    assert len(names) == 12 and len(set(names)) == 12
    assert {(r.arch, r.task) for r in camp.runs} == {(a, t) for a in ("unet", "unetpp", "sdunet", "sdnunet")
                                                     for t in ("nuclei", "polyps", "liver")}
    # every SD network warm-starts from the baseline of its task, which is queued before it
    where = {(r.arch, r.task): i for i, r in enumerate(camp.runs)}
    for i, r in enumerate(camp.runs):
        if r.arch.startswith("sd"):
            assert r.init == "baseline"
            assert where[(get_arch(r.arch).baseline, r.task)] < i, r.name
    assert camp.runs[0].arch == "unet"


def test_validation_batches_hold_at_most_twice_a_training_batch_of_pixels():
    from training.campaign import val_batch_size

    camp = load_campaign(REPO / "training" / "campaign.toml")
    by_name = {r.name: r.recipe for r in camp.runs}
    sd = by_name["sdunet-nuclei"]  # 12 patches of 96x96, validated on 256x256 crops
    assert val_batch_size(sd) == 3
    assert val_batch_size(by_name["unet-polyps"]) == by_name["unet-polyps"].batch_size  # same size: unchanged


def test_digests_of_recipes_without_the_later_keys_are_unchanged():
    """A key added to recipes later (val_metric) must not change the digest of a recipe that leaves it at
    its default: shipped runs are recognised as finished by their recipe's digest, so a changed digest
    would train them again."""
    import dataclasses
    import hashlib

    camp = load_campaign(REPO / "training" / "campaign.toml")
    for entry in camp.runs:
        d = dataclasses.asdict(entry.recipe)
        if d["val_metric"] == "image":
            del d["val_metric"]
            old = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
            assert entry.recipe.digest() == old
    # and every finished shipped run still matches its recipe (else `campaign run` would train it again)
    from training.campaign import shipped_folder

    for entry in camp.runs:
        cfg = shipped_folder(entry) / "config.json"
        rec = json.loads(cfg.read_text()).get("campaign") if cfg.is_file() else None
        if rec and rec.get("finished"):
            assert rec["recipe_digest"] == entry.recipe.digest(), entry.name


@pytest.mark.slow
def test_a_changed_validation_metric_rescores_the_best_on_resume(tmp_path, monkeypatch, one_torch_thread):
    """Per-volume validation switched on mid-run: the run resumes, and the best is chosen anew."""
    data = make_blobs(tmp_path / "data")
    split = data / "blobs" / "split.csv"
    rows = split.read_text().splitlines()
    split.write_text("\n".join([rows[0] + ",volume"] + [f"{r},v{k % 2}" for k, r in enumerate(rows[1:])]) + "\n")
    resized = TOML.replace("native = true\npatch = [32, 32]", "input_size = [32, 32]")
    toml = tmp_path / "c.toml"
    toml.write_text(resized.format(runs=(tmp_path / "runs").as_posix(), steps=8, every=0.0))

    camp = load_campaign(toml)
    train_run(camp.runs[0], camp, data_root=str(data), threads=1, precision="fp32", progress=False,
              stop=StopAfter(4))
    toml.write_text(toml.read_text().replace('task = "nuclei"', 'task = "nuclei"\nval_metric = "group"'))
    camp = load_campaign(toml)
    assert camp.runs[0].recipe.val_metric == "group"
    rec = train_run(camp.runs[0], camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    log = (camp.run_dir(camp.runs[0]) / "log.txt").read_text()
    assert "the recipe changed since the state was saved" in log and "validation: group" in log
    assert rec["finished"] and rec["step"] == 8 and rec["best_step"] == 8
    changed = rec["scoring_changed"]
    assert changed["step"] == 4 and changed["val_metric"] == "group" and changed["from_digest"] != rec["recipe_digest"]
    # shipped with the metric it was chosen by, recorded by name; rescoring records it again in place
    import training.campaign_ship as ship

    folder = ship.ship_run(camp.runs[0], camp, data_root=str(data), force=True, dest=tmp_path / "shipped")
    crec = json.loads((folder / "config.json").read_text())["campaign"]
    assert crec["val_metric"] == "group" and crec["val_dice_by_metric"]["group"] == round(crec["val_dice_shipped"], 6)
    card = (folder / "README.md").read_text()
    assert "per volume" in card and "the recipe changed at step 4" in card
    assert "the best weights were chosen among the later points" in card  # best step 8, after the change
    done = json.loads((camp.run_dir(camp.runs[0]) / "done.json").read_text())
    older = ship.model_card(camp.runs[0], dict(done, best_step=2), {}, 0.5, None, False)  # best from before it
    assert "these weights, from before the change, were scored that way at ship time" in older
    assert "chosen among the later points" not in older
    monkeypatch.setattr(ship, "shipped_folder", lambda e: folder)
    scores = ship.rescore_shipped(camp.runs[0], camp, data_root=str(data))
    again = json.loads((folder / "config.json").read_text())["campaign"]["val_dice_by_metric"]
    assert again == {k: round(v, 6) for k, v in scores.items()}
    assert abs(again["group"] - crec["val_dice_shipped"]) < 0.02  # the fp16 weights as shipped


@pytest.mark.slow
def test_a_finished_run_that_does_not_beat_its_shipped_partial_keeps_it_and_says_so(tmp_path, monkeypatch,
                                                                                    one_torch_thread):
    import training.campaign as campaign
    import training.campaign_ship as ship

    data, camp, entry = blob_campaign(tmp_path, monkeypatch)
    train_run(entry, camp, data_root=str(data), threads=1, precision="fp32", progress=False, stop=StopAfter(4))
    folder = ship.ship_run(entry, camp, data_root=str(data), partial=True, force=True)
    before = json.loads((folder / "config.json").read_text())
    assert before["campaign"]["partial"] is True and before["campaign"]["step"] == 4
    rec = train_run(entry, camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    assert rec["finished"] and rec["step"] == 8
    scores = iter([{"image": 0.10}, {"image": 0.50}])  # the finished run's best, then the shipped partial's
    monkeypatch.setattr(ship, "val_scores", lambda *a, **k: next(scores))
    assert ship.ship_run(entry, camp, data_root=str(data)) == folder
    after = json.loads((folder / "config.json").read_text())
    c = after["campaign"]
    assert c["finished"] is True and c["partial"] is False and c["step"] == 8
    assert c["weights_of_step"] == before["campaign"]["best_step"] and c["val_dice_shipped"] == 0.50
    assert c["finished_best"] == 0.10 and after["weights"] == before["weights"]  # the same weights file
    card = (folder / "README.md").read_text()
    assert "so these stay" in card and "trained 8 steps" in card and "unfinished" not in card
    same_step = rec["best_step"] == before["campaign"]["best_step"]  # the partial held the run's best step
    assert ("no later step validated better" in card) == same_step
    assert ("not better than these step-" in card) == (not same_step)
    assert card.count("## Target") == 1
    # a later `campaign run` sees the run as finished (here and on a new machine)
    import shutil

    shutil.rmtree(camp.run_dir(entry))
    assert campaign.shipped_campaign_record(entry)["finished"] is True


def test_micro_batches_are_recorded_and_a_run_over_the_memory_budget_says_so(tmp_path, one_torch_thread):
    data = make_blobs(tmp_path / "data")
    toml = write_toml(tmp_path / "c.toml", tmp_path / "runs", steps=4)
    text = toml.read_text().replace("[campaign]\n", "[campaign]\nmax_rss_gb = 0.01\n")
    toml.write_text(text.rstrip() + "\nmicro_batches = 2\n")
    camp = load_campaign(toml)
    assert camp.runs[0].micro_batches == 2 and camp.max_rss_gb == 0.01
    assert camp.runs[0].recipe.digest() == load_campaign(write_toml(tmp_path / "d.toml", tmp_path / "r2")
                                                         ).runs[0].recipe.digest()  # not part of the recipe
    rec = train_run(camp.runs[0], camp, data_root=str(data), threads=1, precision="fp32", progress=False)
    assert rec["micro_batches"] == 2 and rec["step"] == 4
    log = (camp.run_dir(camp.runs[0]) / "log.txt").read_text()
    assert "batch 4 in 2 micro-batches" in log
    assert log.count("over the campaign's max_rss_gb = 0.01: give this run more micro_batches (now 2)") == 1
    import training.campaign_ship as ship

    assert "batch 4 (as 2 micro-batches, gradients summed" in ship.model_card(camp.runs[0], rec, {}, 0.5, None, False)
    assert "micro-batches" not in ship.model_card(camp.runs[0], dict(rec, micro_batches=1), {}, 0.5, None, False)
    warm = {"source": str(camp.run_dir(camp.runs[0]) / "model"), "copied": 3, "total": 4, "gates_opened": 1}
    card = ship.model_card(camp.runs[0], dict(rec, warm_start=warm), {}, 0.5, None, False)
    assert "warm start: the best weights of the finished `unet-nuclei` run (its run folder" in card
    assert str(tmp_path) not in card  # no path of this machine in a shipped card
    from training.campaign import campaign_record

    assert campaign_record(dict(rec, name="unet-nuclei", warm_start=warm))["warm_start"] == dict(
        warm, source="<runs>/unet-nuclei/model", model="unet-nuclei")
    for bad in ("0", "5", "1.5"):  # the blob recipe's batch is 4
        toml.write_text(text.rstrip() + f"\nmicro_batches = {bad}\n")
        with pytest.raises(CampaignError, match="micro_batches must be a whole number from 1 to the batch size"):
            load_campaign(toml)


@pytest.mark.parametrize(("source", "portable", "model"), [
    ("/work/camp/napari_sdunet/weights/unet-nuclei", "napari_sdunet/weights/unet-nuclei", "unet-nuclei"),
    ("/root/.cache/napari-sdunet/campaign/unetpp-liver/model", "<runs>/unetpp-liver/model", "unetpp-liver"),
    ("/home/me/my-models/unet-polyps-v2", "<folder>/unet-polyps-v2", "unet-polyps-v2"),
])
def test_portable_warm_start_drops_the_machines_paths(source, portable, model):
    from training.campaign import portable_warm_start
    from training.targets import warm_start_name

    warm = {"source": source, "copied": 1, "total": 2, "gates_opened": 0}
    out = portable_warm_start(warm)
    assert out == dict(warm, source=portable, model=model)
    assert portable_warm_start(out) == out and portable_warm_start(None) is None
    assert warm_start_name({"warm_start": warm}) == model == warm_start_name({"warm_start": out})


def test_shipped_records_hold_no_path_of_the_training_machine():
    from napari_sdunet.zoo import PACKAGE_WEIGHTS

    for cfg_file in PACKAGE_WEIGHTS.glob("*/config.json"):
        text = cfg_file.read_text()
        for root in ("/work/", "/root/", "/home/", "/tmp/", ":\\"):
            assert root not in text, (cfg_file.parent.name, root)


def test_portable_path_shows_no_machine_path(tmp_path, monkeypatch):
    from training.campaign_ship import portable_path

    repo = Path(__file__).resolve().parents[2]
    assert portable_path(repo / "training" / "campaign.toml") == "training/campaign.toml"
    assert portable_path(Path("training/campaign.toml")) == "training/campaign.toml"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "c.toml") == "runs/c.toml"
    assert portable_path(Path("/elsewhere/my.toml")) == "my.toml"
