"""The app under load, and its picture: a real server, real uploads, a real browser.

    python scripts/app_check.py --checkpoint runs/<name>/checkpoints/best.pt [--requests 160] [--clients 8]
    python scripts/app_check.py --checkpoint ... --screenshot docs/app.png

load (the default): starts `python -m hotdog_torch.serve` on a free port of 127.0.0.1 and sends it a mix of
good photos (synthetic test images at phone sizes, JPEG, PNG, WebP) and bad uploads (text, empty, a
decompression bomb, over 20 MB, the wrong field) from concurrent clients.  Every good one must get the class
that predict.Classifier gives the same bytes, every bad one a 4xx, and the server must answer /health at the
end; it prints the counts and the p50/p99 latency.
--screenshot: the page after a hot-dog photo, in Debian's headless Chromium (Playwright), saved as a PNG.
--router-cost N: with a router (model.router), the median of N photos' answers (serve.classify: decode, find,
un-warp, judge, explain) with the router and with its passes taken out (the picture only resampled), and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_app import free_port, upload  # noqa: E402
from test_bad_inputs import png_claiming  # noqa: E402

from hotdog_torch import checkpoint, synth  # noqa: E402
from hotdog_torch.predict import Classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def start(best: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "hotdog_torch.serve", "--checkpoint", str(best), "--port", str(port)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).close()
            return proc, base
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


def photos(folder: Path, n: int) -> list[tuple[str, bytes]]:
    """n good uploads: the synthetic test images, enlarged to phone-like sizes, in JPEG, PNG and WebP."""
    files = sorted(folder.rglob("*.jpg"))
    out = []
    for i in range(n):
        image = Image.open(files[(i * 37) % len(files)]).convert("RGB").resize((640 + 16 * (i % 5), 480))
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out.append((f"photo{i}.{fmt.lower()}", buffer.getvalue()))
    return out


BAD = [
    ("notes.txt", b"not a photo\n", "file"),
    ("empty.jpg", b"", "file"),
    ("bomb.png", png_claiming(30000, 30000), "file"),
    ("huge.jpg", b"\xff" * (21 * 2**20), "file"),
    ("photo.jpg", b"abc", "photo"),
]


def load(best: Path, requests: int, clients: int) -> int:
    net = Classifier(checkpoint.load(best))
    with tempfile.TemporaryDirectory() as tmp:
        folder = synth.generate(Path(tmp) / "fresh", 20, 40, 0, 0, size=128, seed=99, workers=2, progress=False)
        good = photos(folder / "train", requests - requests // 5)
    expected = {name: net.classes[int(net.scores(net.decode(io.BytesIO(data))[None]).argmax())] for name, data in good}
    jobs = [(name, data, "file", True) for name, data in good]
    jobs += [(name, data, field, False) for k in range(requests // 5) for name, data, field in [BAD[k % len(BAD)]]]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    proc, base = start(best)
    try:

        def send(job):
            name, data, field, ok = job
            t0 = time.perf_counter()
            status, answer = upload(base, data, name, field)
            return name, ok, status, answer, time.perf_counter() - t0

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(send, jobs))
        alive = json.loads(urllib.request.urlopen(f"{base}/health").read())["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    right = sum(ok and s == 200 and a["class"] == expected[n] for n, ok, s, a, _ in results)
    refused = sum(not ok and 400 <= s < 500 for n, ok, s, a, _ in results)
    n_good = sum(job[3] for job in jobs)
    latencies = sorted(t for *_, t in results)
    print(
        f"{len(jobs)} uploads from {clients} concurrent clients: {right} of {n_good} photos answered right, "
        f"{refused} of {len(jobs) - n_good} bad uploads refused with a 4xx, server alive afterwards: {alive}"
    )
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (the 21 MB uploads included)")
    return 0 if right == n_good and refused == len(jobs) - n_good and alive else 1


def screenshot(best: Path, out: Path) -> int:
    from playwright.sync_api import sync_playwright

    net = Classifier(checkpoint.load(best))
    with tempfile.TemporaryDirectory() as tmp:
        folder = synth.generate(Path(tmp) / "fresh", 12, 0, 0, 0, size=128, seed=7, workers=2, progress=False)
        files = sorted((folder / "train" / "hot_dog").glob("*.jpg"))
        scores = net.scores(np.stack([net.decode(f) for f in files]))[:, net.classes.index("hot_dog")]
        photo = Path(tmp) / "hot_dog.jpg"
        Image.open(files[int(scores.argmax())]).resize((640, 480)).save(photo, quality=92)
        proc, base = start(best)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 820, "height": 900})
                page.goto(base + "/")
                page.set_input_files("#photo", str(photo))
                page.wait_for_selector("#verdict.yes, #verdict.no", timeout=30_000)
                page.screenshot(path=str(out), full_page=True)
                print(f"{out}: the page after a hot-dog photo, verdict {page.inner_text('#verdict')!r}")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


def router_cost(best: Path, n: int) -> int:
    from hotdog_torch.serve import classify

    routed, alone = Classifier(checkpoint.load(best)), Classifier(checkpoint.load(best))
    alone.router.passes = 0  # locate() is then the identity: no router MLP runs
    with tempfile.TemporaryDirectory() as tmp:
        folder = synth.generate(Path(tmp) / "fresh", n // 2, n - n // 2, 0, 0, size=128, seed=5, progress=False)
        uploads = [data for _, data in photos(folder / "train", n)]
    medians = []
    for net in (routed, alone):
        classify(net, uploads[0])  # warm-up
        medians.append(statistics.median(timed(classify, net, data) for data in uploads))
    ms = [f"{m * 1e3:.2f} ms" for m in medians]
    print(f"{n} photos: median answer {ms[0]} with the router, {ms[1]} without ({medians[0] / medians[1]:.2f}x)")
    return 0


def timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--screenshot", metavar="PNG", help="save the page after a hot-dog photo here instead")
    p.add_argument("--router-cost", type=int, metavar="N", help="time N photos' answers with and without the router")
    a = p.parse_args(argv)
    if a.router_cost:
        return router_cost(Path(a.checkpoint), a.router_cost)
    if a.screenshot:
        return screenshot(Path(a.checkpoint), Path(a.screenshot))
    return load(Path(a.checkpoint), a.requests, a.clients)


if __name__ == "__main__":
    sys.exit(main())
