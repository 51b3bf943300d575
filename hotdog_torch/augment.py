"""Augmentation on the device: each image of a batch framed afresh, as a person holding a camera would frame it.

Per image, a random affine map (shift as a fraction of the side, zoom in and out, rotation, a horizontal flip) and
a random light (brightness, contrast, a colour cast for RGB).  The whole batch is one affine_grid-like broadcast and
one grid_sample call on the tensors already on the device: no Python loop over images, no trip to the host.

The draw and the warp are apart on purpose.  draw() turns a generator into one row of numbers per image (PARAMS
names the columns); apply() warps images with their rows.  A run draws the rows of a whole epoch at once, in the
epoch's order, so under torchrun each process takes the rows of its own images and augments them exactly as one
process would; and a mid-epoch checkpoint can carry the rows as they were drawn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Augment

# What each column of a row of draw() holds.
PARAMS = ("shift_x", "shift_y", "log_zoom", "angle", "flip", "brightness", "contrast", "cast_r", "cast_g", "cast_b")
PADDING = {"reflect": "reflection", "replicate": "border"}  # data.augment.border -> grid_sample's name


def strength(a: Augment, epoch: int) -> float:
    """The curriculum: 0 before the first epoch, rising linearly to 1 at epoch warmup_epochs (epochs count from 1).

    With warmup_epochs 0 the first epoch is augmented in full; with W, epoch e is augmented at e / (W + 1) up to W.
    """
    return 1.0 if a.warmup_epochs == 0 else min(1.0, epoch / (a.warmup_epochs + 1))


def recorded(a: Augment, epoch: int) -> dict:
    """What an epoch's metrics record of the augmentation: its strength, in an augmented run."""
    return {"augment_strength": strength(a, epoch)} if a.enabled else {}


def draw(a: Augment, n: int, generator: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """(n, len(PARAMS)) random framings at strength s in [0, 1], on the generator's device.

    Magnitudes scale with s (a shift of s·shift of the side at most, a zoom within ×/÷ zoom^s, a turn within
    ±s·rotate degrees, a light within ±s·light); the flip, a symmetry of every class rather than a difficulty,
    is a coin toss whatever s.  The same uniforms are drawn whatever the settings, so a change of magnitude
    never changes which image gets which draw.
    """
    u = torch.rand(n, len(PARAMS), generator=generator, device=generator.device) * 2 - 1  # uniform in [-1, 1)
    half = a.light / 2
    limits = (a.shift, a.shift, math.log(a.zoom), math.radians(a.rotate), 0, a.light, a.light, half, half, half)
    p = torch.empty_like(u)
    for k, limit in enumerate(limits):  # by Python numbers: a tensor of them would be a copy from the host
        p[:, k] = u[:, k] * (limit * s)
    p[:, 4] = torch.where((u[:, 4] < 0) & a.flip, -1.0, 1.0)  # -1: mirrored
    p[:, 5:] += 1  # brightness, contrast and cast are gains around 1
    return p


def grid(p: torch.Tensor, size: int) -> torch.Tensor:
    """The sampling grid of grid_sample (N, size, size, 2) that frames each image as its row of p says.

    The picture is moved by (shift_x, shift_y) of its side, scaled by zoom, turned by angle and maybe mirrored:
    out = zoom·R(angle)·F·in + shift.  grid_sample asks the inverse, where each output pixel comes from:
    in = F·R(-angle)·(out - shift) / zoom, in grid_sample's coordinates ([-1, 1] across the image).
    Written as one broadcast: affine_grid's batched matrix product is several times slower on the CPU.
    """
    f, zoom, cos, sin = p[:, 4], p[:, 2].exp(), p[:, 3].cos(), p[:, 3].sin()
    a00, a01, a10, a11 = f * cos / zoom, f * sin / zoom, -sin / zoom, cos / zoom
    dx, dy = 2 * p[:, 0], 2 * p[:, 1]  # a fraction of the side, in coordinates that span 2 across it
    t0, t1 = -(a00 * dx + a01 * dy), -(a10 * dx + a11 * dy)
    c = (torch.arange(size, device=p.device, dtype=p.dtype) * 2 + 1) / size - 1  # pixel centres (align_corners=False)
    # pixel (row i, column j) samples (a00·x_j + a01·y_i + t0, a10·x_j + a11·y_i + t1): a part that varies along
    # the row plus a part that varies down the column, added in one broadcast into the (N, S, S, 2) grid
    along = torch.stack([a00[:, None] * c + t0[:, None], a10[:, None] * c + t1[:, None]], dim=-1)  # (N, S, 2)
    down = torch.stack([a01[:, None] * c, a11[:, None] * c], dim=-1)
    return along[:, None, :, :] + down[:, :, None, :]


def light(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast (around mid-grey) and, for RGB, a colour cast, on pixels 0..255; clipped there as a
    camera's sensor clips."""
    bright, contrast = p[:, 5:6], p[:, 6:7]
    if x.shape[1] == 3:
        bright = bright * p[:, 7:10]  # the cast: a gain per channel
    # brightness·(contrast·(x − 127.5) + 127.5) = gain·x + offset
    gain, offset = bright * contrast, bright * 127.5 * (1 - contrast)
    return torch.addcmul(offset[..., None, None], x, gain[..., None, None]).clamp_(0, 255)  # two passes over x


def apply(images: torch.Tensor, p: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """(N, C, S, S) images (uint8 or float, pixels 0..255) framed by their rows of p: float pixels 0..255.

    The border a shift or a zoom out uncovers is the picture reflected at its edge ("reflect") or its edge
    pixels drawn out ("replicate"), never black: a black band would be a feature no photo has.
    """
    x = images.float()
    g = grid(p.to(x.device, non_blocking=True), x.shape[-1])
    x = F.grid_sample(x, g, mode="bilinear", padding_mode=PADDING[border], align_corners=False)
    return light(x, p.to(x.device, non_blocking=True))
