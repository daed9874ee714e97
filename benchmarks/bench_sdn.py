"""Benchmark of the SDN sweep implementations and of whole training steps, in one run.

Measures, on the current machine and in the same process (so ratios are comparable):

1. the host (CPU model, AMX, AVX512-BF16, the sweep's bf16 rule) and a square matmul for scale;
2. the GEMMs of one sweep step at the sweep's own shapes and dtype (fp32, and bf16 operands):
   prior (BL x S)(S x 3S), taps (BL x 3S)(3S x 3S), and backward dU, dx, dW_in, dW_h. Their
   FLOP-weighted rate is the ceiling of a sweep that did nothing but its GEMMs;
3. each sweep implementation, two directions (0 then 2, as in the paper), S=150, B=20, for each map
   size, fp32 and bf16: forward and forward+backward, time, GFLOP/s and % of that same-shape ceiling;
4. one training step of U-Net, U-Net++, SDU-Net and SDNU-Net (nuclei preset, 96x96, B=20) in fp32,
   fp32 + channels_last and bf16 autocast + channels_last, and the SD / baseline step-time ratios.

FLOPs are model FLOPs: a swept cell costs 24 S^2 forward (12 S^2 MACs: 9 S^2 recurrent, 3 S^2 prior),
forward+backward 3x that (exactly the FLOPs of the GEMMs above); gate elementwise work is not counted.

    .venv/bin/python benchmarks/bench_sdn.py --threads 1                     # full CPU run (~15 min)
    .venv/bin/python benchmarks/bench_sdn.py --sizes 24 --repeats 2 --no-steps   # quick check
    .venv/bin/python benchmarks/bench_sdn.py --device cuda        # GPU (see gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_train_step  # noqa: E402
from benchmarks.bench_train_step import sweep_flops  # noqa: E402
from benchmarks.sweep_naive import sweep_naive  # noqa: E402
from napari_sdunet.models import create_model  # noqa: E402
from napari_sdunet.models.sdn.cpu import (  # noqa: E402
    bf16_gemm_pays,
    fp32_gemm_backend,
    fp32_gemm_probe,
    gemm_probe,
    onednn_linear,
)
from napari_sdunet.models.sdn.layer import SDNCell  # noqa: E402
from napari_sdunet.models.sdn.sweep import list_sweeps, sweep  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls after one untimed warm-up call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=c), repeats, device) / 1e9


def sweep_gemm_gflops(m: int, S: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float]:
    """FLOP-weighted GEMM rate of one sweep step at its own shapes (M = B*L rows) and operand dtype.

    Each GEMM is timed through torch.mm and through oneDNN's matmul; the faster counts.

    Returns {"fwd": rate of the 2 forward GEMMs, "fwd+bwd": rate of all 6, and each GEMM's own rate}.
    """
    S3 = 3 * S
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    u, h, w_in, w_h, da = r(m, S3), r(m, S), r(S3, S3), r(S3, S), r(m, S3)
    o3, o1, ow, owh = r(m, S3), r(m, S), r(S3, S3), r(S3, S)
    w_in_t, w_h_t = w_in.t().contiguous(), w_h.t().contiguous()
    lin = onednn_linear
    gemms = {  # name: (flops, [torch.mm (MKL fp32 / oneDNN bf16), oneDNN matmul], pass)
        "prior h W_h^T": (2 * m * S * S3, [lambda: torch.mm(h, w_h.t(), out=o3), lambda: lin(h, w_h)], "fwd"),
        "taps U W_in^T": (2 * m * S3 * S3, [lambda: torch.mm(u, w_in.t(), out=o3), lambda: lin(u, w_in)], "fwd"),
        "dU = dA W_in": (2 * m * S3 * S3, [lambda: torch.mm(da, w_in, out=o3), lambda: lin(da, w_in_t)], "bwd"),
        "dx = dC W_h": (2 * m * S3 * S, [lambda: torch.mm(da, w_h, out=o1), lambda: lin(da, w_h_t)], "bwd"),
        "dW_in = dA^T U": (2 * m * S3 * S3, [lambda: torch.mm(da.t(), u, out=ow), lambda: lin(da.t(), u.t())], "bwd"),
        "dW_h = dC^T h": (2 * m * S3 * S, [lambda: torch.mm(da.t(), h, out=owh), lambda: lin(da.t(), h.t())], "bwd"),
    }
    if device.type != "cpu":
        gemms = {k: (f, fns[:1], p) for k, (f, fns, p) in gemms.items()}
    inner = 5
    res, secs = {}, {}
    for name, (flops, fns, _) in gemms.items():
        best = float("inf")
        for fn in fns:  # the host's best library at this shape is the ceiling
            def run(fn=fn):
                for _ in range(inner):
                    fn()

            best = min(best, best_time(run, repeats, device) / inner)
        secs[name] = best
        res[name] = flops / secs[name] / 1e9
    for pas, names in (("fwd", [n for n, v in gemms.items() if v[2] == "fwd"]), ("fwd+bwd", list(gemms))):
        res[pas] = sum(gemms[n][0] for n in names) / sum(secs[n] for n in names) / 1e9
    return res


def precision_of(impl: str) -> str:
    """bf16 for the implementations with bf16 GEMM operands, fp32 for the rest (inputs are fp32)."""
    return "bf16" if split_impl(impl)[0].endswith("_bf16") else "fp32"


def split_impl(label: str) -> tuple[str, str | None]:
    """``"fast:rows=0"`` -> ("fast", "0"): an implementation, and the rows per chunk of a step
    (``NAPARI_SDUNET_SWEEP_CHUNK_ROWS``; 0 = whole steps) it runs with; None: the caller's setting."""
    impl, _, opt = label.partition(":")
    if opt and not (opt.startswith("rows=") and opt[5:].isdigit()):
        raise SystemExit(f"unknown option {opt!r} of {label!r} (expected IMPL:rows=N, N a whole number)")
    return impl, (opt[5:] if opt else None)


def bench_sweeps(args, device: torch.device, ceilings: dict) -> list[dict]:
    """Time each implementation at each size; ``ceilings[(precision, size)]`` = same-shape GEMM rates."""
    gen = torch.Generator().manual_seed(0)
    cells = [SDNCell(args.state).to(device=device) for _ in (0, 2)]
    rows = []
    chunk_env = os.environ.get("NAPARI_SDUNET_SWEEP_CHUNK_ROWS")
    try:
        for size in args.sizes:
            x0 = torch.tanh(torch.randn(args.batch, args.state, size, size, generator=gen)).to(device)
            if args.layout == "channels_last":  # as in the training campaign: the SDN state is NHWC
                x0 = x0.contiguous(memory_format=torch.channels_last)
            impls = [i for i in args.impls if i != "naive" or size < args.naive_below]
            for impl in impls:
                for backward in (False, True):
                    # bf16 implementations sweep a bf16 state, as under autocast in the campaign (the
                    # project-in conv and tanh give bf16); --fp32-lines feeds them fp32 instead
                    xin = x0.bfloat16() if precision_of(impl) == "bf16" and not args.fp32_lines else x0

                    def run(impl=impl, backward=backward, x0=xin):
                        impl, chunk_rows = split_impl(impl)
                        if chunk_rows is not None:
                            os.environ["NAPARI_SDUNET_SWEEP_CHUNK_ROWS"] = chunk_rows
                        elif chunk_env is None:
                            os.environ.pop("NAPARI_SDUNET_SWEEP_CHUNK_ROWS", None)
                        else:
                            os.environ["NAPARI_SDUNET_SWEEP_CHUNK_ROWS"] = chunk_env
                        x = x0.detach().requires_grad_(backward)
                        s = x
                        with torch.set_grad_enabled(backward):
                            for d, c in zip((0, 2), cells):
                                p = (c.weight_in, c.bias_in, c.weight_prior, c.bias_prior)
                                s = sweep_naive(s, *p, d) if impl == "naive" else sweep(s, *p, d, impl=impl)
                            if backward:
                                s.backward(torch.ones_like(s))
                                for c in cells:
                                    c.zero_grad(set_to_none=True)

                    reps = args.repeats if size < 96 else args.repeats_96
                    t = best_time(run, reps, device)
                    flops = sweep_flops(size, size, args.state, args.batch) * (3 if backward else 1)
                    pas = "fwd+bwd" if backward else "fwd"
                    prec = precision_of(impl)
                    gf = flops / t / 1e9
                    rows.append({"size": size, "impl": impl, "precision": prec, "pass": pas, "seconds": t,
                                 "gflops": gf, "pct_gemm": 100 * gf / ceilings[prec, size][pas]})
                    print(f"  sweep {size}x{size} {impl:>18} {pas:>7}: {t:8.3f} s {gf:7.1f} GFLOP/s "
                          f"({rows[-1]['pct_gemm']:.0f} % of same-shape {prec} GEMM)", flush=True)
    finally:
        if chunk_env is None:  # the variants' chunk settings do not outlive the table
            os.environ.pop("NAPARI_SDUNET_SWEEP_CHUNK_ROWS", None)
        else:
            os.environ["NAPARI_SDUNET_SWEEP_CHUNK_ROWS"] = chunk_env
    for r in rows:
        base = [b for b in rows if b["size"] == r["size"] and b["pass"] == r["pass"] and b["impl"] == "naive"]
        r["speedup_vs_naive"] = base[0]["seconds"] / r["seconds"] if base else None
    return rows


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 BCE + (1 - soft Dice), per-sample Dice averaged (the paper's recipe)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)
    return 0.5 * bce + (1 - dice.mean())


def bench_steps(args, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 96, 96, generator=gen).to(device)
    y = (torch.rand(args.batch, 1, 96, 96, generator=gen) > 0.7).float().to(device)
    configs = [("unet", None), ("unetpp", None)]
    configs += [(arch, impl) for arch in ("sdunet", "sdnunet") for impl in args.step_impls]
    rows = []
    for arch, impl in configs:
        torch.manual_seed(0)
        kw = {"sdn_impl": impl} if impl else {}
        model = create_model(arch, "nuclei", **kw).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

        t = best_time(step, args.step_repeats, device)
        rows.append({"arch": arch, "sdn_impl": impl or "-", "seconds": t})
        print(f"  train step {arch:>8} (sdn_impl={impl or '-'}): {t:8.3f} s", flush=True)
    return rows


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln.split(":", 1)[1] for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        return info
    try:
        with open("/proc/cpuinfo") as f:
            info["device"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["device"] = platform.processor()
    flags = cpu_flags()
    info["cores"] = os.cpu_count()
    info["amx"] = bool({"amx_bf16", "amx_tile"} & flags)
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    fp32, bf16 = gemm_probe()
    info["probe_gflops"] = {"fp32": fp32, "bf16": bf16}
    info["bf16_gemm_pays"] = bf16_gemm_pays()
    mkl, dnnl = fp32_gemm_probe()
    info["fp32_probe_gflops"] = {"mkl": mkl, "onednn": dnnl}
    info["fp32_gemm_backend"] = fp32_gemm_backend()
    try:
        from napari_sdunet.models.sdn import cpp as sweep_cpp

        info["cpp_kernels"] = "avx512" if sweep_cpp.simd() else ("scalar" if sweep_cpp.ops() else "not built")
    except Exception as err:  # report, do not fail the benchmark
        info["cpp_kernels"] = f"error: {err}"
    return info


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96], help="square map sizes")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--state", type=int, default=150)
    ap.add_argument("--impls", nargs="+", default=None,
                    help="sweep implementations (names ending in _bf16 run bf16 GEMM operands; IMPL:rows=N "
                         "runs IMPL with N rows per chunk of a step, 0 = whole steps; default: naive fast_py "
                         "fast fast:rows=0 fast_py_bf16 fast_bf16 fast_bf16:rows=256 on CPU)")
    ap.add_argument("--fp32-lines", action="store_true",
                    help="feed the bf16 implementations fp32 states (default: bf16, as under autocast)")
    ap.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last",
                    help="memory layout of the swept state (the campaign trains channels_last)")
    ap.add_argument("--naive-below", type=int, default=96, help="time the naive loop only below this size")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after a warm-up) below 96x96")
    ap.add_argument("--repeats-96", type=int, default=1, help="timed repeats at 96x96 and above")
    ap.add_argument("--mm-size", type=int, default=2048, help="size of the square reference matmul")
    ap.add_argument("--mm-repeats", type=int, default=5, help="timed repeats of the reference GEMMs")
    ap.add_argument("--no-steps", action="store_true", help="skip the training-step benchmark")
    ap.add_argument("--step-impls", nargs="+", default=["auto"],
                    help="sdn_impl values for the SD networks' training steps (CUDA: e.g. auto loop)")
    ap.add_argument("--step-modes", nargs="+", default=["fp32", "fp32_cl", "bf16_cl"],
                    choices=list(bench_train_step.MODES), help="CPU training-step modes, side by side")
    ap.add_argument("--step-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the sweeps' GEMMs too
    if args.impls is None:
        wanted = (["naive", "loop", "fast", "triton", "triton_bf16"] if device.type == "cuda"
                  else ["naive", "fast_py", "fast", "fast:rows=0", "fast_py_bf16", "fast_bf16", "fast_bf16:rows=256"])
        args.impls = [i for i in wanted if i == "naive" or split_impl(i)[0] in list_sweeps()]
    info = machine_info(device)
    info["load_before"] = load()
    print(f"# {info}", flush=True)

    precisions = sorted({precision_of(i) for i in args.impls}, key=["fp32", "bf16"].index)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def read_ceilings() -> tuple[float, float, dict]:
        mm = matmul_gflops(args.mm_size, torch.float32, device, args.mm_repeats)
        mm_bf16 = matmul_gflops(args.mm_size, torch.bfloat16, device, args.mm_repeats)
        same = {(p, n): sweep_gemm_gflops(args.batch * n, args.state, dtypes[p], device, args.mm_repeats)
                for p in precisions for n in args.sizes}
        return mm, mm_bf16, same

    # read before and after the sweeps; the best is kept (on a shared machine the best of many
    # repeats is the machine's capacity, as for every timing below)
    mm, mm_bf16, same = read_ceilings()
    for (p, n), v in same.items():
        print(f"  (first reading) same-shape {p} GEMMs at {n}x{n} (M={args.batch * n}): fwd {v['fwd']:.0f}, "
              f"fwd+bwd {v['fwd+bwd']:.0f} GFLOP/s", flush=True)
    sweeps = bench_sweeps(args, device, same)
    mm2, mm_bf162, same2 = read_ceilings()
    mm, mm_bf16 = max(mm, mm2), max(mm_bf16, mm_bf162)
    same = {k: {g: max(v, same2[k][g]) for g, v in same[k].items()} for k in same}
    for r in sweeps:
        r["pct_gemm"] = 100 * r["gflops"] / same[r["precision"], r["size"]][r["pass"]]
        r["pct_matmul"] = 100 * r["gflops"] / (mm if r["precision"] == "fp32" else mm_bf16)
    res = {"machine": info, "matmul_gflops": mm, "matmul_bf16_gflops": mm_bf16, "batch": args.batch,
           "state": args.state, "same_shape_gemm": {f"{p} {n}": v for (p, n), v in same.items()},
           "sweeps": sweeps}
    steps = None
    if not args.no_steps:
        if device.type == "cpu":
            impl = None if args.step_impls == ["auto"] else args.step_impls[0]
            steps = bench_train_step.run(list(bench_train_step.PAIRS.values()) + list(bench_train_step.PAIRS),
                                         args.step_modes, "nuclei", [96, 96], args.batch, args.step_repeats, impl)
            steps = {a: steps[a] for a in ("unet", "unetpp", "sdunet", "sdnunet")}
        else:
            res["steps_cuda"] = bench_steps(args, device)
    res["steps"] = steps
    info["load_after"] = load()

    print()
    print(f"Machine: {info['device']}, torch {info['torch']}, {info['threads']} threads; "
          f"load average before {info['load_before']}, after {info['load_after']}")
    if device.type == "cpu":
        print(f"AMX: {'yes' if info['amx'] else 'no'}; AVX512-BF16: {'yes' if info['avx512_bf16'] else 'no'}; "
              f"ATen CPU capability {info['cpu_capability']}; C++ sweep kernels: {info['cpp_kernels']}; "
              f"bf16 GEMM probe {info['probe_gflops']['bf16']:.0f} vs fp32 {info['probe_gflops']['fp32']:.0f} "
              f"GFLOP/s, so autocast sweeps use {'bf16' if info['bf16_gemm_pays'] else 'fp32'} operands; "
              f"fp32 GEMM probe MKL {info['fp32_probe_gflops']['mkl']:.0f} vs oneDNN "
              f"{info['fp32_probe_gflops']['onednn']:.0f} GFLOP/s, so fp32 sweeps use {info['fp32_gemm_backend']}")
    print(f"Square matmul {args.mm_size}^3: fp32 {mm:.0f} GFLOP/s, bf16 {mm_bf16:.0f} GFLOP/s")
    print()
    print("Same-shape GEMM ceilings (GFLOP/s, FLOP-weighted over the sweep step's GEMMs; best reading):")
    print()
    print("| precision | map | M = B·L | fwd | fwd+bwd | " + " | ".join(
        k for k in next(iter(same.values())) if k not in ("fwd", "fwd+bwd")) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * 6)
    for (p, n), v in same.items():
        print(f"| {p} | {n}² | {args.batch * n} | {v['fwd']:.0f} | {v['fwd+bwd']:.0f} | "
              + " | ".join(f"{x:.0f}" for k, x in v.items() if k not in ("fwd", "fwd+bwd")) + " |")
    print()
    print(f"Sweep, 2 directions, S={args.state}, B={args.batch}, {args.layout} inputs, fp32 "
          f"({'fp32' if args.fp32_lines else 'bf16'} for the bf16 implementations; best of repeats):")
    print()
    print("| map | impl | GEMM operands | pass | time (s) | GFLOP/s | % of same-shape GEMM | vs naive |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in sweeps:
        vs = f"{r['speedup_vs_naive']:.2f}×" if r["speedup_vs_naive"] else "-"
        print(f"| {r['size']}² | {r['impl']} | {r['precision']} | {r['pass']} | {r['seconds']:.3f} | "
              f"{r['gflops']:.0f} | {r['pct_gemm']:.0f} % | {vs} |")
    if steps:
        print()
        print(f"Training step, nuclei preset, B={args.batch}, 96×96 (forward, loss, backward, Adam), seconds:")
        print()
        print("\n".join(bench_train_step.table(steps, args.step_modes)))
    if res.get("steps_cuda"):
        ref = {r["arch"]: r["seconds"] for r in res["steps_cuda"] if r["sdn_impl"] == "-"}
        print()
        print("| network | sdn impl | time (s) | vs U-Net | vs U-Net++ |")
        print("|---|---|---:|---:|---:|")
        for r in res["steps_cuda"]:
            print(f"| {r['arch']} | {r['sdn_impl']} | {r['seconds']:.2f} | {r['seconds'] / ref['unet']:.1f}× | "
                  f"{r['seconds'] / ref['unetpp']:.1f}× |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
