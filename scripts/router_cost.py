"""What the router costs the app: one photo's answer (decode, find, un-warp, judge, explain), with and without it.

    python scripts/router_cost.py --checkpoint runs/photos/checkpoints/best.pt [--photos 50]

The same checkpoint twice: as it is (router, then classifier) and with the router's passes taken out (no router
network evaluated: the picture only resampled to the classifier's side, then judged).  Each photo is a test
picture of the checkpoint's data at a phone's size (1280 x 960 JPEG); each answer is serve.classify on its bytes,
timed alone; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotdog_torch import checkpoint  # noqa: E402
from hotdog_torch.predict import Classifier  # noqa: E402
from hotdog_torch.serve import classify  # noqa: E402


def photos(ckpt: dict, n: int) -> list[bytes]:
    root = Path(ckpt["config"]["data"]["root"])
    files = sorted((root / "test" if (root / "test").is_dir() else root).rglob("*.jpg"))[:: max(1, 1200 // n)][:n]
    out = []
    for f in files:
        buffer = io.BytesIO()
        Image.open(f).convert("RGB").resize((1280, 960), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def median_seconds(net: Classifier, uploads: list[bytes]) -> float:
    classify(net, uploads[0])  # warm-up
    times = []
    for data in uploads:
        t = time.perf_counter()
        classify(net, data)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--photos", type=int, default=50)
    a = p.parse_args()
    ckpt = checkpoint.load(a.checkpoint)
    if ckpt.get("router") is None:
        print("error: this checkpoint has no router", file=sys.stderr)
        return 2
    uploads = photos(ckpt, a.photos)
    routed = Classifier(ckpt)
    alone = Classifier(ckpt)
    alone.router.passes = 0  # locate() is then the identity: no router MLP runs
    with_router, without = median_seconds(routed, uploads), median_seconds(alone, uploads)
    print(
        f"{len(uploads)} photos of 1280x960: median answer {with_router * 1e3:.2f} ms with the router, "
        f"{without * 1e3:.2f} ms without ({with_router / without:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
