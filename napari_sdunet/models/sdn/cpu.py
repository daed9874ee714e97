"""Fast SDN sweep: a custom autograd Function with whole-line GEMMs and a hand-written backward.

Same math as :func:`napari_sdunet.models.sdn.sweep.sweep_loop` (spec §1.2), organised for throughput.
Two back ends behind the same Function:

* **C++ kernels** (:mod:`.cpp`, ``_sweep_cpu.cpp``), used where they build: the whole loop in
  C++, each step's gate arithmetic fused into one AVX-512 pass, big buffers recycled (no page faults
  per call), bf16 copies of input and state written once where the GEMMs read them. fp32 GEMMs go
  to oneDNN or MKL, whichever :func:`fp32_gemm_backend` measured faster on the host;
* **pure torch** (this file's ``_forward`` / ``_backward``; names ``fast_py``, ``fast_py_bf16``):
  the fallback where no compiler is at hand, and a second reference in the tests.

Both keep the output in a zero-padded buffer ``(T, B, L+2, S)`` so the 3 taps of a step are a strided
window of the previous line, run each step's GEMMs on per-step blocks that stay in cache, and keep
no per-step autograd graph. Precision: ``fast`` is exact fp32 (or fp64); ``fast_bf16`` has bf16 GEMM
operands with fp32 accumulation, state, gates and biases. ``impl="auto"`` picks ``fast_bf16`` for
bf16 inputs and under CPU autocast to bf16 only where :func:`bf16_gemm_pays` on the host, else
``fast`` (benchmarks/README.md has the rule and the numbers).
"""

from __future__ import annotations

import torch

from .sweep import register_sweep


def _taps(line_pad: torch.Tensor, L: int) -> torch.Tensor:
    """View (B, L, 3S) of the taps [i-1, i, i+1] of a zero-padded line (B, L+2, S), no copy."""
    B, _, S = line_pad.shape
    return line_pad.as_strided((B, L, 3 * S), ((L + 2) * S, S, 1), line_pad.storage_offset())


def _padded(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised buffer of ``shape`` (..., L+2, F) whose first and last rows are zero (the line ends)."""
    buf = x.new_empty(shape)
    buf[..., 0, :].zero_()
    buf[..., -1, :].zero_()
    return buf


def _forward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor, b_h: torch.Tensor,
             keep: bool, lp: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the sweep on contiguous lines ``x`` (T, B, L, S).

    Returns the padded output (T, B, L+2, S) and, if ``keep``, the gates [r, z, n] (T-1, B, L, 3S)
    and the prior term (T-1, B, L, 3S) that backward needs. ``lp`` (e.g. bfloat16): dtype of the
    GEMM operands; state, gates and biases stay in x's dtype.
    """
    T, B, L, S = x.shape
    out = _padded(x, (T, B, L + 2, S))
    out[0, :, 1:L + 1] = x[0]
    if T == 1:
        return out, None, None
    S2, S3 = 2 * S, 3 * S
    gates = x.new_empty(T - 1, B, L, S3) if keep else x.new_empty(1, B, L, S3)
    prior = x.new_empty(T - 1, B, L, S3) if keep else x.new_empty(1, B, L, S3)
    u = x.new_empty(B, L, S3, dtype=lp or x.dtype)
    a = x.new_empty(B * L, S3, dtype=lp or x.dtype)
    tmp = x.new_empty(B, L, S)
    w_in_t = w_in.t() if lp is None else w_in.t().to(lp)
    w_h_t = w_h.t() if lp is None else w_h.t().to(lp)
    b_in = b_in if lp is None else b_in.to(lp)
    h_lp = None if lp is None else x.new_empty(B * L, S, dtype=lp)
    c_lp = None if lp is None else x.new_empty(B * L, S3, dtype=lp)
    a3 = a.view(B, L, S3)
    for t in range(1, T):
        g = gates[t - 1] if keep else gates[0]
        c = prior[t - 1] if keep else prior[0]
        h = x[t]
        # the prior term, one step at a time: small GEMMs stay in cache (2x faster here than one big one)
        if lp is None:
            torch.addmm(b_h, h.view(B * L, S), w_h_t, out=c.view(B * L, S3))
        else:
            torch.mm(h_lp.copy_(h.view(B * L, S)), w_h_t, out=c_lp)
            torch.add(c_lp, b_h, out=c.view(B * L, S3))
        u.copy_(_taps(out[t - 1], L))
        torch.addmm(b_in, u.view(B * L, S3), w_in_t, out=a)
        rz, r, z, n = g[..., :S2], g[..., :S], g[..., S:S2], g[..., S2:]
        torch.add(a3[..., :S2], c[..., :S2], out=rz)
        rz.sigmoid_()
        torch.addcmul(a3[..., S2:], r, c[..., S2:], out=n)
        n.tanh_()
        torch.sub(n, h, out=tmp)
        torch.addcmul(h, z, tmp, out=out[t, :, 1:L + 1])  # s = h + z (n - h)
    return out, (gates if keep else None), (prior if keep else None)


def _backward(grad: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, w_h: torch.Tensor, out: torch.Tensor,
              gates: torch.Tensor, prior: torch.Tensor, need: tuple[bool, ...], lp: torch.dtype | None = None):
    """Gradients (dx, dW_in, db_in, dW_h, db_h) of the sweep; ``need`` says which are wanted.

    One reversed loop; each step runs its four GEMMs (gradient to the previous line, prior-term input
    gradient, dW_in and dW_h accumulation) on cache-hot per-step blocks.
    """
    T, B, L, S = x.shape
    S2, S3 = 2 * S, 3 * S
    M = B * L
    dtype = x.dtype
    dx = torch.empty_like(x)
    dw_in = x.new_zeros(S3, S3)
    dw_h = x.new_zeros(S3, S)
    db_in = x.new_zeros(S3)
    db_h = x.new_zeros(S3)
    # step-independent factors of the gate derivatives, in a few whole-tensor ops (not per step):
    # P = [1 - n^2, (n - h) z (1 - z), c_n r (1 - r)]
    r_all, z_all, n_all = gates[..., :S], gates[..., S:S2], gates[..., S2:]
    p = x.new_empty(T - 1, B, L, S3)
    p1, p2, p3 = p[..., :S], p[..., S:S2], p[..., S2:]
    torch.mul(n_all, n_all, out=p1)
    p1.neg_().add_(1)
    torch.sub(n_all, x[1:], out=p2)
    p2.mul_(torch.addcmul(z_all, z_all, z_all, value=-1))
    torch.addcmul(r_all, r_all, r_all, value=-1, out=p3)
    p3.mul_(prior[..., S2:])
    # per-step buffers; with lp, GEMM operands are rounded copies
    da = x.new_empty(M, S3)
    dc = x.new_empty(M, S3)
    da3 = da.view(B, L, S3)
    da_r, da_z, da_n = da3[..., :S], da3[..., S:S2], da3[..., S2:]
    u = x.new_empty(B, L, S3, dtype=lp or dtype)
    du = x.new_empty(B, L, S3, dtype=lp or dtype)
    dxc = x.new_empty(M, S, dtype=lp or dtype)
    da_g = da if lp is None else x.new_empty(M, S3, dtype=lp)
    dc_g = dc if lp is None else x.new_empty(M, S3, dtype=lp)
    h_g = None if lp is None else x.new_empty(M, S, dtype=lp)
    w_in_g = w_in if lp is None else w_in.to(lp)
    w_h_g = w_h if lp is None else w_h.to(lp)
    g = grad[T - 1].clone()  # total gradient of the current line (output + through the next line's taps)
    t1 = x.new_empty(B, L, S)
    for t in range(T - 1, 0, -1):
        r, z = gates[t - 1][..., :S], gates[t - 1][..., S:S2]
        pt = p[t - 1]
        torch.mul(g, z, out=t1)  # dn = g z
        torch.sub(g, t1, out=dx[t])  # direct path: g (1 - z)
        torch.mul(t1, pt[..., :S], out=da_n)  # dn (1 - n^2)
        torch.mul(g, pt[..., S:S2], out=da_z)  # g (n - h) z (1 - z)
        torch.mul(da_n, pt[..., S2:], out=da_r)  # da_n c_n r (1 - r)
        dc[:, :S2] = da[:, :S2]
        torch.mul(da_n, r, out=dc[:, S2:].view(B, L, S))
        if lp is not None:
            da_g.copy_(da)
            dc_g.copy_(dc)
        h = x[t].view(M, S)
        if need[0]:  # prior term's input gradient
            if lp is None:
                dx[t].view(M, S).addmm_(dc, w_h)
            else:
                dx[t].view(M, S).add_(torch.mm(dc_g, w_h_g, out=dxc))
        if need[3]:
            if lp is None:
                dw_h.addmm_(dc.t(), h)
            else:
                dw_h.add_(dc_g.t() @ h_g.copy_(h))
        if need[1]:
            u.copy_(_taps(out[t - 1], L))
            if lp is None:
                dw_in.addmm_(da.t(), u.view(M, S3))
            else:
                dw_in.add_(da_g.t() @ u.view(M, S3))
        if need[2]:
            db_in.add_(da.sum(0))
        if need[4]:
            db_h.add_(dc.sum(0))
        # gradient to the previous line: dU = dA W_in; tap k of position i lands on position i + k - 1
        torch.mm(da_g, w_in_g, out=du.view(M, S3))
        torch.add(grad[t - 1], du[..., S:S2], out=g)
        g[:, :L - 1].add_(du[:, 1:, :S])
        g[:, 1:].add_(du[:, :L - 1, S2:])
    dx[0] = g
    return ((dx if need[0] else None), (dw_in if need[1] else None), (db_in if need[2] else None),
            (dw_h if need[3] else None), (db_h if need[4] else None))


class FastSweep(torch.autograd.Function):
    """Autograd Function for one lines-major sweep with a hand-written backward.

    ``cpp``: run the fused C++ kernels (:mod:`.cpp`) instead of the pure-torch loop above.
    """

    @staticmethod
    def forward(ctx, lines, w_in, b_in, w_h, b_h, lp, cpp):  # noqa: D102
        with _no_autocast(lines):
            x = lines.contiguous()
            ctx.lp, ctx.cpp, ctx.in_dtype = lp, cpp, x.dtype
            if cpp:
                # the bf16 GEMM copy of the input: the caller's own bf16 tensor under autocast (then
                # x is bf16 itself, and so is the output: no fp32 copy of either)
                x_g = cpp.pooled_copy(x, lp) if lp is not None and x.dtype != lp else x
                ctx.dnnl = lp is None and x.dtype == torch.float32 and fp32_gemm_backend() == "onednn"
                out, out_g, saved = cpp.forward(x, x_g, w_in, b_in, w_h, b_h, True, lp is not None, ctx.dnnl)
                # backward reads only the GEMM-dtype copies of input and state (bf16 with lp)
                ctx.save_for_backward(x_g, out_g, saved, w_in, w_h)
            else:
                out, gates, prior = _forward(x, w_in, b_in, w_h, b_h, keep=True, lp=lp)
                ctx.save_for_backward(x, w_in, w_h, out, gates, prior)
        return out[:, :, 1:-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        need = ctx.needs_input_grad[:5]
        if grad.shape[0] == 1:  # a single line: the sweep is the identity, the weights are unused
            return grad, None, None, None, None, None, None
        with _no_autocast(grad):
            if ctx.cpp:
                x_g, out_g, saved, w_in, w_h = ctx.saved_tensors
                # bf16 lines: the bf16 output gradient is read as it is, and dx comes back in bf16
                gdt = torch.bfloat16 if ctx.in_dtype == torch.bfloat16 and ctx.lp is not None else w_in.dtype
                g = grad if grad.is_contiguous() and grad.dtype == gdt else ctx.cpp.pooled_copy(grad, gdt)
                grads = ctx.cpp.backward(g, x_g, out_g, saved, w_in, w_h, need[1], need[3], ctx.dnnl)
                grads = [d if n else None for d, n in zip(grads, need)]
                if grads[0] is not None:
                    grads[0] = grads[0].to(ctx.in_dtype)
            else:
                x, w_in, w_h, out, gates, prior = ctx.saved_tensors
                grads = _backward(grad.to(x.dtype).contiguous(), x, w_in, w_h, out, gates, prior, need, ctx.lp)
        return (*grads, None, None)


class _PooledCopy(torch.autograd.Function):
    """``lines.to(dtype).contiguous()`` into a recycled buffer of the C++ kernels; gradient: the reverse."""

    @staticmethod
    def forward(ctx, lines, dtype, cpp):  # noqa: D102
        ctx.dtype = lines.dtype
        return cpp.pooled_copy(lines, dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.to(ctx.dtype), None, None


def _no_autocast(x: torch.Tensor):
    """Our GEMMs pick their own precision: autocast must not recast them (nor break ``out=``)."""
    return torch.autocast(x.device.type, enabled=False)


def _cpp_ops(x: torch.Tensor, use_cpp: bool):
    """The C++ kernels where they run and pay: CPU, float64 (tests) or float32 with AVX-512 kernels."""
    if not use_cpp or x.device.type != "cpu":
        return None
    from . import cpp as kernels

    ops = kernels.ops()
    if ops is None or (x.dtype != torch.float64 and not kernels.simd()):
        return None
    return ops


def _apply(lines, w_in, b_in, w_h, b_h, lp, use_cpp=True):
    dtype = torch.float64 if lines.dtype == torch.float64 else torch.float32  # state and gate dtype
    if dtype == torch.float64:
        lp = None  # bf16 operands with a float64 state make no sense: stay exact
    w_in, b_in, w_h, b_h = (w.to(dtype).contiguous() for w in (w_in, b_in, w_h, b_h))
    cpp = _cpp_ops(lines, use_cpp)
    # bf16 lines with bf16 operands (CPU autocast): the kernels read them as they are and return the
    # bf16 state, so neither an fp32 copy of the input nor one of the output is made
    bf16_lines = cpp is not None and lp is not None and lines.dtype == lp
    if bf16_lines:
        x = lines if lines.is_contiguous() else _PooledCopy.apply(lines, lp, cpp)
    elif cpp is not None and not (lines.is_contiguous() and lines.dtype == dtype):
        # one pass: permute to lines-major, convert, into a recycled buffer (no page faults)
        x = _PooledCopy.apply(lines, dtype, cpp)
    else:
        x = lines.to(dtype).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_h, b_h)):
        y = FastSweep.apply(x, w_in, b_in, w_h, b_h, lp, cpp)
    else:
        with _no_autocast(x):
            xc = x.contiguous()
            if cpp:
                x_g = (xc if bf16_lines else cpp.pooled_copy(xc, lp)) if lp else xc
                dnnl = lp is None and xc.dtype == torch.float32 and fp32_gemm_backend() == "onednn"
                out = cpp.forward(xc, x_g, w_in, b_in, w_h, b_h, False, lp is not None, dnnl)[0]
            else:
                out, _, _ = _forward(xc, w_in, b_in, w_h, b_h, keep=False, lp=lp)
        y = out[:, :, 1:-1]
    return y.to(lines.dtype)


def sweep_fast(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
               b_h: torch.Tensor) -> torch.Tensor:
    """Fast lines-major sweep (T, B, L, S); same values and gradients as ``sweep_loop``.

    C++ kernels where built (:mod:`.cpp`), else the pure-torch loop of this module.
    """
    if lines.shape[0] == 0:
        return lines.clone()
    return _apply(lines, w_in, b_in, w_h, b_h, None)


def sweep_fast_bf16(lines: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_h: torch.Tensor,
                    b_h: torch.Tensor) -> torch.Tensor:
    """Mixed precision: bf16 GEMM operands (fp32 accumulation), fp32 state, gates and biases.

    4.5x the fp32 GEMM throughput on this AVX512-BF16 CPU, more with AMX; not exact (see
    benchmarks/README.md). ``impl="auto"`` uses it for bf16 inputs and under CPU autocast to bf16
    where :func:`bf16_gemm_pays` (measured on the host), else ``fast`` in fp32.
    """
    if lines.shape[0] == 0:
        return lines.clone()
    return _apply(lines, w_in, b_in, w_h, b_h, torch.bfloat16)


def sweep_fast_py(lines, w_in, b_in, w_h, b_h):
    """``fast`` without the C++ kernels: the pure-torch loop (fallback, and a reference for tests)."""
    return lines.clone() if lines.shape[0] == 0 else _apply(lines, w_in, b_in, w_h, b_h, None, use_cpp=False)


def sweep_fast_py_bf16(lines, w_in, b_in, w_h, b_h):
    """``fast_bf16`` without the C++ kernels."""
    if lines.shape[0] == 0:
        return lines.clone()
    return _apply(lines, w_in, b_in, w_h, b_h, torch.bfloat16, use_cpp=False)


#: GEMM shape of the host check: one sweep step's tap GEMM, (B*L x 3S) @ (3S x 3S) at B*L=960, S=150.
PROBE_SHAPE = (960, 450)
#: bf16 must beat fp32 by this factor at that shape to be used (a margin for timing noise).
BF16_MARGIN = 1.25
_bf16_verdict: dict[int, bool] = {}


_fp32_backend: dict[int, str] = {}


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` through oneDNN's matmul (the op Inductor uses on CPU), bypassing MKL's sgemm."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def fp32_gemm_probe(repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of the sweep step's fp32 GEMM through MKL (torch.mm) and through oneDNN, on this host, now."""
    import time

    m, k = PROBE_SHAPE
    a, w = torch.randn(m, k), torch.randn(k, k)
    o = torch.empty(m, k)
    rates = []
    for fn in (lambda: torch.mm(a, w.t(), out=o), lambda: onednn_linear(a, w)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates.append(2 * m * k * k / best / 1e9)
    return rates[0], rates[1]


def fp32_gemm_backend() -> str:
    """"onednn" or "mkl": the faster fp32 GEMM at the sweep's shapes on this host (measured once per thread count).

    On AMD CPUs MKL's sgemm runs AVX2 kernels (about 90 GFLOP/s per core on this EPYC), oneDNN's
    AVX-512 ones (about 190); on Intel they are close. ``NAPARI_SDUNET_SWEEP_FP32_GEMM=mkl|onednn``
    forces the choice.
    """
    import os

    forced = os.environ.get("NAPARI_SDUNET_SWEEP_FP32_GEMM", "").strip().lower()
    if forced in ("mkl", "onednn"):
        return forced
    n = torch.get_num_threads()
    if n not in _fp32_backend:
        try:
            with torch.autocast("cpu", enabled=False), torch.no_grad():
                mkl, dnnl = fp32_gemm_probe()
            _fp32_backend[n] = "onednn" if dnnl >= 1.1 * mkl else "mkl"
        except Exception:  # a torch without mkldnn: MKL/OpenBLAS it is
            _fp32_backend[n] = "mkl"
    return _fp32_backend[n]


def gemm_probe(threads: int | None = None, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of the sweep step's GEMM in fp32 and with bf16 operands, on this host, now."""
    import time

    m, k = PROBE_SHAPE
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rates = []
        for dt in (torch.float32, torch.bfloat16):
            a, w = torch.randn(m, k).to(dt), torch.randn(k, k).to(dt)
            o = torch.empty(m, k, dtype=dt)
            torch.mm(a, w, out=o)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, w, out=o)
                best = min(best, time.perf_counter() - t0)
            rates.append(2 * m * k * k / best / 1e9)
    finally:
        torch.set_num_threads(old)
    return rates[0], rates[1]


def bf16_gemm_pays() -> bool:
    """Whether bf16 GEMM operands beat fp32 at the sweep's shapes on this host (measured once per thread count).

    The issue's rule is "bf16 + fp32 accumulation on AMX hosts, fp32 elsewhere"; we decide by
    measurement instead, because some non-AMX CPUs (AVX512-BF16, e.g. this 2-core AMD EPYC: 4.5x)
    also run bf16 GEMMs much faster, and others emulate them slower than fp32.
    ``NAPARI_SDUNET_SWEEP_BF16=1`` / ``=0`` forces the answer.
    """
    import os

    forced = os.environ.get("NAPARI_SDUNET_SWEEP_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    n = torch.get_num_threads()
    if n not in _bf16_verdict:
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            fp32, bf16 = gemm_probe()
        _bf16_verdict[n] = bf16 >= BF16_MARGIN * fp32
    return _bf16_verdict[n]


def _reduced(x: torch.Tensor) -> bool:
    """Reduced precision asked for: a bf16 input, or a float32 one under CPU autocast to bf16."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or (autocast_bf16 and x.dtype == torch.float32)


def _cpu_fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and (x.dtype in (torch.float32, torch.float64) or _reduced(x))


def _cpu_bf16(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _reduced(x) and bf16_gemm_pays()


register_sweep("fast", sweep_fast, priority=0, available=_cpu_fast, strided=True)
register_sweep("fast_bf16", sweep_fast_bf16, priority=0, available=_cpu_bf16, strided=True)
register_sweep("fast_py", sweep_fast_py, available=_cpu_fast, strided=True)
register_sweep("fast_py_bf16", sweep_fast_py_bf16, available=_cpu_fast, strided=True)
