"""Why the fast CPU sweep runs every GEMM per step: GEMM throughput by shape on this CPU.

Compares the per-step GEMM shapes of the sweep (M = B*L rows, cache-resident) with the same work
done as one big GEMM over k steps (M = k*B*L rows), for the prior term (K = S), its input gradient
(N = S), dW_h and dW_in (K = rows). Default: 48x48 maps, B=20, S=150, 1 thread.

    .venv/bin/python benchmarks/gemm_shapes.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def best(fn, n: int = 5) -> float:
    fn()
    t_best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t_best = min(t_best, time.perf_counter() - t0)
    return t_best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state", type=int, default=150)
    ap.add_argument("--rows", type=int, default=20 * 48, help="B*L, rows of one step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    S, M = args.state, args.rows
    S3 = 3 * S

    def rep(name: str, flops: float, fn) -> None:
        print(f"| {name} | {flops / best(fn) / 1e9:.0f} |")

    print("| GEMM | GFLOP/s |")
    print("|---|---:|")
    a, b, c = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    rep("square 2048³", 2 * 2048**3, lambda: torch.mm(a, b, out=c))
    w_in, w_h, bias = torch.randn(S3, S3), torch.randn(S3, S), torch.randn(S3)
    for k in (1, 4, 16):
        _shapes(rep, k, k * M, S, w_in, w_h, bias)


def _shapes(rep, k: int, rows: int, S: int, w_in, w_h, bias) -> None:
    S3 = 3 * S
    u, da, o = torch.randn(rows, S3), torch.randn(rows, S3), torch.empty(rows, S3)
    x, dx = torch.randn(rows, S), torch.randn(rows, S)
    acc_in, acc_h = torch.zeros(S3, S3), torch.zeros(S3, S)
    tag = "1 step" if k == 1 else f"{k} steps at once"
    rep(f"recurrent U W_in^T ({tag})", 2 * rows * S3 * S3, lambda: torch.addmm(bias, u, w_in.t(), out=o))
    rep(f"prior x W_h^T, K=S ({tag})", 2 * rows * S3 * S, lambda: torch.addmm(bias, x, w_h.t(), out=o))
    rep(f"dx += dC W_h, N=S ({tag})", 2 * rows * S3 * S, lambda: dx.addmm_(da, w_h))
    rep(f"dW_h += dC^T x ({tag})", 2 * rows * S3 * S, lambda: acc_h.addmm_(da.t(), x))
    rep(f"dW_in += dA^T U ({tag})", 2 * rows * S3 * S3, lambda: acc_in.addmm_(da.t(), u))

if __name__ == "__main__":
    main()
