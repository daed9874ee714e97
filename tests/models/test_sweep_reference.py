"""The SDN sweep equals a slow cell-by-cell reference, in values and gradients."""

import pytest
import torch

from napari_sdunet.models.sdn.layer import SDNCell
from napari_sdunet.models.sdn.sweep import from_lines, sweep, to_lines
from tests.models.sdn_reference import sweep_reference

SHAPES = [(5, 5), (4, 7), (7, 3), (1, 6), (6, 1)]


def _cell(S=4):
    return SDNCell(S).double()


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("hw", SHAPES)
def test_loop_equals_reference(direction, hw):
    cell = _cell()
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    args = (cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior)
    got = sweep(x, *args, direction, impl="loop")
    want = sweep_reference(x, *args, direction)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the sweep really changes everything but the first line
    first = {0: (..., slice(0, 1)), 1: (..., slice(-1, None)),
             2: (..., slice(0, 1), slice(None)), 3: (..., slice(-1, None), slice(None))}[direction]
    torch.testing.assert_close(got[first], x[first])


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_reference_reads_the_previous_line_only(direction):
    # changing a pixel must not affect cells before it in sweep order
    cell = _cell()
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    args = (cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior)
    y0 = sweep_reference(x, *args, direction)
    x2 = x.clone()
    x2[..., 3, 2] += 1.0
    y1 = sweep_reference(x2, *args, direction)
    changed = (y1 - y0).abs().sum(1)[0] > 0
    r = torch.arange(6)[:, None].expand(6, 5)
    c = torch.arange(5)[None, :].expand(6, 5)
    # distance along the sweep from the changed pixel, and across it: a 45-degree cone
    along, across = {0: (c - 2, r - 3), 1: (2 - c, r - 3), 2: (r - 3, c - 2), 3: (3 - r, c - 2)}[direction]
    assert torch.equal(changed, (along >= 0) & (across.abs() <= along))


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_lines_layout_round_trip(direction):
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(from_lines(to_lines(x, direction), direction), x)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_gradcheck_sweep(direction):
    cell = _cell(3)
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior]
    assert torch.autograd.gradcheck(lambda x, *p: sweep(x, *p, direction, impl="loop"), (x, *params))


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_loop_gradients_equal_reference(direction):
    cell = _cell()
    x = torch.randn(2, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [cell.weight_in, cell.bias_in, cell.weight_prior, cell.bias_prior]
    g = torch.randn(2, 4, 4, 6, dtype=torch.float64)
    got = torch.autograd.grad((sweep(x, *params, direction, impl="loop") * g).sum(), [x, *params])
    want = torch.autograd.grad((sweep_reference(x, *params, direction) * g).sum(), [x, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
