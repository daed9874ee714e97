"""Accuracy of each sweep implementation against float64, values and all gradients.

Two directions (0 then 2), S=150 by default, random tanh-bounded state and random output gradient.
Prints the relative error ||got - ref|| / ||ref|| of the output and of the gradients of the input
and of the four weight tensors (both cells together). The float64 reference is the "loop"
implementation, itself tested equal to the cell-by-cell reference.

    .venv/bin/python benchmarks/accuracy_sdn.py               # 48x48, B=4
    .venv/bin/python benchmarks/accuracy_sdn.py --size 24 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.sweep_naive  # noqa: E402,F401  (registers impl="naive")
from napari_sdunet.models.sdn.layer import SDNCell  # noqa: E402
from napari_sdunet.models.sdn.sweep import list_sweeps, sweep  # noqa: E402


def run(impl: str, dtype: torch.dtype, device: str, x0: torch.Tensor, g: torch.Tensor, cells) -> list[torch.Tensor]:
    x = x0.to(device, dtype).clone().requires_grad_()
    params = [[p.detach().to(device, dtype).requires_grad_() for p in
               (c.weight_in, c.bias_in, c.weight_prior, c.bias_prior)] for c in cells]
    s = x
    for d, p in zip((0, 2), params):
        s = sweep(s, *p, d, impl=impl)
    (s * g.to(device, dtype)).sum().backward()
    grads = [torch.cat([p[i].grad.flatten() for p in params]) for i in range(4)]
    return [t.detach().double().cpu() for t in (s, x.grad, *grads)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--state", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impls", nargs="+", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cells = [SDNCell(args.state) for _ in range(2)]
    x0 = torch.tanh(torch.randn(args.batch, args.state, args.size, args.size))
    g = torch.randn_like(x0)
    ref = run("loop", torch.float64, "cpu", x0, g, cells)
    impls = args.impls or [i for i in ("naive", "loop", "fast", "fast_bf16", "triton", "triton_bf16")
                           if i in list_sweeps() and (args.device == "cuda") == i.startswith("triton")]
    print(f"relative error vs float64, {args.size}x{args.size}, B={args.batch}, S={args.state}, 2 directions, "
          f"{args.device}")
    print()
    print("| impl (fp32 in) | output | d input | d W_in | d b_in | d W_h | d b_h |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for impl in impls:
        got = run(impl, torch.float32, args.device, x0, g, cells)
        rel = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
        print(f"| {impl} | " + " | ".join(f"{e:.1e}" for e in rel) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
