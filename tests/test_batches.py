"""Batches from RAM: a pure function of (seed, step), masks follow images under every transform."""

from __future__ import annotations

import torch

from napari_sdunet.batches import AugmentConfig, BatchSource


def _blobs(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images whose every channel is 255 * mask (blocky, so bilinear resampling keeps edges sharp)."""
    g = torch.Generator().manual_seed(seed)
    ims, mks = [], []
    for k in range(n):
        h, w = sizes[k % len(sizes)]
        m = (torch.rand(1, 1, h // 8, w // 8, generator=g) > 0.6).float()
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")[0].to(torch.uint8)
        ims.append((m * 255).repeat(3, 1, 1))
        mks.append(m)
    return ims, mks


def test_batches_depend_only_on_seed_and_step():
    ims, mks = _blobs(12, [(80, 96), (130, 70)])
    aug = AugmentConfig(flips=True, rot90=True, scale=(0.7, 1.5), intensity=0.2, color=0.1, gamma=0.2, noise=0.01)
    a = BatchSource(ims, mks, 4, patch=(48, 48), augment=aug, seed=3)
    b = BatchSource(ims, mks, 4, patch=(48, 48), augment=aug, seed=3)
    for step in (0, 5, 2):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    c = BatchSource(ims, mks, 4, patch=(48, 48), augment=aug, seed=4)
    assert not torch.equal(a.batch(0)[0], c.batch(0)[0])


def test_an_epoch_visits_every_item_once():
    ims, mks = _blobs(12, [(64, 64)])
    src = BatchSource(ims, mks, 4, seed=1)
    assert src.steps_per_epoch == 3
    seen = torch.cat([src.indices(s) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(12))
    assert src.indices(3).tolist() != src.indices(0).tolist()  # a new order next epoch


def test_mask_follows_image_under_every_geometric_transform():
    ims, mks = _blobs(10, [(120, 160), (90, 90)])
    for patch in ((64, 64), (48, 80)):  # square: 8 orientations; non-square: flips only
        src = BatchSource(ims, mks, 10, patch=patch, augment=AugmentConfig(flips=True, rot90=True, scale=(0.6, 1.8)))
        for step in range(4):
            x, y = src.batch(step)
            assert x.shape == (10, 3, *patch) and y.shape == (10, 1, *patch)
            assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
            agree = ((x[:, 0] >= 0.5).float() == y[:, 0]).float().mean()
            assert agree > 0.995, agree


def test_no_augmentation_gives_the_stored_frames():
    ims = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    mks = (ims[:, :1] > 128).to(torch.uint8)
    src = BatchSource(ims, mks, 3, seed=0)
    x, y = src.batch(0)
    idx = src.indices(0)
    assert torch.equal(x, ims[idx].float() / 255) and torch.equal(y, mks[idx].float())


def test_intensity_jitter_changes_the_image_only():
    ims, mks = _blobs(4, [(64, 64)])
    plain = BatchSource(ims, mks, 4, seed=0)
    jit = BatchSource(ims, mks, 4, seed=0, augment=AugmentConfig(intensity=0.3, color=0.2, gamma=0.3, noise=0.05))
    (x0, y0), (x1, y1) = plain.batch(0), jit.batch(0)
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert 0 <= float(x1.min()) and float(x1.max()) <= 1


def test_images_smaller_than_the_patch_are_padded():
    ims, mks = _blobs(3, [(40, 30)])
    x, y = BatchSource(ims, mks, 3, patch=(64, 64), augment=AugmentConfig(flips=True)).batch(0)
    assert x.shape == (3, 3, 64, 64) and ((x[:, 0] >= 0.5).float() == y[:, 0]).float().mean() > 0.99


def test_flips_and_turns_draw_all_eight_orientations_exactly():
    """Without zoom, each sample is one of the 8 dihedral copies of its frame, pixel for pixel."""
    m = (torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(0)) > 0.7).to(torch.uint8)
    x = (m * 255).repeat(3, 1, 1)
    src = BatchSource(x[None].repeat(8, 1, 1, 1), m[None].repeat(8, 1, 1, 1), 8,
                      augment=AugmentConfig(flips=True, rot90=True), seed=2)
    copies = {torch.rot90(t, k, (-2, -1)).numpy().tobytes() for k in range(4) for t in (m[0], m[0].flip(-1))}
    seen = set()
    for step in range(6):
        xb, yb = src.batch(step)
        assert torch.equal((xb[:, 0] >= 0.5).float(), yb[:, 0])
        for y in yb[:, 0].to(torch.uint8):
            assert y.numpy().tobytes() in copies
            seen.add(y.numpy().tobytes())
    assert len(seen) == 8


def test_non_square_frames_keep_their_shape_under_flips_and_turns():
    ims, mks = _blobs(4, [(16, 24)])
    x, y = BatchSource(ims, mks, 4, augment=AugmentConfig(flips=True, rot90=True, intensity=0.3, gamma=0.3)).batch(0)
    assert x.shape == (4, 3, 16, 24) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_ddp_shards_split_every_step_without_overlap():
    ims, mks = _blobs(16, [(32, 32)])
    src = BatchSource(ims, mks, 2, seed=5)
    r0, r1 = src.shard(0, 2), src.shard(1, 2)
    assert r0.steps_per_epoch == r1.steps_per_epoch == 4
    seen = torch.cat([torch.cat([r0.indices(s), r1.indices(s)]) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(16))
