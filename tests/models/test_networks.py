import pytest
import torch

from napari_sdunet.models import create_model


@pytest.mark.parametrize("arch", ["unet", "unetpp", "sdunet", "sdnunet"])
@pytest.mark.parametrize("hw", [(37, 53), (16, 16), (9, 30)])
def test_any_input_size(arch, hw):
    m = create_model(arch, task="nuclei", sdn_state=8).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 1, *hw) and torch.isfinite(y).all()


def test_wrong_channels_is_a_clear_error():
    m = create_model("unet", task="liver")
    with pytest.raises(ValueError, match=r"expects input \(B, 1, H, W\)"):
        m(torch.rand(1, 3, 32, 32))


def _sensitivity(model, size=136, out=(120, 120)):
    model = model.double().eval()
    x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    model(x)[0, 0, out[0], out[1]].backward()
    return x.grad.abs().sum(1)[0]


@pytest.mark.slow
def test_sdunet_sees_farther_than_unet():
    """In eval mode, float64: an SDU-Net output pixel depends on input beyond the U-Net's reach."""
    g_unet = _sensitivity(create_model("unet", task="nuclei"))
    g_sd = _sensitivity(create_model("sdunet", task="nuclei"))
    ys, xs = torch.nonzero(g_unet, as_tuple=True)
    reach = max((120 - ys.min()).item(), (120 - xs.min()).item())
    assert reach < 100, "the U-Net's receptive field should be bounded"
    # a pixel far outside the U-Net's receptive field, up-left (dirs 0 and 2 carry information
    # rightwards and downwards)
    far = g_sd[: 120 - reach - 5, : 120 - reach - 5]
    assert g_unet[: 120 - reach - 5, : 120 - reach - 5].abs().max() == 0
    assert far.abs().max() > 0
    assert (far > 0).float().mean() > 0.5
