"""Scale-out: `torchrun` with 2 CPU processes (gloo) trains a few steps; both ranks finish, rank 0 saves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from napari_sdunet.checkpoint import load_checkpoint
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_cpu_ranks(tmp_path):
    root = shared_data("nuclei_96").parent
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
           "fit", "--task", "nuclei", "--arch", "unet", "--base-filters", "8", "--data-root", str(root),
           "--limit-train", "16", "--limit-val", "8", "--limit-test", "8", "--max-steps", "3", "--batch-size", "4",
           "--threads", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "rank 0 finished" in res.stdout and "rank 1 finished" in res.stdout
    # 16 images / (batch 4 x 2 ranks) = 2 steps per epoch: 3 steps = 2 epochs, one validation per epoch + end
    assert (out / "log.csv").read_text().count("\n") == 3
    model, config = load_checkpoint(out / "model")
    assert config["training"]["fit"]["steps"] == 3
