"""How each thing of the synthetic set is drawn: the foods and things, the scenes, the lighting.

Every drawing takes its own seeded numpy generator, so an image depends only on its key.  draw_scene
returns the picture and what it shows in detail (its variant: "cheese_steak", "chicago", ...).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

HOT_DOG = "hot_dog"


@dataclass(frozen=True)
class Variation:
    """How much the drawings vary; units are pixels of a 128-pixel image."""

    shift: float = 2.0  # centre jitter, ± px
    rotate: float = 4.0  # ± degrees
    scale: float = 0.06  # ± fraction of the nominal size
    clutter: int = 4  # at most this many unrelated small shapes
    noise: float = 6.0  # max std of Gaussian pixel noise (0..255)
    light: float = 0.25  # ± brightness change; also the strength of a gradient


# How people frame photos (synth --framing photo): the subject anywhere within ±22% of the side from the centre
# (a long one then often cut by the frame), from 65% to 135% of its size, turned up to ±20°, under light from
# 40% darker to 40% brighter.  Every draw takes the same random numbers as the seed's framing, only scaled, so a
# photo-framed set shows the same things on the same scenes as the seed's set of the same seed.
FRAMINGS = {
    "seed": Variation(),
    "photo": Variation(shift=28.0, rotate=20.0, scale=0.35, light=0.4, noise=8.0),
}


# ---------------------------------------------------------------- geometry


def _place(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


@functools.cache  # the shapes take a few n only: their angles are worked out once
def _arc(n, start, stop, endpoint=True):
    """(cos t, sin t) of n angles t from start to stop, spaced by np.linspace."""
    return tuple((math.cos(t), math.sin(t)) for t in np.linspace(start, stop, n, endpoint=endpoint))


def _capsule(length, width, n=8):
    """A stadium centred on the origin along x: two half circles and a band."""
    r, h = width / 2, max(length / 2 - width / 2, 0.0)
    half = _arc(n, -math.pi / 2, math.pi / 2)
    return [(h + r * c, r * s) for c, s in half] + [(-h - r * c, -r * s) for c, s in half]


def _ellipse(rx, ry, n=28):
    return [(rx * c, ry * s) for c, s in _arc(n, 0, 2 * math.pi, endpoint=False)]


def _jitter_colour(rng, rgb, amount=18):  # min/max clip as np.clip does, without its cost on one number
    return tuple(int(min(max(c + rng.uniform(-amount, amount), 0), 255)) for c in rgb)


def _random_colour(rng):
    return tuple(rng.integers(0, 256, 3).tolist())


def _poly(draw, points, cx, cy, a, fill):
    """A filled shape drawn at (cx, cy), turned by a."""
    draw.polygon(_place(points, cx, cy, a), fill=fill)


def _stroke(draw, points, cx, cy, a, fill, width):
    draw.line(_place(points, cx, cy, a), fill=fill, width=max(1, round(width)))


def _at(x, y, cx, cy, a):
    """Where the point (x, y) of an object drawn at (cx, cy), turned by a, lands in the image."""
    return _place([(x, y)], cx, cy, a)[0]


# ---------------------------------------------------------------- the foods and things


BUN, CRUST, CRUMB = (214, 162, 98), (168, 112, 58), (240, 222, 176)
SAUSAGE = (150, 62, 42)
KETCHUP, MUSTARD, RELISH = (200, 30, 25), (232, 196, 30), (60, 170, 60)


def _bun(draw, rng, cx, cy, a, u, s):
    L, W = 64 * u * s, 28 * u * s
    _poly(draw, _capsule(L, W), cx, cy, a, _jitter_colour(rng, CRUST))
    _poly(draw, _capsule(L * 0.94, W * 0.8), cx, cy, a, _jitter_colour(rng, BUN))
    return L, W


def _condiment(draw, rng, cx, cy, a, L, W, u):
    kind = rng.choice(["none", "ketchup", "mustard", "both"])
    colours = {"ketchup": [KETCHUP], "mustard": [MUSTARD], "both": [KETCHUP, MUSTARD], "none": []}[kind]
    for k, colour in enumerate(colours):
        n = int(rng.integers(5, 9))
        xs = np.linspace(-L * 0.4, L * 0.4, n)
        ys = [(1 if i % 2 else -1) * W * 0.12 + (k - 0.5) * W * 0.05 for i in range(n)]
        _stroke(draw, list(zip(xs, ys, strict=True)), cx, cy, a, _jitter_colour(rng, colour, 12), 2 * u)


def _sausage(draw, rng, cx, cy, a, L, W, u, grilled):
    _poly(draw, _capsule(L, W), cx, cy, a, _jitter_colour(rng, SAUSAGE, 22))
    if grilled:
        for x in np.linspace(-L * 0.35, L * 0.35, int(rng.integers(3, 6))):
            _stroke(draw, [(x - W * 0.2, -W * 0.45), (x + W * 0.2, W * 0.45)], cx, cy, a, (60, 25, 15), u)


def draw_hot_dog(draw, rng, cx, cy, a, u, s):
    L, W = _bun(draw, rng, cx, cy, a, u, s)
    style = rng.choice(["new_york", "chicago", "grilled", "plain"])
    _sausage(draw, rng, cx, cy, a, L * rng.uniform(1.02, 1.15), W * 0.42, u, grilled=style == "grilled")
    if style == "chicago":
        for _ in range(int(rng.integers(6, 12))):
            x, y = rng.uniform(-L * 0.4, L * 0.4), rng.uniform(-W * 0.18, W * 0.18)
            _poly(draw, _ellipse(1.5 * u, 1.5 * u, 6), *_at(x, y, cx, cy, a), a, _jitter_colour(rng, RELISH))
        x = rng.uniform(-L * 0.2, L * 0.2)
        _poly(draw, _ellipse(5 * u, 2.5 * u, 10), *_at(x, -W * 0.3, cx, cy, a), a, _jitter_colour(rng, KETCHUP))
    elif style != "plain":
        _condiment(draw, rng, cx, cy, a, L, W, u)
    return str(style)


def draw_sliced_bun(draw, rng, cx, cy, a, u, s):
    """A bun with no sausage: empty, with condiments, or a Philly cheese steak."""
    L, W = _bun(draw, rng, cx, cy, a, u, s)
    _poly(draw, _capsule(L * 0.86, W * 0.4), cx, cy, a, _jitter_colour(rng, CRUMB))
    if rng.random() < 0.5:  # a Philly cheese steak: chopped meat and melted cheese
        for _ in range(int(rng.integers(8, 16))):
            x, y = rng.uniform(-L * 0.38, L * 0.38), rng.uniform(-W * 0.14, W * 0.14)
            colour = (120, 70, 40) if rng.random() < 0.6 else (240, 215, 120)
            turn = a + rng.uniform(0, 3)
            _poly(draw, _ellipse(2.5 * u, 1.8 * u, 7), *_at(x, y, cx, cy, a), turn, _jitter_colour(rng, colour))
        return "cheese_steak"
    condiments = rng.random() < 0.5
    if condiments:
        _condiment(draw, rng, cx, cy, a, L, W, u)
    return "condiments" if condiments else "empty"


def draw_sausage(draw, rng, cx, cy, a, u, s):
    """A sausage with no bun, sometimes two side by side."""
    L, W = 64 * u * s * rng.uniform(1.02, 1.15), 28 * u * s * 0.42
    offsets = [0.0] if rng.random() < 0.6 else [-W * 0.6, W * 0.6]
    for dy in offsets:
        x, y = _at(0, dy, cx, cy, a)
        _sausage(draw, rng, x, y, a, L, W, u, grilled=rng.random() < 0.4)
    if rng.random() < 0.4:
        _condiment(draw, rng, cx, cy, a, L, W * 2.2, u)
    return "two_sausages" if len(offsets) == 2 else "one_sausage"


def draw_hamburger(draw, rng, cx, cy, a, u, s):
    r = 27 * u * s
    _poly(draw, _ellipse(r * 1.1, r * 1.06), cx, cy, a, _jitter_colour(rng, RELISH, 25))
    _poly(draw, _ellipse(r * 1.05, r * 1.02), cx, cy, a + 0.3, _jitter_colour(rng, (110, 60, 35)))
    _poly(draw, _ellipse(r, r * 0.97), cx, cy, a, _jitter_colour(rng, BUN))
    for _ in range(int(rng.integers(8, 20))):  # sesame seeds
        x, y = rng.uniform(-r * 0.7, r * 0.7, 2)
        turn = rng.uniform(0, 3)
        _poly(draw, _ellipse(1.6 * u, 0.9 * u, 6), cx + x, cy + y, turn, _jitter_colour(rng, (245, 235, 200), 10))


def draw_burrito(draw, rng, cx, cy, a, u, s):
    L, W = 66 * u * s, 32 * u * s
    _poly(draw, _capsule(L, W), cx, cy, a, _jitter_colour(rng, (228, 200, 150)))
    for x in np.linspace(-L * 0.3, L * 0.3, int(rng.integers(2, 4))):  # folds
        _stroke(draw, [(x, -W * 0.45), (x + W * 0.3, W * 0.45)], cx, cy, a, _jitter_colour(rng, (190, 160, 110)), u)
    for _ in range(int(rng.integers(3, 9))):  # toasted spots
        x, y = rng.uniform(-L * 0.4, L * 0.4), rng.uniform(-W * 0.35, W * 0.35)
        _poly(draw, _ellipse(2 * u, 1.5 * u, 6), *_at(x, y, cx, cy, a), a, _jitter_colour(rng, (170, 120, 70)))
    if rng.random() < 0.5:  # cut open: the filling shows at one end
        for _ in range(10):
            x, y = rng.uniform(L * 0.32, L * 0.48), rng.uniform(-W * 0.3, W * 0.3)
            colour = [(120, 70, 40), (200, 40, 30), (60, 160, 60), (240, 240, 230)][int(rng.integers(0, 4))]
            _poly(draw, _ellipse(1.8 * u, 1.8 * u, 6), *_at(x, y, cx, cy, a), a, colour)


def draw_shoe(draw, rng, cx, cy, a, u, s):
    L, H = 64 * u * s, 26 * u * s
    upper = [(-L / 2, H * 0.3), (-L / 2, -H * 0.5), (-L * 0.1, -H * 0.5), (L * 0.1, -H * 0.1)]
    upper += [(L / 2, H * 0.05), (L / 2, H * 0.3)]
    sole = [(-L / 2, H * 0.3), (L / 2, H * 0.3), (L / 2, H * 0.5), (-L / 2, H * 0.5)]
    _poly(draw, upper, cx, cy, a, _random_colour(rng))
    _poly(draw, sole, cx, cy, a, _jitter_colour(rng, (40, 40, 40), 40))
    for x in np.linspace(-L * 0.1, L * 0.08, 4):  # laces
        _stroke(draw, [(x - 3 * u, -H * 0.3), (x + 3 * u, -H * 0.1)], cx, cy, a, (235, 235, 235), u)


SKINS = [(235, 195, 160), (200, 150, 110), (150, 100, 70), (95, 65, 45)]


def draw_legs(draw, rng, cx, cy, a, u, s):
    skin = _jitter_colour(rng, SKINS[int(rng.integers(0, 4))], 12)
    for dx in (-9 * u * s, 9 * u * s):
        x, y = _at(0, dx, cx, cy, a)
        _poly(draw, _capsule(80 * u * s, 14 * u * s), x, y, a, skin)
    if rng.random() < 0.6:  # shorts over one end
        x0, x1, h = -44 * u * s, -24 * u * s, 20 * u * s
        _poly(draw, [(x0, -h), (x1, -h), (x1, h), (x0, h)], cx, cy, a, _random_colour(rng))


DRAW = {
    HOT_DOG: draw_hot_dog,
    "sliced_bun": draw_sliced_bun,
    "sausage": draw_sausage,
    "burrito": draw_burrito,
    "hamburger": draw_hamburger,
    "shoe": draw_shoe,
    "legs": draw_legs,
}


# ---------------------------------------------------------------- scenes


def _background(draw, rng, size, u):
    """Table, plate, grill or napkin; the same for every class."""
    draw.rectangle([0, 0, size, size], fill=_random_colour(rng))
    for _ in range(int(rng.integers(0, 6))):  # wood grain / cloth texture
        y = rng.uniform(0, size)
        end = (size, y + rng.uniform(-20, 20) * u)
        draw.line([(0, y), end], fill=_random_colour(rng), width=max(1, round(rng.uniform(1, 3) * u)))
    kind = rng.choice(["table", "plate", "grill", "napkin"])
    c = size / 2
    if kind == "plate":
        r = rng.uniform(48, 60) * u
        shape = _ellipse(r, r * rng.uniform(0.85, 1.0), 40)
        _poly(draw, shape, c, c, rng.uniform(0, math.pi), _jitter_colour(rng, (235, 235, 230), 25))
    elif kind == "grill":
        draw.rectangle([0, 0, size, size], fill=_jitter_colour(rng, (45, 45, 45), 20))
        step = rng.uniform(9, 14) * u
        for x in np.arange(-size, 2 * size, step):
            turn = rng.uniform(-0.3, 0.3)
            _stroke(draw, [(x, -size), (x, 2 * size)], c, c, turn, _jitter_colour(rng, (110, 110, 110), 30), 3 * u)
    elif kind == "napkin":
        colour, half = _random_colour(rng), rng.uniform(45, 62) * u
        square = _place([(-half, -half), (half, -half), (half, half), (-half, half)], c, c, rng.uniform(0, math.pi))
        draw.polygon(square, fill=(240, 240, 240))
        if rng.random() < 0.5:  # checks
            for k in np.arange(-half, half, 12 * u):
                _stroke(draw, [(k, -half), (k, half)], c, c, 0, colour, 4 * u)


def _clutter(draw, rng, size, u, n):
    for _ in range(int(rng.integers(0, n + 1))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(2, 7) * u
        if rng.random() < 0.5:
            shape = _ellipse(r, r * rng.uniform(0.5, 1))
            _poly(draw, shape, x, y, rng.uniform(0, 3), _random_colour(rng))
        else:
            end = (x + rng.uniform(-15, 15) * u, y + rng.uniform(-15, 15) * u)
            draw.line([(x, y), end], fill=_random_colour(rng), width=max(1, round(2 * u)))


def _light(img, rng, v: Variation):
    """Brightness, a lighting gradient, a colour cast and sensor noise."""
    x = np.array(img, dtype=np.float64)  # exact for bytes; numpy multiplies two float64s faster than mixed types
    h, w, _ = x.shape
    gain = 1 + rng.uniform(-v.light, v.light)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * np.linspace(-0.5, 0.5, w)[None, :] + np.sin(angle) * np.linspace(-0.5, 0.5, h)[:, None]
    light = gain + rng.uniform(0, v.light) * ramp
    cast = rng.uniform(0.92, 1.08, 3)
    for k in range(3):  # x * light * cast in place, a channel at a time: numpy broadcasts over a last axis of 3 slowly
        x[..., k] *= light
        x[..., k] *= cast[k]
    x += rng.normal(0, rng.uniform(0, v.noise), x.shape)
    return Image.fromarray(np.clip(x, 0, 255, out=x).astype(np.uint8))


def draw_scene(kind: str, rng: np.random.Generator, size: int = 128, v: Variation = Variation()):
    """(one RGB picture of `kind`, a key of DRAW, on a random scene; its variant, e.g. "cheese_steak")."""
    u = size / 128
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    _background(draw, rng, size, u)
    _clutter(draw, rng, size, u, v.clutter)
    cx, cy = (size / 2 + rng.uniform(-v.shift, v.shift, 2) * u).tolist()  # floats: numpy's scalars are slow
    angle = math.radians(rng.uniform(-v.rotate, v.rotate)) + (math.pi if rng.random() < 0.5 else 0.0)
    variant = DRAW[kind](draw, rng, cx, cy, angle, u, 1 + rng.uniform(-v.scale, v.scale)) or kind
    return _light(img, rng, v), variant


def draw_image(kind: str, rng: np.random.Generator, size: int = 128, v: Variation = Variation()) -> Image.Image:
    """One RGB picture of `kind` (a key of DRAW) on a random scene."""
    return draw_scene(kind, rng, size, v)[0]
