"""The architecture registry: adding a network is one class plus one registration; the model methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_sdunet.checkpoint import load_checkpoint, save_checkpoint
from napari_sdunet.errors import CheckpointError, ModelConfigError
from napari_sdunet.models import (
    ArchSpec,
    ResSDN,
    SegmentationModel,
    create_model,
    get_arch,
    list_models,
    preset_kwargs,
    register_arch,
    unregister_arch,
)
from napari_sdunet.models.blocks import make_block
from training.report import paired_block, runs_block
from training.reproduce import arch_order, make_table


class TinyNet(SegmentationModel):
    """A toy architecture, defined here only: one (optionally SDN) block as encoder, a 1x1 conv as decoder."""

    arch = "tinynet"

    def __init__(self, in_channels: int = 3, out_channels: int = 1, depth: int = 1, base_filters: int = 4,
                 sdn_first: bool = False, sdn_state: int = 4):
        super().__init__()
        self._remember(dict(locals()))
        self.in_channels, self.depth = in_channels, depth
        kw = dict(state=sdn_state, directions=(0, 2), residual=True, impl="auto")
        self.encoder = make_block(in_channels, base_filters, sdn_first, kw)
        self.decoder = nn.Conv2d(base_filters, out_channels, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())


@pytest.fixture
def tiny():
    spec = register_arch(ArchSpec("tinynet", "Tiny-Net", TinyNet, baseline="unet",
                                  sdn_placement=lambda depth, n: {"sdn_first": n >= 1},
                                  preset_kwargs={"sdn_state": 4}))
    yield spec
    unregister_arch("tinynet")
    assert "tinynet" not in list_models()


def test_a_registered_architecture_is_built_saved_loaded_and_fine_tunable(tiny, tmp_path):
    assert "tinynet" in list_models() and get_arch("TinyNet") is tiny
    # the preset's shape and SDN placement come from the task and the spec
    assert preset_kwargs("tinynet", "liver") == {"in_channels": 1, "depth": 4, "sdn_first": True, "sdn_state": 4}
    model = create_model("tinynet", task="nuclei", depth=1)
    assert isinstance(model.encoder[3], ResSDN)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        want = model.eval()(x)
    folder = save_checkpoint(model, tmp_path / "tiny", task="nuclei")
    loaded, config = load_checkpoint(folder)
    assert config["arch"] == "tinynet" and type(loaded) is TinyNet
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    dec = {id(p) for p in loaded.decoder_parameters()}
    assert dec == {id(loaded.decoder.weight), id(loaded.decoder.bias)}
    assert loaded.open_gates(2.0) == 1


def test_an_unregistered_architecture_is_refused_everywhere(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown architecture 'tinynet'.*unet, unetpp, sdunet, sdnunet"):
        create_model("tinynet")
    spec = register_arch(ArchSpec("tinynet", "Tiny-Net", TinyNet))
    folder = save_checkpoint(create_model("tinynet"), tmp_path / "tiny")
    unregister_arch(spec.name)
    with pytest.raises(CheckpointError, match="unknown architecture 'tinynet'"):
        load_checkpoint(folder)


def test_registration_checks_the_class_name_and_the_baseline():
    with pytest.raises(ValueError, match="arch is 'tinynet'"):
        register_arch(ArchSpec("other", "Other", TinyNet))
    with pytest.raises(ValueError, match="baseline 'nonet'"):
        register_arch(ArchSpec("tinynet", "Tiny-Net", TinyNet, baseline="nonet"))
    assert "other" not in list_models() and "tinynet" not in list_models()


def test_the_four_networks_specs():
    assert [get_arch(a).display_name for a in list_models()] == ["U-Net", "U-Net++", "SDU-Net", "SDNU-Net"]
    assert {a: get_arch(a).baseline for a in list_models()} == {
        "unet": None, "unetpp": None, "sdunet": "unet", "sdnunet": "unetpp"}
    assert [get_arch(a).has_sdn for a in list_models()] == [False, False, True, True]
    assert preset_kwargs("sdunet", "nuclei") == {
        "in_channels": 3, "depth": 3, "sdn_encoder_levels": [1, 2, 3], "sdn_decoder_levels": [2, 1, 0],
        "sdn_state": 150, "sdn_directions": [0, 2], "sdn_residual": True}
    assert preset_kwargs("sdnunet", "polyps")["sdn_nodes"] == [[0, 0], [1, 0], [0, 1]]
    assert preset_kwargs("unet", "liver") == {"in_channels": 1, "depth": 4}


def test_decoder_parameters_of_the_networks():
    unet = create_model("sdunet", task="nuclei", base_filters=4, sdn_state=4)
    names = {n for n, p in unet.named_parameters() if any(p is q for q in unet.decoder_parameters())}
    assert names == {n for n, _ in unet.named_parameters() if n.startswith(("ups.", "head."))}
    pp = create_model("unetpp", task="nuclei", base_filters=4)
    names = {n for n, p in pp.named_parameters() if any(p is q for q in pp.decoder_parameters())}
    want = {n for n, _ in pp.named_parameters() if n.startswith("head.")
            or (n.startswith("nodes.") and not n.split(".")[1].endswith("_0"))}
    assert names == want and any(n.startswith("nodes.x0_3") for n in names)


def test_freeze_norm_stats_keeps_running_statistics_and_trains_affine_weights():
    torch.manual_seed(0)
    model = create_model("unet", task="nuclei", base_filters=4)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    weight0 = norms[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with model.freeze_norm_stats():
        model.train()  # what a training loop does: it must not switch the norms back to batch statistics
        assert model.training and not any(m.training for m in norms)
        loss = model(torch.rand(2, 3, 16, 16) * 5).mean()
        loss.backward()
        opt.step()
        with model.freeze_norm_stats():  # nested: the outer context stays in charge
            pass
        assert not any(m.training for m in norms)
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert not torch.equal(norms[0].weight, weight0)  # affine weights trained
    assert all(m.training for m in norms)  # back in the model's (train) mode
    model.eval()
    model.train()
    model(torch.rand(2, 3, 16, 16))
    assert not torch.equal(norms[0].running_mean, before[next(k for k in before if k.endswith("running_mean"))])


def test_open_gates_zeroes_gate_weights_and_sets_the_bias():
    torch.manual_seed(0)
    model = create_model("sdnunet", task="nuclei", base_filters=4, sdn_state=4)
    blocks = [m for m in model.modules() if isinstance(m, ResSDN)]
    paths = [m.sdn.project_out.weight[:4].clone() for m in blocks]
    assert model.open_gates(3.0) == len(blocks) == 5
    for m, path in zip(blocks, paths):
        out = m.sdn.project_out
        half = out.out_channels // 2
        assert torch.count_nonzero(out.weight[half:]) == 0 and torch.all(out.bias[half:] == 3.0)
        assert torch.equal(out.weight[:4], path)  # the SDN path itself is untouched
    assert create_model("unet", task="nuclei", base_filters=4).open_gates(3.0) == 0


def test_training_tables_order_and_name_any_architecture(tiny, tmp_path):
    import json

    assert sorted(["sdnunet", "tinynet", "unet", "zeta"], key=arch_order) == ["unet", "sdnunet", "tinynet", "zeta"]
    rows = [{"arch": a, "dice": 80.0, "jaccard": 70.0, "global_dice": 81.0, "paper_batch_dice": 82.0}
            for a in ("tinynet", "unet", "zeta")]
    table = make_table("nuclei", rows)
    assert table.index("| U-Net |") < table.index("| Tiny-Net |") < table.index("| zeta |")
    for arch in ("tinynet", "zeta", "unet"):  # a run folder of an unregistered name must not break the report
        run = tmp_path / arch / "run0"
        run.mkdir(parents=True)
        rec = {"spec": {"arch": arch, "seed": 0, "task": "nuclei"}, "fit": {"steps": 1, "seconds": 1.0,
               "best_val_dice": 0.5, "best_step": 1},
               "test": {"dice": 0.8, "jaccard": 0.7, "global_dice": 0.8, "paper_batch_dice": 0.8}}
        (run / "metrics.json").write_text(json.dumps(rec))
    block = runs_block("nuclei", tmp_path)
    assert block.index("| U-Net run0") < block.index("| Tiny-Net run0") < block.index("| zeta run0")
    assert "Tiny-Net − U-Net" in paired_block("nuclei", tmp_path)
