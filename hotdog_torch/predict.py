"""Classify photos with a trained network, from its checkpoint alone:

    python -m hotdog_torch.predict --checkpoint runs/<name>/checkpoints/best.pt photo.jpg more/photos/ [--json]

One line per image: path, predicted class, score (the class's sigmoid output).
Folders are searched for image files.  Any size or mode is brought to the
network's input the way training did (Pillow decode, draft mode for large JPEGs,
convert, resize, normalise).  A file that cannot be read is reported on stderr and
the rest are still classified; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, images
from .config import UserError
from .images import IMG_EXTENSIONS


def image_files(arguments: list[str]) -> list[Path]:
    files = []
    for a in arguments:
        p = Path(a)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        else:
            files.append(p)
    return files


@torch.no_grad()
def predict(ckpt: dict, files: list[Path], batch: int = 256):
    """Yield (path, class, score) for each readable file, or (path, None, reason) for one that is not."""
    model = checkpoint.model_from(ckpt)
    mean, std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    for i in range(0, len(files), batch):
        chunk, arrays, results = files[i : i + batch], [], {}
        for f in chunk:
            try:
                arrays.append((f, images.decode(f, ckpt["image_size"], ckpt["channels"])))
            except FileNotFoundError:
                results[f] = (None, "no such file")
            except IsADirectoryError:
                results[f] = (None, "is a directory")
            except images.DECODE_ERRORS as e:
                results[f] = (None, f"cannot be read as an image ({e.__class__.__name__})")
        if arrays:
            x = data.normalise(torch.from_numpy(np.stack([a for _, a in arrays])), mean, std)
            scores = model(x)
            best = scores.argmax(dim=1)
            for (f, _), k, s in zip(arrays, best.tolist(), scores.tolist(), strict=True):
                results[f] = (ckpt["classes"][k], s[k])
        for f in chunk:
            yield (f, *results[f])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt or last.pt of a run")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per line: path, class, score (or error)")
    a = p.parse_args(argv)
    try:
        ckpt = checkpoint.load(a.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = image_files(a.images)
    if not files:
        print("error: no image files found in " + ", ".join(a.images), file=sys.stderr)
        return 2
    failed = 0
    for path, label, score in predict(ckpt, files):
        shown = images.shown(os.fspath(path))
        if label is None:
            failed += 1
            print(f"{shown}: {score}", file=sys.stderr)
            if a.json:
                print(json.dumps({"path": shown, "error": score}))
        elif a.json:
            print(json.dumps({"path": shown, "class": label, "score": round(score, 6)}))
        else:
            print(f"{shown}\t{label}\t{score:.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
