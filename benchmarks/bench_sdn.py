"""Benchmark of the SDN sweep implementations and of whole training steps, in one run.

Measures, on the current machine and in the same process (so ratios are comparable):

1. large-matmul throughput (the ceiling we compare to) and a GEMM of the sweep step's own shape;
2. each sweep implementation, two directions (0 then 2, as in the paper), S=150, B=20, for each
   map size: forward and forward+backward, time, GFLOP/s and % of the matmul throughput;
3. one training step (forward, 0.5 BCE + soft-Dice loss, backward, Adam) of U-Net, U-Net++, SDU-Net
   and SDNU-Net with the nuclei preset (96x96 RGB).

FLOPs are model FLOPs: a swept cell costs 24 S^2 forward (12 S^2 MACs: 9 S^2 recurrent, 3 S^2 prior),
forward+backward 3x that; gate elementwise work is not counted.

    .venv/bin/python benchmarks/bench_sdn.py                      # default run (< 10 min, 2 CPU cores)
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

from napari_sdunet.models import create_model  # noqa: E402
from napari_sdunet.models.sdn import SDNCell  # noqa: E402
from napari_sdunet.models.sweep import list_sweeps, sweep  # noqa: E402
from napari_sdunet.models.sweep_naive import sweep_naive  # noqa: E402


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


def step_gemm_gflops(m: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """(m x k) @ (k x k) + bias: the shape of one sweep step's recurrent GEMM."""
    u = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(k, k, dtype=dtype, device=device)
    b = torch.randn(k, dtype=dtype, device=device)
    o = torch.empty(m, k, dtype=dtype, device=device)
    inner = 10

    def run():
        for _ in range(inner):
            torch.addmm(b, u, w.t(), out=o)

    return inner * 2 * m * k * k / best_time(run, repeats, device) / 1e9


def sweep_flops(h: int, w: int, S: int, B: int, directions=(0, 2)) -> float:
    cells = sum(h * (w - 1) if d in (0, 1) else w * (h - 1) for d in directions)
    return 24.0 * S * S * cells * B


def bench_sweeps(args, device: torch.device, dtype: torch.dtype, mm: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    cells = [SDNCell(args.state).to(device=device, dtype=dtype) for _ in (0, 2)]
    impls = ["naive"] + [i for i in args.impls if i != "naive"]
    rows = []
    for size in args.sizes:
        x0 = torch.tanh(torch.randn(args.batch, args.state, size, size, generator=gen)).to(device, dtype)
        for impl in impls:
            for backward in (False, True):
                def run(impl=impl, backward=backward, x0=x0):
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
                rows.append({"size": size, "impl": impl, "pass": "fwd+bwd" if backward else "fwd",
                             "seconds": t, "gflops": flops / t / 1e9, "pct_matmul": 100 * flops / t / 1e9 / mm})
                print(f"  sweep {size}x{size} {impl:>7} {rows[-1]['pass']:>7}: {t:8.3f} s "
                      f"{rows[-1]['gflops']:7.1f} GFLOP/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["pass"] == r["pass"] and b["impl"] == "naive")
        r["speedup_vs_naive"] = base["seconds"] / r["seconds"]
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


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["device"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            info["device"] = platform.processor()
        info["cores"] = os.cpu_count()
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
                    help="sweep implementations besides the naive loop (default: every registered one)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after a warm-up) below 96x96")
    ap.add_argument("--repeats-96", type=int, default=1, help="timed repeats at 96x96 and above")
    ap.add_argument("--mm-size", type=int, default=2048, help="size of the square reference matmul")
    ap.add_argument("--mm-repeats", type=int, default=10, help="timed repeats of the reference matmuls")
    ap.add_argument("--no-steps", action="store_true", help="skip the training-step benchmark")
    ap.add_argument("--step-impls", nargs="+", default=["auto"],
                    help="sdn_impl values for the SD networks' training steps (e.g. auto loop)")
    ap.add_argument("--step-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the sweeps' GEMMs too
    if args.impls is None:
        wanted = ["loop", "fast"] + (["triton", "triton_bf16"] if device.type == "cuda" else ["fast_bf16"])
        args.impls = [i for i in wanted if i in list_sweeps()]
    info = machine_info(device)
    info["load_before"] = load()
    print(f"# {info}", flush=True)

    m = args.batch * max(args.sizes)

    def ceilings() -> tuple[float, float, float]:
        return (matmul_gflops(args.mm_size, dtype, device, args.mm_repeats),
                matmul_gflops(args.mm_size, torch.bfloat16, device, args.mm_repeats),
                step_gemm_gflops(m, 3 * args.state, dtype, device, args.mm_repeats))

    # measured before and after the sweeps; the best is kept (on a shared machine the best of many
    # repeats is the machine's capacity, as for every timing below)
    mm, mm_bf16, step_mm = ceilings()
    print(f"  (first reading) matmul fp32 {args.mm_size}^3: {mm:.1f} GFLOP/s; bf16: {mm_bf16:.1f} GFLOP/s; "
          f"step GEMM ({m}x{3 * args.state})@({3 * args.state}x{3 * args.state}) fp32: {step_mm:.1f} GFLOP/s",
          flush=True)
    res = {"machine": info, "matmul_gflops": mm, "matmul_bf16_gflops": mm_bf16, "step_gemm_gflops": step_mm,
           "batch": args.batch, "state": args.state}
    sweeps = bench_sweeps(args, device, dtype, mm)
    mm, mm_bf16, step_mm = (max(a, b) for a, b in zip((mm, mm_bf16, step_mm), ceilings()))
    res.update(matmul_gflops=mm, matmul_bf16_gflops=mm_bf16, step_gemm_gflops=step_mm)
    for r in sweeps:
        r["pct_matmul"] = 100 * r["gflops"] / mm
    res["sweeps"] = sweeps
    res["steps"] = [] if args.no_steps else bench_steps(args, device)
    info["load_after"] = load()

    print()
    print(f"Machine: {info['device']}, torch {info['torch']}, {info['threads']} threads; "
          f"load average before {info['load_before']}, after {info['load_after']}")
    print(f"Matmul fp32 {args.mm_size}^3: **{mm:.0f} GFLOP/s** (bf16 {mm_bf16:.0f}); "
          f"step-shaped GEMM ({m}x{3 * args.state})@({3 * args.state}x{3 * args.state}): {step_mm:.0f} GFLOP/s")
    print()
    print(f"Sweep, 2 directions, S={args.state}, B={args.batch}, fp32 (best of repeats):")
    print()
    print("| map | impl | pass | time (s) | GFLOP/s | % of matmul | vs naive |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in res["sweeps"]:
        print(f"| {r['size']}² | {r['impl']} | {r['pass']} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
              f"{r['pct_matmul']:.0f} % | {r['speedup_vs_naive']:.2f}× |")
    if res["steps"]:
        ref = {r["arch"]: r["seconds"] for r in res["steps"] if r["sdn_impl"] == "-"}
        print()
        print(f"Training step, nuclei preset, B={args.batch}, 96×96 (forward, loss, backward, Adam):")
        print()
        print("| network | sdn impl | time (s) | vs U-Net | vs U-Net++ |")
        print("|---|---|---:|---:|---:|")
        for r in res["steps"]:
            print(f"| {r['arch']} | {r['sdn_impl']} | {r['seconds']:.2f} | {r['seconds'] / ref['unet']:.1f}× | "
                  f"{r['seconds'] / ref['unetpp']:.1f}× |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
