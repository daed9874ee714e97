"""The fast CPU sweeps (C++ kernels and pure torch) and the naive baseline equal the cell-by-cell reference."""

import pytest
import torch

from benchmarks.sweep_naive import sweep_naive
from napari_sdunet.models.sdn import cpp as sweep_cpp
from napari_sdunet.models.sdn.cpu import bf16_gemm_pays
from napari_sdunet.models.sdn.layer import SDN, SDNCell
from napari_sdunet.models.sdn.sweep import AUTO_ORDER, list_sweeps, pick_impl, sweep
from tests.models.sdn_reference import sweep_reference

SHAPES = [(5, 5), (4, 7), (7, 3), (1, 6), (6, 1), (1, 1)]


def _setup(S, hw, B=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cell = SDNCell(S).to(dtype)
    x = torch.randn(B, S, *hw, dtype=dtype, requires_grad=True)
    params = [cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior]
    return x, params


def _grads(y, g, inputs):
    grads = torch.autograd.grad((y * g).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if d is None else d for d, i in zip(grads, inputs)]


def test_fast_is_registered_first_for_cpu():
    assert "fast" in list_sweeps()
    assert AUTO_ORDER.index("fast") < AUTO_ORDER.index("loop")
    assert pick_impl(torch.zeros(1, 2, 3, 3)) == "fast"
    assert pick_impl(torch.zeros(1, 2, 3, 3, dtype=torch.float16)) != "fast"


def test_an_environment_variable_replaces_auto(monkeypatch):
    """$NAPARI_SDUNET_SWEEP: the way out when a fast path misbehaves on a machine (a new GPU)."""
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP", "loop")
    assert pick_impl(torch.zeros(1, 2, 3, 3)) == "loop"
    assert pick_impl(torch.zeros(1, 2, 3, 3), "fast") == "fast"  # a named impl is kept
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP", "nope")
    with pytest.raises(ValueError, match="NAPARI_SDUNET_SWEEP='nope'"):
        pick_impl(torch.zeros(1, 2, 3, 3))
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP", "auto")
    assert pick_impl(torch.zeros(1, 2, 3, 3)) == "fast"


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("impl", ["fast", "fast_py", "naive"])
def test_values_and_gradients_equal_reference(impl, direction, hw):
    x, params = _setup(4, hw)
    g = torch.randn(2, 4, *hw, dtype=torch.float64)
    if impl == "naive":
        y = sweep_naive(x, *params, direction)
    else:
        y = sweep(x, *params, direction, impl=impl)
    want = sweep_reference(x, *params, direction)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    for a, b in zip(_grads(y, g, [x, *params]), _grads(want, g, [x, *params])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("impl", ["fast", "fast_py"])
@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_gradcheck_fast(impl, direction):
    x, params = _setup(3, (3, 4), B=1)
    assert torch.autograd.gradcheck(lambda x, *p: sweep(x, *p, direction, impl=impl), (x, *params))


def test_cpp_kernels_are_built_and_vectorised():
    # g++ and ninja are on the build machines; without them the pure-torch path runs (tested above)
    if sweep_cpp.ops() is None:
        pytest.skip("C++ sweep kernels could not be built here (see the RuntimeWarning)")
    assert sweep_cpp.simd() or "avx512f" not in sweep_cpp._cpu_flags()


@pytest.mark.parametrize("impl,gemm", [("fast", "mkl"), ("fast", "onednn"), ("fast_py", "mkl")])
@pytest.mark.parametrize("hw", [(6, 9), (9, 6), (7, 7)])
def test_fast_float32_matches_reference_at_paper_state(impl, gemm, hw, monkeypatch):
    # float32 at S=150 (the production configuration) on square and non-square maps, all directions,
    # with either fp32 GEMM back end; 150 features are not a multiple of the 16-wide vectors, so the
    # masked tails are exercised
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_FP32_GEMM", gemm)
    x, params = _setup(150, hw, B=3, dtype=torch.float32)
    x = torch.tanh(x.detach()).requires_grad_()
    g = torch.randn(3, 150, *hw)
    for direction in (0, 1, 2, 3):
        y = sweep(x, *params, direction, impl=impl)
        want = sweep_reference(x, *params, direction)
        torch.testing.assert_close(y, want, rtol=0, atol=2e-5)
        for a, b in zip(_grads(y, g, [x, *params]), _grads(want, g, [x, *params])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", ["1", "20"])
@pytest.mark.parametrize("hw", [(6, 9), (9, 6)])
def test_fast_in_chunks_of_lines_matches_reference(rows, hw, monkeypatch):
    # a step runs in chunks of whole lines (fp32 by default, bf16 when asked): 1 row -> one line per
    # chunk; 20 rows -> 2 lines of 9 (a chunk of 2 lines, then one of 1) or 3 lines of 6 (the whole step)
    if sweep_cpp.ops() is None:
        pytest.skip("the C++ kernels are not built on this machine")
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_CHUNK_ROWS", rows)
    x, params = _setup(4, hw, B=3)
    g = torch.randn(3, 4, *hw, dtype=torch.float64)
    for direction in (0, 1, 2, 3):
        y = sweep(x, *params, direction, impl="fast")
        want = sweep_reference(x, *params, direction)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        for a, b in zip(_grads(y, g, [x, *params]), _grads(want, g, [x, *params])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    for gemm in ("mkl", "onednn"):
        monkeypatch.setenv("NAPARI_SDUNET_SWEEP_FP32_GEMM", gemm)
        x32 = torch.tanh(x.detach()).float().repeat(1, 38, 1, 1)[:, :150].requires_grad_()
        _, p150 = _setup(150, hw, B=3, dtype=torch.float32)
        g32 = torch.randn(3, 150, *hw)
        for direction in (0, 1, 2, 3):
            y = sweep(x32, *p150, direction, impl="fast")
            want = sweep_reference(x32, *p150, direction)
            torch.testing.assert_close(y, want, rtol=0, atol=2e-5)
            for a, b in zip(_grads(y, g32, [x32, *p150]), _grads(want, g32, [x32, *p150])):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    xb = torch.tanh(x.detach()).float().repeat(1, 8, 1, 1).bfloat16().requires_grad_()
    _, p32 = _setup(32, hw, B=3, dtype=torch.float32)
    gb = torch.randn(3, 32, *hw)
    chunked = sweep(xb, *p32, 2, impl="fast_bf16")
    grads = _grads(chunked.float(), gb, [xb, *p32])
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_CHUNK_ROWS", "0")
    whole = sweep(xb, *p32, 2, impl="fast_bf16")
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=0, atol=1e-2)
    for a, b in zip(grads, _grads(whole.float(), gb, [xb, *p32])):
        assert _rel(a.float(), b.float()) < 1e-2


def test_fast_default_chunks_of_a_long_step_match_reference(monkeypatch):
    # the rule as training uses it (no variable set): an fp32/fp64 step of more than 512 rows runs in
    # chunks of whole lines (here 3 lines of 180 cells: one line per chunk)
    if sweep_cpp.ops() is None:
        pytest.skip("the C++ kernels are not built on this machine")
    monkeypatch.delenv("NAPARI_SDUNET_SWEEP_CHUNK_ROWS", raising=False)
    x, params = _setup(3, (4, 180), B=3)
    g = torch.randn(3, 3, 4, 180, dtype=torch.float64)
    for direction in (2, 3):  # lines along the 180-wide axis
        y = sweep(x, *params, direction, impl="fast")
        want = sweep_reference(x, *params, direction)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        for a, b in zip(_grads(y, g, [x, *params]), _grads(want, g, [x, *params])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_fast_without_grad_matches_and_keeps_no_graph():
    x, params = _setup(5, (4, 6))
    with torch.no_grad():
        y = sweep(x, *params, 2, impl="fast")
    assert y.grad_fn is None
    torch.testing.assert_close(y, sweep_reference(x, *params, 2).detach(), rtol=0, atol=1e-12)


def test_fast_gradient_of_input_only_and_weights_only():
    x, params = _setup(4, (5, 4))
    want = torch.autograd.grad(sweep_reference(x, *params, 1).sum(), [x, *params])
    # input only (weights frozen)
    frozen = [p.detach() for p in params]
    (dx,) = torch.autograd.grad(sweep(x, *frozen, 1, impl="fast").sum(), [x])
    torch.testing.assert_close(dx, want[0], rtol=0, atol=1e-11)
    # weights only (input constant)
    got = torch.autograd.grad(sweep(x.detach(), *params, 1, impl="fast").sum(), params)
    for a, b in zip(got, want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_fast_retain_graph_backward_twice_is_stable():
    x, params = _setup(4, (4, 5))
    y = sweep(x, *params, 0, impl="fast").sum()
    g1 = torch.autograd.grad(y, [x, *params], retain_graph=True)
    g2 = torch.autograd.grad(y, [x, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sdn_layer_auto_equals_loop():
    torch.manual_seed(0)
    layer = SDN(3, 2, state=6, directions=(0, 2, 1, 3)).double()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    y_auto = layer(x)
    layer.impl = "loop"
    y_loop = layer(x)
    torch.testing.assert_close(y_auto, y_loop, rtol=0, atol=1e-12)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("impl", ["fast_bf16", "fast_py_bf16"])
@pytest.mark.parametrize("hw", [(9, 12), (12, 9), (10, 10)])
def test_fast_bf16_stays_within_bf16_error(impl, hw):
    # bf16 GEMM operands, fp32 state: relative error of values and gradients ~3e-3 (the documented
    # tolerance is 1e-2 for values, 2e-2 for gradients), on square and non-square maps, all directions
    x, params = _setup(64, hw, B=2)
    x = torch.tanh(x.detach()).requires_grad_()
    g = torch.randn(2, 64, *hw, dtype=torch.float64)
    x32 = x.detach().float().requires_grad_()
    p32 = [p.detach().float().requires_grad_() for p in params]
    for direction in (0, 1, 2, 3):
        want = sweep_reference(x, *params, direction)
        got = sweep(x32, *p32, direction, impl=impl)
        assert got.dtype == torch.float32
        assert 1e-5 < _rel(got, want) < 1e-2  # really reduced precision, and still close
        for a, b in zip(_grads(got, g.float(), [x32, *p32]), _grads(want, g, [x, *params])):
            assert _rel(a, b) < 2e-2


def test_auto_uses_bf16_sweep_under_cpu_autocast_only_where_it_pays(monkeypatch):
    x = torch.zeros(1, 2, 3, 3)
    reduced = "fast_bf16" if bf16_gemm_pays() else "fast"  # the host rule, measured once
    assert pick_impl(x) == "fast"
    assert pick_impl(x.bfloat16()) == reduced
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_BF16", "0")
    assert pick_impl(x.bfloat16()) == "fast"
    monkeypatch.setenv("NAPARI_SDUNET_SWEEP_BF16", "1")
    assert pick_impl(x.bfloat16()) == "fast_bf16"
    monkeypatch.delenv("NAPARI_SDUNET_SWEEP_BF16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pick_impl(x) == reduced
        # the exact path is still exact when asked for by name: autocast must not recast its GEMMs
        xs, params = _setup(5, (4, 6), dtype=torch.float32)
        y = sweep(xs, *params, 0, impl="fast")
    torch.testing.assert_close(y, sweep_reference(xs, *params, 0), rtol=0, atol=2e-6)


def test_sdn_layer_trains_under_bf16_autocast():
    torch.manual_seed(0)
    layer = SDN(3, 2, state=16)
    x = torch.randn(2, 3, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    ref = SDN(3, 2, state=16, impl="loop")
    ref.load_state_dict(layer.state_dict())
    y_ref = ref(x)
    assert _rel(y.float(), y_ref) < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("autocast", [False, True])
def test_sdn_layer_channels_last_equals_contiguous(autocast):
    # the training campaign runs the model channels_last, in fp32 and under bf16 autocast
    torch.manual_seed(0)
    layer = SDN(3, 4, state=16)
    x = torch.randn(2, 3, 6, 9)
    ref = SDN(3, 4, state=16, impl="loop").double()
    ref.load_state_dict(layer.state_dict())
    y_ref = ref(x.double())
    y_ref.sum().backward()
    cl = SDN(3, 4, state=16).to(memory_format=torch.channels_last)
    cl.load_state_dict(layer.state_dict())
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = cl(xc)
    y.float().sum().backward()
    tol = 3e-2 if autocast else 1e-5
    assert _rel(y.float(), y_ref) < tol
    for (name, p), (_, q) in zip(cl.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, q.grad) < 5 * tol, name


def test_pooled_buffers_are_not_reused_while_held():
    # the C++ path recycles its big buffers; an output still referenced must never be overwritten
    x, params = _setup(8, (5, 6), dtype=torch.float32)
    x = x.detach()
    y1 = sweep(x, *params, 0, impl="fast").detach()
    keep = y1.clone()
    y2 = sweep(torch.tanh(x + 1), *params, 0, impl="fast").detach()
    torch.testing.assert_close(y1, keep, rtol=0, atol=0)
    assert not torch.equal(y1, y2)
    for _ in range(2):  # and repeated training-style calls give the same values and gradients
        xr = x.clone().requires_grad_()
        grads = torch.autograd.grad(sweep(xr, *params, 2, impl="fast").square().sum(), [xr, *params])
        if _ == 0:
            first = [g.clone() for g in grads]
    for a, b in zip(grads, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pooled_buffers_from_inference_mode_are_not_reused_for_training():
    # segment (inference_mode), then fine-tune (autograd) in one process: the user's path
    x, params = _setup(8, (5, 6), dtype=torch.float32)
    x = x.detach()
    with torch.inference_mode():
        sweep(x, *params, 0, impl="fast")
        sweep(x, *params, 0, impl="fast_bf16")
    for impl in ("fast", "fast_bf16"):
        xr = x.clone().requires_grad_()
        y = sweep(sweep(xr, *params, 0, impl=impl), *params, 2, impl=impl)
        grads = torch.autograd.grad(y.square().sum(), [xr, *params])
        assert all(not g.is_inference() and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("hw", [(9, 12), (12, 9), (10, 10)])
def test_fast_bf16_on_bf16_lines_equals_the_fp32_input_path_rounded(direction, hw):
    # under autocast the lines arrive in bf16: the kernels then read them directly and return the bf16
    # state (no fp32 copies); the values must be those of the fp32-input path rounded once, bit for bit
    if sweep_cpp.ops() is None or not sweep_cpp.simd():
        pytest.skip("the C++ kernels are not built on this machine")
    x, params = _setup(32, hw, B=2, dtype=torch.float32)
    xb = torch.tanh(x.detach()).bfloat16()
    g = torch.randn(2, 32, *hw).bfloat16()
    p32 = [p.detach().requires_grad_() for p in params]
    xb_in = xb.clone().requires_grad_()
    got = sweep(xb_in, *p32, direction, impl="fast_bf16")
    assert got.dtype == torch.bfloat16
    gb = torch.autograd.grad((got.float() * g.float()).sum(), [xb_in, *p32])
    q32 = [p.detach().requires_grad_() for p in params]
    x32 = xb.float().requires_grad_()
    want = sweep(x32, *q32, direction, impl="fast_bf16")
    gw = torch.autograd.grad((want * g.float()).sum(), [x32, *q32])
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
    assert gb[0].dtype == torch.bfloat16
    torch.testing.assert_close(gb[0], gw[0].bfloat16(), rtol=0, atol=0)
    for a, b in zip(gb[1:], gw[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and the inference path gives the same values
        torch.testing.assert_close(sweep(xb, *params, direction, impl="fast_bf16"), got, rtol=0, atol=0)
    ref = sweep_reference(xb.double(), *[p.detach().double() for p in params], direction)
    assert _rel(got, ref) < 1e-2
