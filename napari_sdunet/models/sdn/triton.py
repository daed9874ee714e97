"""GPU SDN sweep: fused Triton step kernels, replayed through CUDA graphs.

On a GPU the sweep is launch-bound: the plain loop issues 10-15 small kernels per line. Here a
forward step is ONE kernel (3-tap gather of the previous line + the (3S x 3S) GEMM + bias + prior
+ GRU gates + state update, gates kept for backward) and a backward step is one fused gate-gradient
kernel plus one cuBLAS GEMM (gradient to the previous line). The non-recurrent prior term and all
weight gradients are single GEMMs outside the loops (shared with :mod:`.cpu`).
The whole forward loop and the whole backward loop are each captured once per shape into a CUDA
graph and replayed, so a sweep costs two graph launches instead of thousands of kernel launches.

Mixed precision: the GEMM operands of the fused step can be bf16/fp16 (fp32 accumulation, fp32 state
and gates) with ``dot_dtype``; fp32 operands use exact IEEE dots (no TF32) so results match the
reference.

The kernels are plain Triton, so CI tests them on CPU tensors with the Triton interpreter
(``TRITON_INTERPRET=1``, see tests/models/test_sweep_triton.py). Importing this module raises
ImportError without triton (the registry then skips it); "triton" is used by ``impl="auto"`` only
for CUDA tensors.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .sweep import register_sweep

# -- the tail of the backward pass: all-steps GEMMs after the reversed loop of step kernels --------

def _mm(a: torch.Tensor, b: torch.Tensor, lp: torch.dtype | None) -> torch.Tensor:
    """a @ b, with operands rounded to ``lp`` (result back in a's dtype) when ``lp`` is given."""
    if lp is None:
        return a @ b
    return (a.to(lp) @ b.to(lp)).to(a.dtype)


def backward_tail(dx: torch.Tensor, dapad: torch.Tensor, dc: torch.Tensor, x: torch.Tensor, w_h: torch.Tensor,
                  out: torch.Tensor, need: tuple[bool, ...], lp: torch.dtype | None = None):
    """Everything after the reversed loop: the prior term's input gradient and all weight gradients.

    ``dx`` holds the direct-path gradients, ``dapad`` (T-1, B, L+2, 3S) the gate pre-activation
    gradients in padded rows, ``dc`` (T-1, B, L, 3S) the prior-term gradients, ``out`` the padded
    output (T, B, L+2, S). Each weight gradient is one GEMM over all steps (three for W_in: one per tap).
    """
    T, B, L, S = x.shape
    S3 = 3 * S
    dc_flat = dc.view(-1, S3)
    if need[0]:
        if lp is None:
            dx[1:].view(-1, S).addmm_(dc_flat, w_h)
        else:
            dx[1:].view(-1, S).add_(_mm(dc_flat, w_h, lp))
    dw_in = db_in = dw_h = db_h = None
    if need[1]:
        da_flat = dapad.view(-1, S3)
        o_flat = out[:T - 1].reshape(-1, S)
        # tap k of padded row j is row j + k - 1 of the previous line
        if lp is not None:  # round once, not per tap
            da_flat, o_flat = da_flat.to(lp), o_flat.to(lp)
        dw_in = torch.cat((da_flat[1:].t() @ o_flat[:-1], da_flat.t() @ o_flat, da_flat[:-1].t() @ o_flat[1:]),
                          1).to(dx.dtype)
    if need[2]:
        db_in = dapad.view(-1, S3).sum(0)
    if need[3]:
        dw_h = _mm(dc_flat.t(), x[1:].reshape(-1, S), lp)
    if need[4]:
        db_h = dc_flat.sum(0)
    return (dx if need[0] else None), dw_in, db_in, dw_h, db_h


@triton.jit
def _fwd_step(prev_ptr, h_ptr, c_ptr, w_ptr, b_ptr, out_ptr, g_ptr, M, L, S,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One sweep step for a block of (rows, features).

    Rows m = b*L + i of the current line; ``prev``/``out`` are padded lines (row b*(L+2) + i + 1),
    so the taps i-1, i, i+1 are rows b*(L+2) + i + {0, 1, 2} with zeros at the line ends.
    ``c`` is the prior term (M, 3S), ``g`` receives the gates [r, z, n] (M, 3S).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < S
    prow = (rows // L) * (L + 2) + rows % L  # padded row of tap 0
    S3 = 3 * S
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(3):
        for q0 in range(0, S, BLOCK_K):
            q = q0 + tl.arange(0, BLOCK_K)
            q_ok = q < S
            u = tl.load(prev_ptr + (prow + tap)[:, None] * S + q[None, :],
                        mask=row_ok[:, None] & q_ok[None, :], other=0.0).to(DOT_DTYPE)
            wmask = q_ok[:, None] & col_ok[None, :]
            wcol = tap * S + q[:, None]  # W_in^T tile: [q, j] = W_in[gate*S + j, tap*S + q]
            wr = tl.load(w_ptr + cols[None, :] * S3 + wcol, mask=wmask, other=0.0).to(DOT_DTYPE)
            wz = tl.load(w_ptr + (S + cols[None, :]) * S3 + wcol, mask=wmask, other=0.0).to(DOT_DTYPE)
            wn = tl.load(w_ptr + (2 * S + cols[None, :]) * S3 + wcol, mask=wmask, other=0.0).to(DOT_DTYPE)
            if UPCAST:  # interpreter: its bf16 dot is wrong, so round the operands and dot in fp32
                u, wr, wz, wn = u.to(tl.float32), wr.to(tl.float32), wz.to(tl.float32), wn.to(tl.float32)
            if IEEE or UPCAST:
                acc_r = tl.dot(u, wr, acc_r, input_precision="ieee")
                acc_z = tl.dot(u, wz, acc_z, input_precision="ieee")
                acc_n = tl.dot(u, wn, acc_n, input_precision="ieee")
            else:
                acc_r = tl.dot(u, wr, acc_r)
                acc_z = tl.dot(u, wz, acc_z)
                acc_n = tl.dot(u, wn, acc_n)
    mask = row_ok[:, None] & col_ok[None, :]
    crow = c_ptr + rows[:, None] * S3 + cols[None, :]
    c_r = tl.load(crow, mask=mask, other=0.0).to(tl.float32)
    c_z = tl.load(crow + S, mask=mask, other=0.0).to(tl.float32)
    c_n = tl.load(crow + 2 * S, mask=mask, other=0.0).to(tl.float32)
    b_r = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b_z = tl.load(b_ptr + S + cols, mask=col_ok, other=0.0).to(tl.float32)
    b_n = tl.load(b_ptr + 2 * S + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + rows[:, None] * S + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.sigmoid(acc_r + b_r[None, :] + c_r)
    z = tl.sigmoid(acc_z + b_z[None, :] + c_z)
    n = 2.0 * tl.sigmoid(2.0 * (acc_n + b_n[None, :] + r * c_n)) - 1.0  # tanh
    s = h + z * (n - h)
    tl.store(out_ptr + (prow + 1)[:, None] * S + cols[None, :], s, mask=mask)
    grow = g_ptr + rows[:, None] * S3 + cols[None, :]
    tl.store(grow, r, mask=mask)
    tl.store(grow + S, z, mask=mask)
    tl.store(grow + 2 * S, n, mask=mask)


@triton.jit
def _bwd_step(grad_ptr, du_ptr, g_ptr, c_ptr, h_ptr, da_ptr, dc_ptr, dx_ptr, M, L, S,
              HAS_CARRY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gate gradients of one step, fused with the carry from the next step.

    ``du`` (B*(L+2), 3S) is dA_{t+1} W_in of the next step in padded rows: tap k of padded row j feeds
    position j + k - 2 of this line. Writes dA (padded rows of ``da``), dC and the direct dx.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < S)[None, :]
    S3 = 3 * S
    prow = (rows // L) * (L + 2) + rows % L + 1  # padded row of this position
    off = rows[:, None] * S + cols[None, :]
    g = tl.load(grad_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_CARRY:
        dcol = du_ptr + cols[None, :]
        g += tl.load(dcol + (prow + 1)[:, None] * S3, mask=mask, other=0.0)
        g += tl.load(dcol + prow[:, None] * S3 + S, mask=mask, other=0.0)
        g += tl.load(dcol + (prow - 1)[:, None] * S3 + 2 * S, mask=mask, other=0.0)
    goff = rows[:, None] * S3 + cols[None, :]
    r = tl.load(g_ptr + goff, mask=mask, other=0.0)
    z = tl.load(g_ptr + goff + S, mask=mask, other=0.0)
    n = tl.load(g_ptr + goff + 2 * S, mask=mask, other=0.0)
    c_n = tl.load(c_ptr + goff + 2 * S, mask=mask, other=0.0)
    h = tl.load(h_ptr + off, mask=mask, other=0.0)
    dn = g * z
    tl.store(dx_ptr + off, g - dn, mask=mask)
    da_n = dn * (1.0 - n * n)
    da_z = g * (n - h) * z * (1.0 - z)
    da_r = da_n * c_n * r * (1.0 - r)
    aoff = prow[:, None] * S3 + cols[None, :]
    tl.store(da_ptr + aoff, da_r, mask=mask)
    tl.store(da_ptr + aoff + S, da_z, mask=mask)
    tl.store(da_ptr + aoff + 2 * S, da_n, mask=mask)
    tl.store(dc_ptr + goff, da_r, mask=mask)
    tl.store(dc_ptr + goff + S, da_z, mask=mask)
    tl.store(dc_ptr + goff + 2 * S, da_n * r, mask=mask)


#: True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_DOT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class _Plan:
    """Buffers and launch parameters of one sweep shape; runs the loops eagerly or via CUDA graphs."""

    def __init__(self, T: int, B: int, L: int, S: int, device: torch.device, dot_dtype: torch.dtype):
        self.T, self.B, self.L, self.S = T, B, L, S
        self.M = B * L
        self.fwd_kernel, self.bwd_kernel = _fwd_step, _bwd_step
        self.dot = _DOT[dot_dtype]
        self.ieee = dot_dtype == torch.float32
        small = INTERPRET or S <= 32
        self.bm, self.bn, self.bk = (16, 16, 16) if small else (64, 32, 32)
        # a step is latency-bound: prefer smaller row blocks until the grid covers the GPU
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        while self.bm > 16 and triton.cdiv(self.M, self.bm) * triton.cdiv(S, self.bn) < sms:
            self.bm //= 2
        self.grid = (triton.cdiv(self.M, self.bm), triton.cdiv(S, self.bn))
        self.device = device

    def forward_loop(self, x, w_in, b_in, prior, out, gates):
        for t in range(1, self.T):
            self.fwd_kernel[self.grid](
                out[t - 1], x[t], prior[t - 1], w_in, b_in, out[t], gates[t - 1], self.M, self.L, self.S,
                BLOCK_M=self.bm, BLOCK_N=self.bn, BLOCK_K=self.bk, DOT_DTYPE=self.dot, IEEE=self.ieee,
                UPCAST=INTERPRET and not self.ieee)

    def backward_loop(self, grad, x, w_in, prior, gates, dapad, dc, dx, dupad):
        S3 = 3 * self.S
        for t in range(self.T - 1, 0, -1):
            self.bwd_kernel[self.grid](
                grad[t], dupad, gates[t - 1], prior[t - 1], x[t], dapad[t - 1], dc[t - 1], dx[t],
                self.M, self.L, self.S, HAS_CARRY=t < self.T - 1, BLOCK_M=self.bm, BLOCK_N=self.bn)
            torch.mm(dapad[t - 1].view(-1, S3), w_in, out=dupad)


class _Graphed:
    """CUDA graphs of one plan's loops over static buffers (one per shape/dtype/device)."""

    def __init__(self, plan: _Plan, dtype: torch.dtype):
        T, B, L, S = plan.T, plan.B, plan.L, plan.S
        dev = plan.device
        self.plan = plan
        e = dict(device=dev, dtype=dtype)
        self.x = torch.zeros(T, B, L, S, **e)
        self.w_in = torch.zeros(3 * S, 3 * S, **e)
        self.b_in = torch.zeros(3 * S, **e)
        self.prior = torch.zeros(T - 1, B, L, 3 * S, **e)
        self.out = torch.zeros(T, B, L + 2, S, **e)
        self.gates = torch.zeros(T - 1, B, L, 3 * S, **e)
        self.grad = torch.zeros(T, B, L, S, **e)
        self.dapad = torch.zeros(T - 1, B, L + 2, 3 * S, **e)
        self.dc = torch.zeros(T - 1, B, L, 3 * S, **e)
        self.dx = torch.zeros(T, B, L, S, **e)
        self.dupad = torch.zeros(B * (L + 2), 3 * S, **e)
        # warm up (compiles the kernels) on a side stream, then capture
        s = torch.cuda.Stream(device=dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            self._fwd()
            self._bwd()
        torch.cuda.current_stream(dev).wait_stream(s)
        self.g_fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g_fwd):
            self._fwd()
        self.g_bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g_bwd):
            self._bwd()

    def _fwd(self):
        self.plan.forward_loop(self.x, self.w_in, self.b_in, self.prior, self.out, self.gates)

    def _bwd(self):
        self.plan.backward_loop(self.grad, self.x, self.w_in, self.prior, self.gates, self.dapad, self.dc,
                                self.dx, self.dupad)

    def forward(self, x, w_in, b_in, prior, out, gates):
        self.x.copy_(x)
        self.w_in.copy_(w_in)
        self.b_in.copy_(b_in)
        self.prior.copy_(prior)
        self.out[0].copy_(out[0])
        self.g_fwd.replay()
        out.copy_(self.out)  # callers keep their own copies: the graph's buffers are reused
        gates.copy_(self.gates)

    def backward(self, grad, x, w_in, prior, gates, dapad, dc, dx, dupad):
        for dst, src in ((self.grad, grad), (self.x, x), (self.w_in, w_in), (self.prior, prior),
                         (self.gates, gates)):
            dst.copy_(src)
        self.g_bwd.replay()
        dapad.copy_(self.dapad)
        dc.copy_(self.dc)
        dx.copy_(self.dx)
        dupad.copy_(self.dupad)


#: Capture the loops into CUDA graphs (set False to launch the kernels eagerly, e.g. for profiling).
USE_CUDA_GRAPHS = True
#: Shapes whose graphs are kept (each holds its own static buffers); the oldest is dropped beyond this.
MAX_GRAPHS = 8
_GRAPHS: dict[tuple, _Graphed | None] = {}


def _runner(plan: _Plan, dtype: torch.dtype, dot_dtype: torch.dtype):
    """The graphed runner for this shape, or the plan itself (eager) where graphs can't be used."""
    if INTERPRET or plan.device.type != "cuda" or not USE_CUDA_GRAPHS:
        return plan
    key = (plan.T, plan.B, plan.L, plan.S, dtype, dot_dtype, plan.device)
    if key not in _GRAPHS:
        while len(_GRAPHS) >= MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        try:
            _GRAPHS[key] = _Graphed(plan, dtype)
        except Exception as err:  # capture can fail (e.g. inside another capture): run eagerly
            warnings.warn(f"SDN sweep: CUDA graph capture failed ({err}); launching kernels eagerly",
                          stacklevel=3)
            _GRAPHS[key] = None
    return _GRAPHS[key] or plan


def _eager_forward(runner, x, w_in, b_in, prior, out, gates):
    if isinstance(runner, _Graphed):
        runner.forward(x, w_in, b_in, prior, out, gates)
    else:
        runner.forward_loop(x, w_in, b_in, prior, out, gates)


class TritonSweep(torch.autograd.Function):
    """Lines-major sweep with fused Triton step kernels (forward and backward)."""

    @staticmethod
    def forward(ctx, lines, w_in, b_in, w_h, b_h, dot_dtype):  # noqa: D102
        with torch.autocast(lines.device.type, enabled=False):
            return TritonSweep._forward(ctx, lines, w_in, b_in, w_h, b_h, dot_dtype)

    @staticmethod
    def _forward(ctx, lines, w_in, b_in, w_h, b_h, dot_dtype):
        x = lines.contiguous()
        T, B, L, S = x.shape
        out = x.new_zeros(T, B, L + 2, S)
        out[0, :, 1:L + 1] = x[0]
        ctx.trivial = T == 1
        if T == 1:
            return out[:, :, 1:-1]
        w_in, b_in = w_in.contiguous(), b_in.contiguous()
        prior = torch.addmm(b_h, x[1:].reshape(-1, S), w_h.t()).view(T - 1, B, L, 3 * S)
        gates = x.new_empty(T - 1, B, L, 3 * S)
        plan = _Plan(T, B, L, S, x.device, dot_dtype)
        runner = _runner(plan, x.dtype, dot_dtype)
        _eager_forward(runner, x, w_in, b_in, prior, out, gates)
        ctx.runner = runner
        ctx.lp = None if dot_dtype == torch.float32 else dot_dtype
        ctx.save_for_backward(x, w_in, w_h, out, gates, prior)
        return out[:, :, 1:-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        if ctx.trivial:
            return grad, None, None, None, None, None
        x, w_in, w_h, out, gates, prior = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            return TritonSweep._backward(ctx, grad.to(x.dtype).contiguous(), x, w_in, w_h, out, gates, prior)

    @staticmethod
    def _backward(ctx, grad, x, w_in, w_h, out, gates, prior):
        T, B, L, S = x.shape
        dapad = x.new_zeros(T - 1, B, L + 2, 3 * S)
        dc = x.new_empty(T - 1, B, L, 3 * S)
        dx = torch.empty_like(x)
        dupad = x.new_zeros(B * (L + 2), 3 * S)
        runner = ctx.runner
        if isinstance(runner, _Graphed):
            runner.backward(grad, x, w_in, prior, gates, dapad, dc, dx, dupad)
        else:
            runner.backward_loop(grad, x, w_in, prior, gates, dapad, dc, dx, dupad)
        du3 = dupad.view(B, L + 2, 3 * S)
        dx[0] = grad[0] + du3[:, 2:L + 2, :S] + du3[:, 1:L + 1, S:2 * S] + du3[:, 0:L, 2 * S:]
        return (*backward_tail(dx, dapad, dc, x, w_h, out, ctx.needs_input_grad[:5], ctx.lp), None)


def sweep_triton(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                 b_h: torch.Tensor, dot_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused-kernel lines-major sweep (T, B, L, S). ``dot_dtype``: GEMM operand dtype (default: exact)."""
    if lines.shape[0] == 0:
        return lines.clone()
    if not _runnable(lines):
        raise RuntimeError("the Triton sweep needs a CUDA tensor (or a CPU one with TRITON_INTERPRET=1)")
    # state, gates and biases in fp32; half inputs (autocast) give half GEMM operands
    dot_dtype = dot_dtype or lines.dtype
    x = lines.float()
    w_in, b_in, w_h, b_h = (w.float() for w in (w_in, b_in, w_h, b_h))
    return TritonSweep.apply(x, w_in, b_in, w_h, b_h, dot_dtype).to(lines.dtype)


def sweep_triton_bf16(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                      b_h: torch.Tensor) -> torch.Tensor:
    """Mixed precision: bf16 GEMM operands, fp32 accumulation, state and gates."""
    return sweep_triton(lines, w_in, b_in, w_h, b_h, dot_dtype=torch.bfloat16)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _runnable(x: torch.Tensor) -> bool:
    return x.dtype in _FLOATS and (x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu"))


def _cuda_float(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in _FLOATS


# "auto" picks the fused kernels for CUDA tensors (fp32 exact; bf16/fp16 under autocast use half GEMM
# operands); on CPU they only run under the interpreter (tests)
register_sweep("triton", sweep_triton, available=_cuda_float, priority=0)
register_sweep("triton_bf16", sweep_triton_bf16, available=_cuda_float)
