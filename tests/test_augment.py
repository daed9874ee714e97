"""Paired augmentation shared by training and fine-tuning: masks follow images, draws are reproducible."""

import torch

from napari_sdunet.augment import Augmented, augment_pair


def test_mask_follows_the_image_through_every_orientation():
    y = (torch.rand(1, 24, 24) > 0.7).float()
    x = y.repeat(3, 1, 1)
    aug = Augmented([(x, y)], intensity=0.0)
    torch.manual_seed(3)
    seen = set()
    for _ in range(40):
        xa, ya = aug[0]
        assert torch.equal(xa[0], ya[0])
        seen.add(xa[0].numpy().tobytes())
    assert len(seen) == 8  # the dihedral group: 4 rotations x 2 reflections all drawn


def test_non_square_frames_keep_their_shape_and_intensity_stays_in_range():
    rect = Augmented([(torch.rand(3, 16, 24), torch.zeros(1, 16, 24))])
    assert rect[0][0].shape == (3, 16, 24)  # no 90° rotation of non-square frames
    x, y = torch.full((3, 8, 8), 0.5), torch.zeros(1, 8, 8)
    for gamma in (False, True):
        xa, ya = augment_pair(x, y, flips=False, rot90=False, intensity=0.3, gamma=gamma)
        assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0 and torch.equal(ya, y)


def test_a_generator_makes_draws_reproducible():
    x, y = torch.rand(3, 16, 16), (torch.rand(1, 16, 16) > 0.5).float()

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [augment_pair(x, y, intensity=0.2, gamma=True, generator=g)[0] for _ in range(5)]

    a, b, c = draws(1), draws(1), draws(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
