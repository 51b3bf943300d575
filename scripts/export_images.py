"""Write the newest picture of each TensorBoard image tag of a run as a PNG (how docs/*.png are made).

    python scripts/export_images.py runs/<name> docs/
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    acc = EventAccumulator(a.run_dir, size_guidance={"images": 0})
    acc.Reload()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for tag in acc.Tags()["images"]:
        event = acc.Images(tag)[-1]
        path = out / (tag.replace("/", "_") + ".png")
        path.write_bytes(event.encoded_image_string)
        print(f"{path}  ({tag}, step {event.step}, {event.width}x{event.height})")


if __name__ == "__main__":
    main()
