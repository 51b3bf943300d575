"""Classify photos with a trained network, from its checkpoint alone:

    python -m hotdog_torch.predict --checkpoint runs/<name>/checkpoints/best.pt photo.jpg more/photos/ [--json]

One line per image: path, predicted class, score (the class's sigmoid output), and for a network with a router
(model.router) where it found the subject: the box, its four corners (x, y) in the photo's pixels, clockwise from
the top left of the upright picture.
Folders are searched for image files.  Any size or mode is brought to the
network's input the way training did (Pillow decode, draft mode for large JPEGs,
convert, resize, normalise).  A file that cannot be read is reported on stderr and
the rest are still classified; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import checkpoint, cli, data, images, router, runtime
from .config import UserError
from .images import IMG_EXTENSIONS
from .model import linear_layers, neuron_pictures


def image_files(arguments: list[str]) -> list[Path]:
    files = []
    for a in arguments:
        p = Path(a)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        else:
            files.append(p)
    return files


class Classifier:
    """A trained network from its checkpoint alone: decode, normalise, score, explain.

    The one code path from a photo to a verdict, for predict, evaluate's users and the app (serve.py).
    """

    def __init__(self, ckpt: dict):
        self.model = checkpoint.model_from(ckpt)
        self.router = getattr(self.model, "router", None)  # model.router: find, then judge
        self.classifier = getattr(self.model, "classifier", self.model)
        runtime.flush_denormal_as_trained(ckpt["config"])  # as in training (the app too)
        self.classes, self.size, self.channels = ckpt["classes"], ckpt["image_size"], ckpt["channels"]
        self.mean, self.std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
        layers = linear_layers(self.classifier)
        self.hidden = len(layers) > 1  # the first layer's neurons are hidden ones (not the output's)
        self.pictures = neuron_pictures(layers[0].weight, self.channels) if self.hidden else None

    def decode(self, file, max_pixels: int | None = None) -> np.ndarray:
        """A path or binary file as the network's (C, S, S) uint8 input; raises images.DECODE_ERRORS."""
        return images.decode(file, self.size, self.channels, max_pixels)

    @torch.no_grad()
    def scores(self, arrays: np.ndarray) -> torch.Tensor:
        """(N, K) class scores of (N, C, S, S) uint8 images."""
        return self.model(data.normalise(torch.from_numpy(arrays), self.mean, self.std))

    @torch.no_grad()
    def maps(self, arrays: np.ndarray) -> torch.Tensor | None:
        """With a router, where it found the subject in each of (N, C, S, S) uint8 images: (N, 2, 3) maps."""
        return (
            None
            if self.router is None
            else self.router.locate(data.normalise(torch.from_numpy(arrays), self.mean, self.std))
        )

    @torch.no_grad()
    def explain(self, array: np.ndarray, top: int = 8, photo_size: tuple[int, int] | None = None) -> dict:
        """The verdict on one image, every class's score, and the hidden neurons that fired most for it; with a
        router, where it found the subject (`box`, in the pixels of a photo of photo_size, else of the network's
        input) and the picture the classifier judged (`judged`)."""
        x = data.normalise(torch.from_numpy(array[None]), self.mean, self.std)
        maps = None if self.router is None else self.router.locate(x)
        judged = x if maps is None else router.sample(x, maps, self.router.size)
        scores = self.classifier(judged)[0]
        k = int(scores.argmax())
        out = {"class": self.classes[k], "score": float(scores[k])}
        out["scores"] = {c: float(s) for c, s in zip(self.classes, scores, strict=True)}
        out["neurons"] = []
        if self.hidden:
            fired = self.classifier[:3](judged)[0]  # Flatten, the first Linear, its activation
            for j in fired.argsort(descending=True)[:top].tolist():
                out["neurons"].append({"index": j, "activation": float(fired[j]), "picture": png_url(self.pictures[j])})
        out["seen"] = png_url(torch.from_numpy(array))
        if maps is not None:
            out["box"] = router.box(maps[0], *(photo_size or (self.size, self.size)))
            out["judged"] = png_url(router.unwarped(torch.from_numpy(array[None]), maps, self.router.size)[0])
        return out


def png_url(image: torch.Tensor) -> str:
    """A (C, S, S) uint8 image as a data: URL of a PNG, for a page to show."""
    a = image.numpy()
    buffer = io.BytesIO()
    Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def predict(ckpt: dict, files: list[Path], batch: int = 256):
    """Yield (path, class, score, box) for each readable file, or (path, None, reason, None) for one that is not;
    box: with a router, where it found the subject in the photo's pixels (router.box), else None."""
    net = Classifier(ckpt)
    for i in range(0, len(files), batch):
        chunk, arrays, results = files[i : i + batch], [], {}
        for f in chunk:
            try:
                arrays.append((f, net.decode(f)))
            except FileNotFoundError:
                results[f] = (None, "no such file", None)
            except IsADirectoryError:
                results[f] = (None, "is a directory", None)
            except images.DECODE_ERRORS as e:
                results[f] = (None, f"cannot be read as an image ({e.__class__.__name__})", None)
        if arrays:
            stacked = np.stack([a for _, a in arrays])
            scores, maps = net.scores(stacked), net.maps(stacked)
            best = scores.argmax(dim=1)
            for j, ((f, _), k, s) in enumerate(zip(arrays, best.tolist(), scores.tolist(), strict=True)):
                box = None if maps is None else router.box(maps[j], *images.dimensions(f))
                results[f] = (net.classes[k], s[k], box)
        for f in chunk:
            yield (f, *results[f])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt or last.pt of a run")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per line: path, class, score (or error)")
    a = p.parse_intermixed_args(argv)  # flags and positionals in any order

    def command():
        ckpt = checkpoint.load(a.checkpoint)
        files = image_files(a.images)
        if not files:
            raise UserError("no image files found in " + ", ".join(a.images))
        failed = 0
        for path, label, score, box in predict(ckpt, files):
            failed += label is None
            show(images.shown(os.fspath(path)), label, score, box, a.json)
        return 1 if failed else 0  # every file answered, some of them with why it could not be read

    return cli.exit_code(command, interrupted="the files named so far were answered")


def show(path: str, label: str | None, score, box, as_json: bool) -> None:
    """One file's answer: its class and score (and box), or why it could not be read (on stderr too)."""
    if label is None:
        print(f"{path}: {score}", file=sys.stderr)
        if as_json:
            print(json.dumps({"path": path, "error": score}))
    elif as_json:
        print(json.dumps({"path": path, "class": label, "score": round(score, 6)} | ({"box": box} if box else {})))
    else:
        where = "" if box is None else "\tbox " + " ".join(f"({x:g}, {y:g})" for x, y in box)
        print(f"{path}\t{label}\t{score:.4f}{where}")


if __name__ == "__main__":
    cli.run(main)
