"""The procedurally drawn hot-dog / not-hot-dog image set.

    python -m hotdog_torch.synth --out data/hotdog-synth

writes an ImageFolder tree of JPEGs:

    OUT/train/hot_dog/*.jpg      (default 1000)
    OUT/train/not_hot_dog/*.jpg  (default 5000)
    OUT/test/hot_dog/*.jpg       (default 200)
    OUT/test/not_hot_dog/*.jpg   (default 1000)

Hot dogs are a bun with a sausage in it (plain, ketchup, mustard, Chicago style,
grilled).  The others are the seed's list: shoes, hamburgers, burritos, legs,
sliced buns with no sausage (empty, or a Philly cheese steak) and sausages with
no bun.  The bun-only and sausage-only negatives share every part of a hot dog
but one, and every class is drawn on the same backgrounds (tables, plates,
grills, napkins) under the same lighting, so neither the mean colour nor a
single linear template separates the classes: the hidden layer has to learn
"bun AND sausage".  Each image is drawn from its own seeded generator, so the
set is identical whatever the number of worker processes.

--framing photo draws the same things framed as people take photos: anywhere in the
picture, at any size, tilted, sometimes cut by the frame, in any light (drawings.FRAMINGS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from . import cli, files
from .config import UserError
from .drawings import FRAMINGS, HOT_DOG, Variation, draw_scene

NOT_HOT_DOG = "not_hot_dog"
MANIFEST = "manifest.json"  # what each image shows (kind/variant), written beside train/ and test/

# What the negatives are made of, and how often (they sum to 1).
OTHERS = {
    "sliced_bun": 0.22,
    "sausage": 0.22,
    "burrito": 0.14,
    "hamburger": 0.14,
    "shoe": 0.14,
    "legs": 0.14,
}


# ---------------------------------------------------------------- writing the tree


def _job_list(n_hot, n_other, seed, split):
    split_id = {"train": 0, "test": 1}[split]
    kinds = list(OTHERS)
    counts = np.floor(np.array(list(OTHERS.values())) * n_other).astype(int)
    counts[0] += n_other - counts.sum()  # rounding remainder goes to the first kind
    jobs = [(HOT_DOG, HOT_DOG, i, (seed, split_id, 0, i)) for i in range(n_hot)]
    i = 0
    for kind, count in zip(kinds, counts, strict=True):
        for _ in range(count):
            jobs.append((NOT_HOT_DOG, kind, i, (seed, split_id, 1, i)))
            i += 1
    return jobs


def _write_one(job) -> tuple[str, str]:
    """Draw and save one image; returns (its path, what it shows: kind/variant)."""
    folder, kind, index, key, size, v = job
    rng = np.random.default_rng(key)
    path = Path(folder) / f"{kind}_{index:05d}.jpg"
    img, variant = draw_scene(kind, rng, size, v)
    img.save(path, quality=int(rng.integers(80, 96)))
    return str(path), f"{kind}/{variant}"


def generate(
    out,
    hot_dogs=1000,
    others=5000,
    test_hot_dogs=200,
    test_others=1000,
    size=128,
    seed=0,
    variation: Variation | None = None,
    workers=None,
    progress=True,
):
    """Write the ImageFolder tree under `out`; returns `out` as a Path."""
    out = Path(out)
    jobs = []
    for split, n_hot, n_other in (("train", hot_dogs, others), ("test", test_hot_dogs, test_others)):
        if n_hot + n_other == 0:
            continue
        for cls in (HOT_DOG, NOT_HOT_DOG):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
        for cls, kind, i, key in _job_list(n_hot, n_other, seed, split):
            jobs.append((str(out / split / cls), kind, i, key, size, variation or Variation()))
    workers = workers or os.cpu_count() or 1
    from tqdm import tqdm

    shows = {}
    pool = files.worker_pool(workers)  # none outlives this process, nor holds its lock
    try:
        drawn = pool.map(_write_one, jobs, chunksize=64)
        for path, what in tqdm(
            drawn, total=len(jobs), desc="drawing", unit="img", disable=not progress, file=sys.stderr
        ):
            shows[Path(path).relative_to(out).as_posix()] = what
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: the chunks at work end, the others are not drawn
    header = {"seed": seed, "size": size}
    if variation is not None and variation != Variation():  # the seed's manifest stays as it was, byte for byte
        header["variation"] = dataclasses.asdict(variation)
    (out / MANIFEST).write_text(json.dumps({**header, "shows": shows}, indent=0) + "\n")
    return out


def manifest(root) -> dict[str, str]:
    """What each drawn image shows, by its path relative to root: "sliced_bun/cheese_steak", "hot_dog/chicago", ...

    Read from root/manifest.json; empty for a folder drawn before manifests were written.
    """
    try:
        return json.loads((Path(root) / MANIFEST).read_text())["shows"]
    except (OSError, ValueError, KeyError):
        return {}


def draw_if_missing(root, wanted: bool, progress: bool = True) -> None:
    """Draw the seed's set into root when it is missing and the config asks for it (data.generate)."""
    root = Path(root)
    if root.exists() or not wanted:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    # one process draws, the others started with it wait and use its set
    with files.locked(root.with_name(f".{root.name}.lock"), f"waiting for another process drawing {root}"):
        if root.exists():
            return
        for stale in root.parent.glob(f".{root.name}.drawing-*"):  # a drawing process killed before its rename
            shutil.rmtree(stale, ignore_errors=True)
        # always the seed's set at 128x128, whatever data.image_size a run resizes to: the folder is shared
        print(
            f"{root} is missing: drawing the synthetic hot-dog set there (1000 hot dogs and 5000 others to train, "
            "200 and 1000 to test, 128x128)",
            flush=True,
        )
        drawing = root.with_name(f".{root.name}.drawing-{os.getpid()}")  # renamed into place once complete
        generate(drawing, seed=0, progress=progress)
        drawing.rename(root)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the ImageFolder tree into")
    p.add_argument("--hot-dogs", type=int, default=1000, help="training hot dogs (default 1000)")
    p.add_argument("--others", type=int, default=5000, help="training not-hot-dogs (default 5000)")
    p.add_argument("--test-hot-dogs", type=int, default=200, help="test hot dogs (default 200)")
    p.add_argument("--test-others", type=int, default=1000, help="test not-hot-dogs (default 1000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    framing = "how the subject is framed: seed (centred, level, the default) or photo (as people take photos: "
    framing += "anywhere, at any size, tilted, sometimes cut by the frame, in any light)"
    p.add_argument("--framing", choices=sorted(FRAMINGS), default="seed", help=framing)
    a = p.parse_args(argv)

    def command():
        if min(a.hot_dogs, a.others, a.test_hot_dogs, a.test_others) < 0 or not 8 <= a.size <= 1024:
            raise UserError("counts must be >= 0 and --size between 8 and 1024")
        counts = (a.hot_dogs, a.others, a.test_hot_dogs, a.test_others)
        generate(a.out, *counts, a.size, a.seed, FRAMINGS[a.framing], progress=sys.stderr.isatty())
        print(f"wrote {a.hot_dogs + a.others} training and {a.test_hot_dogs + a.test_others} test images to {a.out}")

    return cli.exit_code(command, interrupted=f"{a.out} holds part of the set: draw it again there, or remove it")


if __name__ == "__main__":
    cli.run(main)
