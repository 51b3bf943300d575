"""Find the hot dog, then judge it: a router network in front of the classifier.

A plain MLP must learn a hot dog separately at every position, size and angle.  Rowley, Baluja and Kanade (1998)
put a small "router" network in front of their face detector: it estimated how each window was turned, and the
window was turned upright before the detector judged it; spatial transformer networks (Jaderberg et al. 2015) do
the same with fully connected layers.  Here the router is an MLP that reads a glimpse of the picture and estimates
how it is framed, in the numbers augment.draw uses: shift (x, y, a fraction of the side), log zoom and angle.
Its labels cost nothing: they are the framings augmentation drew for each training picture.

The framing it finds is an affine map A from the upright, centred picture to the photo, in grid_sample's
coordinates ([-1, 1] across the picture):  A(u) = zoom·R(angle)·u + 2·shift.  Un-warping is sampling the photo at
A(u) for each pixel u of the upright picture.  The router looks again at its own un-warped picture `passes` times,
each estimate a correction composed into A (A ← A·M), and the photo is sampled once, at the end, through the whole
map.  A mirrored photo stays mirrored: the classifier learnt both, as augmentation flips.

The border an un-warp uncovers is the picture reflected at its edge, so a box partly outside the photo still gives
a picture to judge.  Sampling is linear in the pixels and each sample's weights sum to 1, so un-warping commutes
with the per-channel normalisation: the router works on normalised pictures, and on raw ones with the
normalisation folded into its first layer (export.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .config import Augment
from .config import Router as Settings

COLUMNS = {"shift": (0, 1), "zoom": (2,), "angle": (3,)}  # each estimate's columns of augment.PARAMS


def columns(estimates: list[str]) -> list[int]:
    """The columns of augment.PARAMS the router estimates, in PARAMS' order."""
    return sorted(c for e in estimates for c in COLUMNS[e])


def limits(a: Augment, estimates: list[str]) -> torch.Tensor:
    """Each estimated number's largest drawn magnitude (its output is that times a number near [-1, 1])."""
    full = (a.shift, a.shift, math.log(a.zoom), math.radians(a.rotate))
    return torch.tensor([full[c] or 1.0 for c in columns(estimates)])  # a number never drawn: any scale will do


class Router(nn.Module):
    """The router MLP: a (size x size) glimpse in, the framing out; it starts at the identity (its last layer 0)."""

    def __init__(self, channels: int, s: Settings, scale: torch.Tensor):
        super().__init__()
        self.size, self.passes, self.columns = s.size, s.passes, columns(s.estimates)
        layers: list[nn.Module] = [nn.Flatten()]
        width = channels * s.size**2
        for h in s.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        last = nn.Linear(width, len(self.columns))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.register_buffer("scale", scale.float().clone())
        spread = torch.zeros(len(self.columns), 4)  # output k -> its column of the framing
        spread[range(len(self.columns)), self.columns] = 1
        self.register_buffer("spread", spread, persistent=False)

    def estimate(self, glimpse: torch.Tensor) -> torch.Tensor:
        """(N, 4) framings (shift_x, shift_y, log_zoom, angle) of (N, C, size, size) glimpses; 0 where not estimated."""
        return (self.net(glimpse) * self.scale) @ self.spread

    def glimpse(self, x: torch.Tensor) -> torch.Tensor:
        """The pictures as the router reads them in its first pass: at its own size."""
        return x if x.shape[-1] == self.size else sample(x, identity(x), self.size)

    def locate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, 3) maps A from the upright picture to each of the (N, C, S, S) pictures, after every pass."""
        a = identity(x)
        for _ in range(self.passes):
            a = compose(a, matrix(self.estimate(sample(x, a, self.size))))
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pictures un-warped: upright and centred as the router sees them, at its size (the classifier's)."""
        return sample(x, self.locate(x), self.size)


class Routed(nn.Module):
    """Find, then judge: the router un-warps each picture and the classifier (the seed's MLP) judges it."""

    def __init__(self, router: Router, classifier: nn.Sequential):
        super().__init__()
        self.router, self.classifier = router, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.router(x))

    def train(self, mode: bool = True) -> Routed:
        """The classifier's mode; the router, trained in its own phase, stays in eval mode."""
        super().train(mode)
        self.router.eval()
        return self


def identity(x: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) identity maps, one per picture of x; N taken from x as a computation, so that an exported
    graph keeps the batch size free."""
    zeros = x.flatten(1)[:, :1, None] * 0  # (N, 1, 1)
    return zeros + torch.eye(2, 3, device=x.device, dtype=x.dtype)


def matrix(p: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3): A(u) = zoom·R(angle)·u + 2·shift, from rows (shift_x, shift_y, log_zoom, angle)."""
    zoom, cos, sin = p[:, 2].exp(), p[:, 3].cos(), p[:, 3].sin()
    row0 = torch.stack([zoom * cos, -zoom * sin, 2 * p[:, 0]], dim=1)
    row1 = torch.stack([zoom * sin, zoom * cos, 2 * p[:, 1]], dim=1)
    return torch.stack([row0, row1], dim=1)


def compose(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The map u -> a(m(u)), both (N, 2, 3) affine maps."""
    linear = a[:, :, :2] @ m[:, :, :2]
    offset = a[:, :, :2] @ m[:, :, 2:] + a[:, :, 2:]
    return torch.cat([linear, offset], dim=2)


def sample(x: torch.Tensor, a: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, size, size): each picture of x sampled at a(u) for the pixel centres u of a size x size picture
    (grid_sample's coordinates, align_corners=False), the border reflected.  One broadcast builds the grid."""
    c = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1
    a = a.to(x.dtype)
    gx = a[:, 0, 0, None, None] * c[None, None, :] + a[:, 0, 1, None, None] * c[None, :, None] + a[:, 0, 2, None, None]
    gy = a[:, 1, 0, None, None] * c[None, None, :] + a[:, 1, 1, None, None] * c[None, :, None] + a[:, 1, 2, None, None]
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def targets(framings: torch.Tensor, router: Router) -> torch.Tensor:
    """What the router should answer for pictures framed by these rows of augment.draw, in its output's units."""
    return framings[:, router.columns] / router.scale


def box(a: torch.Tensor, width: int, height: int) -> list[list[float]]:
    """The upright picture's four corners (top left, top right, bottom right, bottom left) in a photo's pixels,
    from one (2, 3) map: where the router found the subject.  The photo was resized to the network's square input,
    so grid coordinate -1..1 spans each of the photo's sides."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    g = corners @ a[:, :2].T.float().cpu() + a[:, 2].float().cpu()
    return [[round((x + 1) / 2 * width, 2), round((y + 1) / 2 * height, 2)] for x, y in g.tolist()]


def build(channels: int, s: Settings, a: Augment) -> Router:
    return Router(channels, s, limits(a, s.estimates))


def unwarped(images: torch.Tensor, maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) uint8 pictures un-warped by their (N, 2, 3) maps to size x size, uint8: what the classifier
    judges."""
    x = sample(images.float(), maps.to(images.device), size)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def boxes_picture(images: torch.Tensor, maps: torch.Tensor, columns: int = 8, scale: int = 4) -> Image.Image:
    """(N, C, S, S) uint8 pictures, each enlarged with the router's box drawn over it (its top edge thicker, to
    show which way is up), in rows of `columns`: where it looked."""
    n, c, s, _ = images.shape
    side, pad = s * scale, 4
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + pad) + pad), "white")
    for i in range(n):
        a = images[i].cpu().numpy()
        tile = Image.fromarray(a[0] if c == 1 else a.transpose(1, 2, 0)).convert("RGB")
        tile = tile.resize((side, side), Image.Resampling.NEAREST)
        corners = [tuple(p) for p in box(maps[i], side, side)]
        draw = ImageDraw.Draw(tile)
        draw.polygon(corners, outline=(255, 40, 40), width=2)
        draw.line(corners[:2], fill=(255, 220, 0), width=3)
        sheet.paste(tile, (pad + (i % columns) * (side + pad), pad + (i // columns) * (side + pad)))
    return sheet
