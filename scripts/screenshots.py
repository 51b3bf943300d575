"""README's two pictures, from the real programs: TensorBoard on the default run, and the app with its box.

    python scripts/screenshots.py [--out docs] [--runs DIR] [--photos CHECKPOINT]

1. trains the default job (`python -m hotdog_torch.train --config configs/hotdog.yaml`) into DIR/board/default,
   serves DIR/board with TensorBoard (`python -m tensorboard.main`) on a free port of 127.0.0.1 and saves its Time
   Series page as OUT/tensorboard.png;
2. serves the photos recipe's network with `python -m hotdog_torch.serve` (--photos, e.g. the
   runs/photos/checkpoints/best.pt that `make app` trains; without it, configs/photos.yaml is trained into
   DIR/photos, as `make app` trains it) and saves the page after a photo of a hot dog framed off-centre, with the
   router's box drawn on it, as OUT/app.png.
Both pages are taken in Debian's headless Chromium (/usr/bin/chromium) through Playwright.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from app_check import start  # noqa: E402

from hotdog_torch import checkpoint, synth  # noqa: E402
from hotdog_torch.drawings import FRAMINGS  # noqa: E402
from hotdog_torch.predict import Classifier  # noqa: E402
from hotdog_torch.serve import classify  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TAGS = "^(cost/train|cost/val|accuracy/val)$"  # the three curves the picture shows
# TensorBoard's own settings, where it keeps them: no smoothing (an epoch's curve has a point an epoch), every point
SETTINGS = (
    """localStorage.setItem('_tb_global_settings', JSON.stringify({scalarSmoothing: 0, ignoreOutliers: false}))"""
)


def train(runs: Path, name: str, config: str, *overrides: str) -> Path:
    command = [sys.executable, "-m", "hotdog_torch.train", "--config", config, f"log.dir={runs}"]
    subprocess.run([*command, f"log.run_name={name}", *overrides], cwd=REPO, check=True)
    return runs / name


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"{url} did not answer in {seconds:.0f} s") from None
            time.sleep(0.5)


def tensorboard_picture(browser, runs: Path, out: Path) -> None:
    from test_board import free_port  # tests/ is on the path through app_check

    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--load_fast", "false"]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/data/runs")
        page = browser.new_page(viewport={"width": 1400, "height": 600})
        page.add_init_script(SETTINGS)
        page.goto(f"{base}/?darkMode=false#timeseries")
        page.wait_for_selector("card-view", timeout=60_000)
        page.get_by_role("button", name="Settings").click()  # the settings pane starts open: closed
        page.fill("input[placeholder*='Filter tags']", TAGS)
        page.keyboard.press("Escape")  # the tag suggestions close
        page.mouse.click(120, 700)  # on the empty runs pane: the filter loses focus
        time.sleep(8)  # the charts draw after their data arrives
        page.screenshot(path=str(out))
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def framed_hot_dog(net: Classifier, folder: Path) -> Path:
    """A hot dog drawn as people frame photos, at a phone's size: of 24 drawn, the one whose box (the square the
    classifier judges, often reaching past the photo's edge) has the most corners inside the photo, then the surest."""
    synth.generate(folder, 24, 0, 0, 0, size=320, seed=11, variation=FRAMINGS["photo"], workers=2, progress=False)
    best, photo = (-1, -1.0), None
    for i, f in enumerate(sorted((folder / "train" / "hot_dog").glob("*.jpg"))):
        candidate = folder / f"photo{i}.jpg"
        Image.open(f).resize((640, 640), Image.Resampling.LANCZOS).save(candidate, quality=92)
        answer = classify(net, candidate.read_bytes())
        inside = sum(all(0 <= c <= 640 for c in corner) for corner in answer.get("box", [[0, 0]]))
        if answer["class"] == "hot_dog" and (inside, answer["score"]) > best:
            best, photo = (inside, answer["score"]), candidate
    return photo


def app_picture(browser, best: Path, out: Path) -> None:
    net = Classifier(checkpoint.load(best))
    with tempfile.TemporaryDirectory() as tmp:
        photo = framed_hot_dog(net, Path(tmp) / "drawn")
        proc, base = start(best)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 900})
            page.goto(base + "/")
            page.set_input_files("#photo", str(photo))
            page.wait_for_selector("#verdict.yes, #verdict.no", timeout=30_000)
            time.sleep(1)  # the photo under the box finishes loading
            page.screenshot(path=str(out), full_page=True)
            print(f"{out}: {page.inner_text('#verdict')} {page.inner_text('#score')}")
            page.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def shrink(path: Path) -> None:
    """A palette PNG: a screenshot's few colours fit in 256, and the file in a fraction of the size."""
    image = Image.open(path).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size // 1024} KiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="where tensorboard.png and app.png go")
    p.add_argument("--runs", help="where the runs go (default runs/screenshots-<timestamp>)")
    p.add_argument("--photos", metavar="CHECKPOINT", help="the photos recipe's best.pt; default: train it")
    a = p.parse_args(argv)
    out = Path(a.out)
    runs = Path(a.runs or f"runs/screenshots-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    train(runs / "board", "default", "configs/hotdog.yaml")
    best = Path(a.photos) if a.photos else train(runs, "photos", "configs/photos.yaml")
    best = best if best.suffix == ".pt" else best / "checkpoints" / "best.pt"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tensorboard_picture(browser, runs / "board", out / "tensorboard.png")
        app_picture(browser, best, out / "app.png")
        browser.close()
    for name in ("tensorboard.png", "app.png"):
        shrink(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
