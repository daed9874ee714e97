"""The benchmark scripts still run (tiny sizes; the timings themselves are not tested)."""

import json
import os

import pytest

from benchmarks.bench_sdn import main as bench_sdn
from benchmarks.bench_train_step import main as bench_train_step


def test_bench_train_step_prints_modes_and_sd_baseline_ratios(capsys, one_torch_thread):
    bench_train_step(["--archs", "unet", "sdunet", "--size", "16x16", "--batch", "1", "--repeats", "1",
                      "--threads", "1", "--modes", "fp32", "bf16_cl"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("nuclei 16x16, batch 1")
    rows = {}  # the first table's rows (the GFLOP table below has rows of the same names)
    for ln in lines:
        if ln.startswith(("| unet |", "| sdunet |")):
            rows.setdefault(ln.split("|")[1].strip(), ln)
    assert set(rows) == {"unet", "sdunet"} and all(r.rstrip(" |").endswith("x") for r in rows.values())
    assert "| sdunet / unet |" in out
    flop_rows = [ln for ln in lines if ln.startswith("| sdunet / unet |")]
    assert len(flop_rows) == 2  # the step-time ratios, then the FLOP ratio and the rate ratios
    assert "| network | GFLOP/step | fp32 GFLOP/s | bf16_cl GFLOP/s |" in out


@pytest.mark.parametrize("arch", ["unet", "unetpp", "sdunet", "sdnunet"])
def test_step_flops_agree_with_torch_flop_counter(arch):
    """The benchmark's model FLOPs (hooks on convolutions, the sweep formula for SDN layers) against
    torch's own counter run on the plain-loop sweep, whose per-line GEMMs it sees: convolutional nets
    exactly; SD nets within 2 % (the loop also multiplies the first line of each sweep, which the
    formula, as the spec, does not count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_train_step import step_flops
    from napari_sdunet.models import create_model

    model = create_model(arch, "nuclei", **({"sdn_impl": "loop"} if arch.startswith("sd") else {})).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(2, model.in_channels, 24, 32))
    torch_flops = 3 * counter.get_total_flops()
    ours = step_flops(arch, "nuclei", [24, 32], 2)
    if arch.startswith("sd"):
        assert 0.98 * torch_flops <= ours < torch_flops
    else:
        assert ours == torch_flops


def test_bench_sdn_reports_host_and_same_shape_gemm_percentages(capsys, one_torch_thread, tmp_path):
    before = os.environ.get("NAPARI_SDUNET_SWEEP_CHUNK_ROWS")
    bench_sdn(["--sizes", "6", "--batch", "1", "--state", "8", "--repeats", "1", "--mm-size", "64",
               "--mm-repeats", "1", "--no-steps", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "AMX:" in out and "% of same-shape GEMM" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert {"amx", "avx512_bf16", "bf16_gemm_pays"} <= set(res["machine"])
    got = {(r["precision"], r["impl"]) for r in res["sweeps"]}
    assert {("fp32", "fast"), ("fp32", "fast:rows=0"), ("bf16", "fast_bf16"), ("bf16", "fast_bf16:rows=256")} <= got
    assert all(r["pct_gemm"] > 0 for r in res["sweeps"])
    assert os.environ.get("NAPARI_SDUNET_SWEEP_CHUNK_ROWS") == before  # a variant's setting does not leak


def test_bench_sdn_rejects_an_unknown_variant_option():
    from benchmarks.bench_sdn import split_impl

    assert split_impl("fast") == ("fast", None) and split_impl("fast:rows=0") == ("fast", "0")
    for bad in ("fast:chunks=3", "fast:rows=x", "fast:rows=-5"):
        with pytest.raises(SystemExit, match="IMPL:rows=N"):
            split_impl(bad)


def test_bench_inference_times_predict_on_image_and_volume(capsys, one_torch_thread):
    from benchmarks.bench_inference import main as bench_inference

    bench_inference(["--models", "sdunet-nuclei", "sdunet-liver", "--image", "48", "--volume", "32", "32", "2",
                     "--threads", "1"])
    out = capsys.readouterr().out
    assert "| sdunet-nuclei | 48x48x3 uint8 (YXC) |" in out and "| sdunet-liver | 2x32x32 int16 (ZYX) |" in out
