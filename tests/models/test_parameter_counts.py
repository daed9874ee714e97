import pytest

from napari_sdunet.models import count_parameters, create_model, list_models

EXPECTED = {
    "nuclei": {"unet": 1_799_393, "unetpp": 2_236_161, "sdunet": 6_161_237, "sdnunet": 5_421_687},
    "polyps": {"unet": 7_243_745, "unetpp": 9_163_329, "sdunet": 10_363_097, "sdnunet": 11_000_635},
}
EXPECTED["liver"] = {k: v - 576 for k, v in EXPECTED["polyps"].items()}


@pytest.mark.parametrize("task", sorted(EXPECTED))
@pytest.mark.parametrize("arch", ["unet", "unetpp", "sdunet", "sdnunet"])
def test_exact_parameter_count(arch, task):
    assert count_parameters(create_model(arch, task=task)) == EXPECTED[task][arch]


def test_registry_lists_the_four_networks():
    assert list_models() == ["unet", "unetpp", "sdunet", "sdnunet"]
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet")
    with pytest.raises(ValueError, match="unknown task"):
        create_model("unet", task="brain")


def test_table4_mislabelled_unetpp_is_one_ressdn_at_x01():
    # Table 4's 9.76M "U-Net++" = U-Net++ with a single ResSDN block at X0,1 (documented in models/registry.py).
    m = create_model("sdnunet", task="polyps", sdn_nodes=[[0, 1]])
    assert count_parameters(m) == 9_758_143


def test_sdn_settings_are_constructor_arguments():
    base = count_parameters(create_model("sdunet", task="nuclei"))
    four = count_parameters(create_model("sdunet", task="nuclei", sdn_directions=[0, 1, 2, 3]))
    # two more cells of 12 S^2 + 6 S per SDN layer, 6 SDN layers
    assert four - base == 6 * 2 * (12 * 150**2 + 6 * 150)
    small = create_model("sdunet", task="nuclei", sdn_state=16, sdn_residual=False,
                         sdn_encoder_levels=[1], sdn_decoder_levels=[])
    sdn_layers = [m for m in small.modules() if type(m).__name__ == "SDN"]
    assert len(sdn_layers) == 1 and sdn_layers[0].project_in.out_channels == 16
