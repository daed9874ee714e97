"""The fused Triton sweep equals the cell-by-cell reference, in values and gradients.

Without a GPU the kernels run on CPU tensors in the Triton interpreter. The interpreter must be
switched on before triton is imported, so those checks run in one subprocess (this file run as a
script, with TRITON_INTERPRET=1) and the tests below read its results. On a CUDA machine the same
comparisons also run on the GPU, through the CUDA-graph path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(5, 5), (4, 7), (7, 3), (1, 6), (6, 1)]
CASES = [(hw, d) for hw in SHAPES for d in (0, 1, 2, 3)]
S = 8


def _compare(impl_fn, hw, direction, device, seed=0):
    """Max abs errors of values and of each gradient (x, W_in, b_in, W_h, b_h) vs the fp64 reference."""
    from napari_sdunet.models.sdn.layer import SDNCell
    from napari_sdunet.models.sdn.sweep import from_lines, to_lines
    from tests.models.sdn_reference import sweep_reference

    torch.manual_seed(seed)
    cell = SDNCell(S).double()
    x = torch.tanh(torch.randn(2, S, *hw, dtype=torch.float64)).requires_grad_()
    params = [cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior]
    g = torch.randn(2, S, *hw, dtype=torch.float64)
    want = sweep_reference(x, *params, direction)
    want_grads = torch.autograd.grad((want * g).sum(), [x, *params], allow_unused=True)

    x32 = x.detach().float().to(device).requires_grad_()
    p32 = [p.detach().float().to(device).requires_grad_() for p in params]
    got = from_lines(impl_fn(to_lines(x32, direction).contiguous(), *p32), direction)
    got_grads = torch.autograd.grad((got * g.float().to(device)).sum(), [x32, *p32], allow_unused=True)

    def err(a, b):
        if a is None and b is None:
            return 0.0
        a = torch.zeros_like(b) if a is None else a.detach().double().cpu()
        b = torch.zeros_like(a) if b is None else b.detach()
        return float((a - b).abs().max()) if a.numel() else 0.0

    return [err(got, want.detach())] + [err(a, b) for a, b in zip(got_grads, want_grads)]


def _worker() -> None:
    """Run every case through the interpreter and print the errors as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from napari_sdunet.models.sdn.triton import INTERPRET, sweep_triton, sweep_triton_bf16

    assert INTERPRET
    out = {"fp32": {}, "bf16": {}}
    for hw, d in CASES:
        out["fp32"][f"{hw}-{d}"] = _compare(sweep_triton, hw, d, "cpu")
    for hw, d in CASES[:4]:
        out["bf16"][f"{hw}-{d}"] = _compare(sweep_triton_bf16, hw, d, "cpu")
    print(json.dumps(out))


triton = pytest.importorskip("triton", reason="triton is not installed (test-only: scripts/requirements-dev.txt)")


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("hw,direction", CASES)
def test_interpreted_kernels_equal_reference(interpreted, hw, direction):
    errs = interpreted["fp32"][f"{hw}-{direction}"]
    assert errs[0] < 2e-6, f"values differ by {errs[0]}"
    assert max(errs[1:]) < 2e-5, f"gradients (x, W_in, b_in, W_h, b_h) differ by {errs[1:]}"


def test_interpreted_bf16_dots_stay_close(interpreted):
    # bf16 GEMM operands, fp32 accumulation/state: small error, but not exact
    worst = max(max(e) for e in interpreted["bf16"].values())
    assert worst < 5e-2, interpreted["bf16"]


def test_not_used_for_cpu_outside_the_interpreter():
    from napari_sdunet.models.sdn import triton as st
    from napari_sdunet.models.sdn.sweep import pick_impl

    x = torch.zeros(1, 2, 3, 3)
    assert pick_impl(x) == "fast"
    if not st.INTERPRET:
        with pytest.raises(RuntimeError, match="CUDA"):
            st.sweep_triton(x.permute(3, 0, 2, 1).contiguous(), torch.zeros(6, 6), torch.zeros(6),
                            torch.zeros(6, 2), torch.zeros(6))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("hw,direction", CASES)
def test_cuda_kernels_equal_reference(hw, direction):
    from napari_sdunet.models.sdn.sweep import pick_impl
    from napari_sdunet.models.sdn.triton import sweep_triton

    assert pick_impl(torch.zeros(1, 1, 1, 1, device="cuda")) == "triton"
    for _ in range(2):  # second call replays the captured CUDA graphs
        errs = _compare(sweep_triton, hw, direction, "cuda")
        assert errs[0] < 2e-6 and max(errs[1:]) < 2e-5, errs


@cuda
def test_cuda_bf16_and_large_state():
    from napari_sdunet.models.sdn.triton import sweep_triton_bf16

    errs = _compare(sweep_triton_bf16, (12, 9), 0, "cuda")
    assert max(errs) < 5e-2, errs


if __name__ == "__main__":
    _worker()
