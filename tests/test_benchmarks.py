"""The benchmark scripts still run (tiny sizes; the timings themselves are not tested)."""

from benchmarks.bench_train_step import main as bench_train_step


def test_bench_train_step_prints_fp32_bf16_ratios(capsys, one_torch_thread):
    bench_train_step(["--archs", "unet", "sdunet", "--size", "16x16", "--batch", "1", "--repeats", "1",
                      "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("nuclei 16x16, batch 1")
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(rows) == {"unet", "sdunet"} and all(r[-1].endswith("x") and float(r[1]) > 0 for r in rows.values())
