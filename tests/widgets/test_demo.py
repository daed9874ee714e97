"""The README's first command: napari with the widgets docked, a sample segmented by a shipped model.

Runs in a fresh process (as a user would), so nothing preloaded by the test session hides a crash,
e.g. torch loading triton after Mesa's GL is up.
"""

import subprocess
import sys

import pytest

from napari_sdunet.zoo import list_pretrained


@pytest.mark.slow
def test_demo_segments_the_polyp_sample_with_a_shipped_model(tmp_path):
    models = [m for m in list_pretrained() if m.endswith("-polyps")]
    if not models:
        pytest.skip("no shipped polyp model in napari_sdunet/weights")
    shot = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "napari_sdunet.demo", "--sample", "polyps", "--model", models[0],
                        "--segment", "--screenshot", str(shot), "--quit"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_napari_sh_segment_gives_a_good_result_with_no_other_choice(tmp_path):
    """`./scripts/napari.sh --segment`: the default sample, the preselected model, the Compare overlay."""
    import os
    import re

    from napari_sdunet.zoo import best_shipped_for_task

    if best_shipped_for_task("nuclei") is None:
        pytest.skip("no shipped nuclei model in napari_sdunet/weights")
    shot = tmp_path / "demo.png"
    env = {**os.environ, "NAPARI_SDUNET_SETTINGS": str(tmp_path / "settings.json")}
    r = subprocess.run([sys.executable, "-m", "napari_sdunet.demo", "--segment", "--screenshot", str(shot), "--quit"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"model: {best_shipped_for_task('nuclei')} (" in r.stdout
    dice = float(re.search(r"Compare: Dice (\d\.\d+)", r.stdout).group(1))
    assert dice >= 0.8, r.stdout
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_training_step_after_viewer_is_up_does_not_crash(tmp_path):
    """Adam.step imports torch._dynamo, which loads triton when installed; the widgets prevent that
    without CUDA, since triton after Mesa's llvmpipe crashes the process."""
    code = (
        "import napari, torch\n"
        "from napari_sdunet.widgets._common import avoid_triton_without_cuda\n"
        "v = napari.Viewer(show=True); v.add_image(torch.rand(32, 32).numpy())\n"
        "avoid_triton_without_cuda()\n"
        "m = torch.nn.Linear(2, 2); o = torch.optim.Adam(m.parameters())\n"
        "m(torch.rand(1, 2)).sum().backward(); o.step(); v.close(); print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
