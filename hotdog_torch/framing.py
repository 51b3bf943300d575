"""Photos framed as people take them: the framing kinds a network is scored on, beside the pictures as drawn.

A network that learnt a template of one centred, level hot dog is at chance on these, however well it scores on
pictures framed like its training set.  Each kind is one way a person's photo differs from the drawn set:

    shift     the subject moved off-centre by 12-20% of the side, in a random direction
    zoom_out  taken from further away: the subject at 70% of its size, the picture's edge reflected around it
    zoom_in   taken from closer: the central 78% of the picture enlarged to fill it
    tilt      the camera turned 12-18 degrees, either way
    flip      mirrored left to right
    dim       in dim, warm light: 70% of the brightness, red up and blue down (a grey network sees the cast's
              luminance, ITU-R 601)
    jpeg      saved again as a JPEG of quality 40

Each kind's draws come from its own seeded generator, so a framing report is the same every time it is run.
The pictures are framed in the network's own input (its size and channels), as uint8, then scored.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from . import augment, data
from .augment import PARAMS
from .cost import confusion_matrix, per_class

KINDS = ("shift", "zoom_out", "zoom_in", "tilt", "flip", "dim", "jpeg")
AS_IS = "as_is"
WARM = (1.10, 1.0, 0.85)  # the dim light's gain per channel (R, G, B)
LUMA = (0.299, 0.587, 0.114)  # how a grey picture weighs R, G and B


def _rows(kind: str, n: int, seed: int) -> torch.Tensor:
    """(n, len(PARAMS)) framings of one kind, as augment.apply takes them."""
    g = torch.Generator().manual_seed(seed * 1000 + KINDS.index(kind))
    p = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32).repeat(n, 1)
    col = {name: i for i, name in enumerate(PARAMS)}
    u = torch.rand(n, 2, generator=g)
    if kind == "shift":
        distance, direction = 0.12 + 0.08 * u[:, 0], 2 * math.pi * u[:, 1]
        p[:, col["shift_x"]], p[:, col["shift_y"]] = distance * direction.cos(), distance * direction.sin()
    elif kind in ("zoom_out", "zoom_in"):
        p[:, col["log_zoom"]] = math.log(0.70 if kind == "zoom_out" else 1 / 0.78)
    elif kind == "tilt":
        p[:, col["angle"]] = torch.deg2rad(12 + 6 * u[:, 0]) * torch.where(u[:, 1] < 0.5, -1.0, 1.0)
    elif kind == "flip":
        p[:, col["flip"]] = -1
    elif kind == "dim":
        p[:, col["brightness"]] = 0.70
        p[:, col["cast_r"] : col["cast_b"] + 1] = torch.tensor(WARM)
    return p


def _jpeg(images: torch.Tensor, quality: int = 40) -> torch.Tensor:
    """Each image saved as a JPEG and read back (on the host: this is scoring, not training)."""
    out = []
    for a in images.cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)).save(buffer, format="JPEG", quality=quality)
        b = np.asarray(Image.open(buffer))
        out.append(b[None] if b.ndim == 2 else b.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(images.device)


def frame(kind: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, C, S, S) uint8 images framed as `kind` (one of KINDS): uint8 again, on their device."""
    if kind == "jpeg":
        return _jpeg(images)
    p = _rows(kind, len(images), seed).to(images.device)
    if kind == "dim" and images.shape[1] == 1:  # a grey picture of warm light: the cast's luminance
        p[:, PARAMS.index("brightness")] *= sum(w * c for w, c in zip(LUMA, WARM, strict=True))
    return augment.apply(images, p, "reflect").round_().to(torch.uint8)


@torch.no_grad()
def outputs_of(model, images: torch.Tensor, mean, std, chunk: int = 512) -> torch.Tensor:
    """(N, K) scores of the model, in eval mode (no dropout), on (N, C, S, S) uint8 images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat([model(data.normalise(x.to(device), mean, std)).float() for x in images.split(chunk)])
    model.train(was_training)
    return out


def score(model, images: torch.Tensor, labels: torch.Tensor, mean, std, classes) -> dict:
    """Accuracy and balanced accuracy of the model on (N, C, S, S) uint8 images."""
    outputs = outputs_of(model, images, mean, std)
    labels = labels.to(outputs.device)
    confusion = confusion_matrix(outputs, labels, len(classes))
    accuracy = (outputs.argmax(dim=1) == labels).double().mean().item()
    return {"accuracy": accuracy, "balanced_accuracy": per_class(confusion, classes)["balanced_accuracy"]}


def report(model, images: torch.Tensor, labels: torch.Tensor, mean, std, classes, seed: int = 0) -> dict:
    """{"as_is": {...}, "shift": {...}, ...}: the figures of score() on the images as they are and as each kind."""
    out = {AS_IS: score(model, images, labels, mean, std, classes)}
    for kind in KINDS:
        out[kind] = score(model, frame(kind, images, seed), labels, mean, std, classes)
    return out


def format_table(figures: dict) -> str:
    lines = [f"{'framing':<12}{'accuracy':>10}{'balanced accuracy':>20}"]
    for kind, f in figures.items():
        lines.append(f"{kind:<12}{f['accuracy']:>10.2%}{f['balanced_accuracy']:>20.2%}")
    return "\n".join(lines)
