"""Augmentation on the device: each framing does what its name says, to whole batches, reproducibly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hotdog_torch import augment
from hotdog_torch.augment import PARAMS
from hotdog_torch.config import Augment

S = 32
IDENTITY = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)


def framing(**values) -> torch.Tensor:
    """One row of parameters: the identity, with these columns changed."""
    p = IDENTITY.clone()
    for name, v in values.items():
        p[0, PARAMS.index(name)] = v
    return p


def block(x0, y0, x1, y1, value=200.0, background=50.0) -> torch.Tensor:
    img = torch.full((1, 1, S, S), background)
    img[..., y0:y1, x0:x1] = value
    return img


def centre(img: torch.Tensor, threshold=125.0) -> tuple[float, float]:
    ys, xs = torch.nonzero(img[0, 0] > threshold, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def test_the_identity_leaves_the_picture_alone():
    img = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8)
    out = augment.apply(img, IDENTITY.expand(3, -1))
    assert out.dtype == torch.float32 and out.shape == img.shape
    assert torch.allclose(out, img.float(), atol=1e-3)


def test_a_shift_moves_the_subject_by_that_fraction_of_the_side():
    img = block(12, 12, 20, 20)  # centred at (15.5, 15.5)
    x, y = centre(augment.apply(img, framing(shift_x=0.25, shift_y=-0.125)))
    assert (x, y) == pytest.approx((15.5 + 8, 15.5 - 4), abs=0.01)


def test_zoom_in_enlarges_and_zoom_out_shrinks_around_the_centre():
    img = block(12, 12, 20, 20)  # 8 x 8 = 64 pixels
    bigger = augment.apply(img, framing(log_zoom=torch.tensor(2.0).log()))
    smaller = augment.apply(img, framing(log_zoom=torch.tensor(0.5).log()), "replicate")  # reflect: mirrored copies
    assert (bigger > 125).sum() == pytest.approx(256, rel=0.1) and centre(bigger) == pytest.approx((15.5, 15.5))
    assert (smaller > 125).sum() == pytest.approx(16, rel=0.3) and centre(smaller) == pytest.approx((15.5, 15.5))


def test_a_quarter_turn_makes_a_horizontal_bar_vertical_and_a_flip_mirrors():
    bar = block(4, 14, 28, 18)  # 24 wide, 4 high
    turned = augment.apply(bar, framing(angle=torch.pi / 2)) > 125
    assert turned.any(dim=3).sum() == pytest.approx(24, abs=2) and turned.any(dim=2).sum() == pytest.approx(4, abs=1)
    img = torch.randint(0, 256, (2, 1, S, S), dtype=torch.uint8)
    assert torch.allclose(augment.apply(img, framing(flip=-1).expand(2, -1)), img.flip(-1).float(), atol=1e-3)


def test_the_uncovered_border_is_the_picture_never_black():
    img = torch.randint(60, 256, (4, 1, S, S), dtype=torch.uint8)
    for border in ("reflect", "replicate"):
        out = augment.apply(img, framing(shift_x=0.4, log_zoom=-0.5).expand(4, -1), border)
        assert out.min() >= 60, border


def test_light_scales_brightness_and_contrast_and_casts_colour_within_0_255():
    grey = torch.full((1, 3, S, S), 100.0)
    dim = augment.apply(grey, framing(brightness=0.7, cast_r=1.1, cast_b=0.9))
    assert dim[0, :, 0, 0].tolist() == pytest.approx([77.0, 70.0, 63.0], abs=0.01)  # warm: red up, blue down
    flat = augment.apply(grey, framing(contrast=0.5))  # half the distance to mid-grey
    assert flat[0, 0, 0, 0].item() == pytest.approx(127.5 - 27.5 / 2, abs=0.01)
    bright = augment.apply(torch.full((1, 1, S, S), 250.0), framing(brightness=1.5))
    assert bright.max() == 255


def test_draws_are_seeded_scaled_by_strength_and_within_the_settings():
    a = Augment(enabled=True, shift=0.2, zoom=1.3, rotate=15, light=0.4)
    p = augment.draw(a, 4000, torch.Generator().manual_seed(3))
    assert torch.equal(p, augment.draw(a, 4000, torch.Generator().manual_seed(3)))
    col = {name: p[:, i] for i, name in enumerate(PARAMS)}
    assert col["shift_x"].abs().max() <= 0.2 and col["shift_x"].abs().max() > 0.19
    assert col["log_zoom"].exp().max() <= 1.3 and col["log_zoom"].exp().min() >= 1 / 1.3
    assert col["angle"].abs().max() <= torch.pi * 15 / 180
    assert set(col["flip"].tolist()) == {-1.0, 1.0} and (col["flip"] < 0).float().mean() == pytest.approx(0.5, abs=0.05)
    assert (col["brightness"] - 1).abs().max() <= 0.4 and (col["cast_r"] - 1).abs().max() <= 0.2
    half = augment.draw(a, 4000, torch.Generator().manual_seed(3), s=0.5)
    assert torch.allclose(half[:, 0], p[:, 0] / 2) and torch.equal(half[:, 4], p[:, 4])  # the flip is not ramped
    still = augment.draw(dataclasses.replace(a, flip=False), 10, torch.Generator().manual_seed(3), s=0.0)
    assert torch.equal(still, IDENTITY.expand(10, -1))


def test_each_image_is_framed_alone_so_a_share_of_a_batch_is_framed_as_in_the_whole():
    """What torchrun relies on: rows drawn for the whole batch, this process's rows taken, give the same pixels."""
    images = torch.randint(0, 256, (12, 3, S, S), dtype=torch.uint8)
    p = augment.draw(Augment(enabled=True, rotate=20), 12, torch.Generator().manual_seed(0))
    whole = augment.apply(images, p)
    for lo, hi in ((0, 5), (5, 12), (7, 8)):
        assert torch.equal(augment.apply(images[lo:hi], p[lo:hi]), whole[lo:hi])


def test_the_curriculum_ramps_to_full_strength():
    assert augment.strength(Augment(warmup_epochs=0), 1) == 1.0
    ramp = [augment.strength(Augment(warmup_epochs=3), e) for e in range(1, 6)]
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0]
