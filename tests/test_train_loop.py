"""The shared training loop: loss falls, cancel, resume, decoder-only, best weights kept."""

import math

import pytest
import torch

from napari_sdunet.batches import SegDataset
from napari_sdunet.models import create_model
from napari_sdunet.train_loop import FitConfig, fit


def _blobs(n=12, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    xs, ys = [], []
    for _ in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g)
        r = torch.randint(3, 7, (1,), generator=g)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).float()
        img = 0.3 * torch.rand(3, size, size, generator=g) + 0.6 * m
        xs.append(img)
        ys.append(m[None])
    return SegDataset(torch.stack(xs), torch.stack(ys))


def _small_unet():
    return create_model("unet", task="nuclei", base_filters=8, depth=2)


def test_loss_falls_and_best_weights_kept():
    data = _blobs()
    seen = []
    res = fit(_small_unet(), data, _blobs(6, seed=1), FitConfig(epochs=40, lr=5e-3, batch_size=4, patience=None),
              device="cpu", on_progress=seen.append)
    losses = [p.loss for p in seen if p.kind == "val"]
    assert losses[-1] < 0.7 * losses[0]
    assert res.best_val_dice > 0.5 and res.steps == 120 and not res.cancelled
    assert seen[-1].kind == "done"


def test_cancel_stops_promptly():
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    res = fit(_small_unet(), _blobs(), None, FitConfig(epochs=50, batch_size=4), device="cpu", should_stop=stop)
    assert res.cancelled and res.steps == 3


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = FitConfig(epochs=4, lr=1e-3, batch_size=4, patience=None, seed=3)
    full = _small_unet()
    torch.manual_seed(0)
    full.load_state_dict(_small_unet().state_dict())
    init = {k: v.clone() for k, v in full.state_dict().items()}
    fit(full, _blobs(), None, cfg, device="cpu")

    part = _small_unet()
    part.load_state_dict(init)
    calls = {"n": 0}

    def stop_after_5():
        calls["n"] += 1
        return calls["n"] > 5

    r1 = fit(part, _blobs(), None, cfg, device="cpu", should_stop=stop_after_5, state_dir=tmp_path / "s")
    assert r1.cancelled and r1.steps == 5
    resumed = _small_unet()
    r2 = fit(resumed, _blobs(), None, cfg, device="cpu", state_dir=tmp_path / "s")
    assert r2.steps == 12
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_decoder_only_freezes_encoder():
    m = _small_unet()
    enc_before = {k: v.clone() for k, v in m.named_parameters() if k.startswith(("inc", "downs"))}
    fit(m, _blobs(), None, FitConfig(epochs=1, batch_size=4, trainable="decoder"), device="cpu")
    for k, v in m.named_parameters():
        if k in enc_before:
            assert torch.equal(v, enc_before[k])
    pp = create_model("unetpp", task="nuclei", base_filters=4)
    names = {n for n, p in pp.named_parameters() if any(p is q for q in pp.decoder_parameters())}
    assert any(n.startswith("nodes.x0_3") for n in names) and not any(n.startswith("nodes.x1_0") for n in names)


def test_no_validation_set_keeps_final_weights():
    res = fit(_small_unet(), _blobs(), None, FitConfig(epochs=1, batch_size=4), device="cpu")
    assert math.isnan(res.history[-1]["val_dice"])


def test_cpu_bf16_trains_in_bfloat16_and_keeps_fp32_weights():
    model = create_model("sdunet", task="nuclei", base_filters=4)
    dtypes = set()
    hook = model.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
    seen = []
    res = fit(model, _blobs(), None, FitConfig(epochs=25, lr=5e-3, batch_size=4, patience=None, cpu_bf16=True),
              device="cpu", on_progress=seen.append)
    hook.remove()
    losses = [p.loss for p in seen if p.kind == "step"]
    assert dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses) and sum(losses[-6:]) < 0.8 * sum(losses[:6])
    assert res.steps == 75


def test_every_engine_report_is_one_progress_class():
    """Training, fine-tuning and prediction report through napari_sdunet.events.Progress alone."""
    import napari_sdunet.finetune as ft
    import napari_sdunet.inference as inf
    import napari_sdunet.train_loop as tl
    from napari_sdunet.events import Progress, status

    assert tl.Progress is Progress and inf.Progress is Progress
    assert not hasattr(ft, "fit_schedule")
    assert status("saving").kind == "status"
    import pytest

    with pytest.raises(ValueError, match="unknown progress kind"):
        Progress("stepz")


def test_validation_batch_size_is_its_own_and_leaves_the_dice_unchanged(monkeypatch):
    import napari_sdunet.train_loop as tl

    seen, real = [], tl.evaluate_dice

    def spy(model, data, batch_size=20, *a, **k):
        seen.append(batch_size)
        return real(model, data, batch_size, *a, **k)

    monkeypatch.setattr(tl, "evaluate_dice", spy)
    cfg = FitConfig(epochs=1, lr=5e-3, batch_size=4, val_batch_size=2, patience=None)
    fit(_small_unet(), _blobs(8), _blobs(5, seed=1), cfg, device="cpu")
    assert seen and set(seen) == {2}
    torch.manual_seed(0)
    model = _small_unet().eval()
    val = _blobs(5, seed=1)
    assert math.isclose(real(model, val, 1), real(model, val, 5), abs_tol=1e-6)


def test_group_dice_pools_each_volume_and_ignores_one_slice_specks():
    """The liver's validation: a few false pixels on a liver-free slice sink the per-slice mean,
    not the per-volume Dice the liver is tested with."""
    from napari_sdunet.train_loop import dice_score, evaluate_dice

    t = torch.zeros(4, 1, 8, 8)
    t[0, 0, 2:6, 2:6] = 1  # volume a: one slice with liver, one without
    t[2, 0, 0:4, 0:8] = 1  # volume b: 32 liver pixels on slice 2, slice 3 empty
    p = t.clone()
    p[1, 0, 0, 0] = 1  # a single false pixel on a's empty slice
    p[2, 0, 0:2, 0:8] = 0  # b: half its liver missed
    groups = ["a", "a", "b", "b"]
    assert math.isclose(dice_score(p, t), (1 + 0 + 2 * 16 / 48 + 1) / 4, abs_tol=1e-6)
    assert math.isclose(dice_score(p, t, "group", groups), (2 * 16 / 33 + 2 * 16 / 48) / 2, abs_tol=1e-9)
    assert dice_score(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), "group", ["a", "b"]) == 1.0
    for bad in (None, ["a", "a", "", "b"], ["a"]):
        try:
            dice_score(p, t, "group", bad)
        except ValueError as e:
            assert "group" in str(e)
        else:
            raise AssertionError("no error without groups")
    # evaluate_dice: the same numbers from a model on a data set with groups
    val = _blobs(6, seed=2)
    val.groups = ["v1", "v1", "v1", "v2", "v2", "v2"]
    model = _small_unet().eval()
    from napari_sdunet.train_loop import predict_probabilities

    probs = predict_probabilities(model, val.images, False)
    assert math.isclose(evaluate_dice(model, val, 4, metric="group"),
                        dice_score(probs, val.masks, "group", val.groups), abs_tol=1e-9)
    assert math.isclose(evaluate_dice(model, val, 4), dice_score(probs, val.masks), abs_tol=1e-6)


def test_fit_validates_by_the_metric_it_is_given():
    val = _blobs(6, seed=2)
    val.groups = ["v1", "v1", "v1", "v2", "v2", "v2"]
    cfg = FitConfig(epochs=1, lr=5e-3, batch_size=4, patience=None, val_metric="group")
    res = fit(_small_unet(), _blobs(8), val, cfg, device="cpu")
    assert res.history and 0 <= res.best_val_dice <= 1
    try:
        fit(_small_unet(), _blobs(8), val, FitConfig(epochs=1, val_metric="volume"), device="cpu")
    except ValueError as e:
        assert "val_metric" in str(e)
    else:
        raise AssertionError("an unknown metric must be refused")


def test_micro_batches_sum_to_the_whole_batch_gradient():
    """A batch in pieces gives the whole batch's gradient (uneven pieces too) where no BatchNorm sees the
    pieces, and fit() with micro_batches trains to the same weights."""
    from napari_sdunet.train_loop import accumulate_gradients

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 1, 1))
    data = _blobs(5)
    x, y = data.images.float(), data.masks.float()
    grads = []
    for parts in (1, 2, 3):
        net.zero_grad()
        loss = accumulate_gradients(net, x, y, parts, None, torch.bfloat16, False)
        grads.append(([p.grad.clone() for p in net.parameters()], loss))
    for g, loss in grads[1:]:
        assert abs(loss - grads[0][1]) < 1e-5
        for a, b in zip(g, grads[0][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def trained(micro):
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 1, 1))
        fit(m, _blobs(8), None, FitConfig(epochs=2, lr=1e-2, batch_size=4, micro_batches=micro), device="cpu")
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(trained(1), trained(2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="micro_batches"):
        fit(net, _blobs(4), None, FitConfig(epochs=1, batch_size=2, micro_batches=0), device="cpu")
