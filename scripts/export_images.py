"""Write the newest picture of each TensorBoard image tag of a run as a PNG (how docs/*.png are made).

python scripts/export_images.py runs/<name> docs/ [--max-side 640]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument(
        "--max-side", type=int, default=640, help="shrink larger pictures to this many pixels on their longer side"
    )
    a = p.parse_args(argv)
    acc = EventAccumulator(a.run_dir, size_guidance={"images": 0})
    acc.Reload()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for tag in acc.Tags()["images"]:
        event = acc.Images(tag)[-1]
        path = out / (tag.replace("/", "_") + ".png")
        picture = Image.open(io.BytesIO(event.encoded_image_string))
        picture.thumbnail((a.max_side, a.max_side), Image.Resampling.LANCZOS)
        picture.save(path, optimize=True)
        print(f"{path}  ({tag}, step {event.step}, {event.width}x{event.height} -> {picture.width}x{picture.height})")


if __name__ == "__main__":
    main()
