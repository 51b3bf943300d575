"""The hot-dog app through real parts: a uvicorn process on 127.0.0.1, photos as phones and the web send them,
every kind of bad upload, concurrent requests, the page in a real headless Chromium, and the exported model."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_process
from PIL import Image, features

from hotdog_torch import checkpoint, drawings, export, images
from hotdog_torch.predict import Classifier

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("starlette", reason="the app's extra: pip install -e '.[app]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def upload(base: str, data: bytes, name="photo.jpg", field="file") -> tuple[int, dict]:
    """POST /predict with one file in a multipart form, as a browser sends it."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
    body = (
        (head + "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    return post(f"{base}/predict", body, f"multipart/form-data; boundary={boundary}")


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def heic(image: Image.Image) -> bytes:
    """The image as an iPhone stores a photo: HEIC, written by pillow-heif (the heif extra)."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra: pip install -e '.[heif]'")
    pillow_heif.register_heif_opener()
    return encoded(image, "HEIF", quality=90)


@pytest.fixture(scope="module")
def best(trained):
    return trained[0] / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def server(best):
    yield from serving(best)


def serving(best):
    """The app of a checkpoint in a uvicorn process of its own: yields its address, then stops it."""
    port = free_port()
    command = [sys.executable, "-m", "hotdog_torch.serve", "--checkpoint", str(best), "--port", str(port)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                assert json.loads(r.read())["status"] == "ok"
                break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def hot_dog_photo(best, small_tree, tmp_path_factory):
    """The test hot dog the network is surest of, as a 640x480 JPEG, the way a phone would send it."""
    net = Classifier(checkpoint.load(best))
    paths = sorted((small_tree / "test" / "hot_dog").glob("*.jpg"))
    scores = net.scores(np.stack([net.decode(p) for p in paths]))[:, net.classes.index("hot_dog")]
    photo = Image.open(paths[int(scores.argmax())]).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
    path = tmp_path_factory.mktemp("photos") / "hot_dog.jpg"
    photo.save(path, quality=92)
    return path


def test_health_and_the_page(server, best):
    with urllib.request.urlopen(f"{server}/health") as r:
        health = json.loads(r.read())
    assert health == {
        "status": "ok",
        "classes": ["hot_dog", "not_hot_dog"],
        "image_size": 32,
        "channels": 1,
        "checkpoint": str(best),
    }
    with urllib.request.urlopen(f"{server}/") as r:
        page = r.read().decode()
    assert '<input id="photo" type="file" accept="image/*" capture="environment">' in page
    assert "http://" not in page and "https://" not in page  # nothing from the network: it works offline


def test_a_photo_gets_the_verdict_predict_gives_it(server, best, hot_dog_photo):
    status, r = upload(server, hot_dog_photo.read_bytes())
    assert status == 200, r
    net = Classifier(checkpoint.load(best))
    scores = net.scores(net.decode(hot_dog_photo)[None])[0]
    assert r["class"] == "hot_dog" and r["score"] == pytest.approx(float(scores.max()), abs=1e-6)
    assert r["scores"] == pytest.approx(dict(zip(net.classes, scores.tolist(), strict=True)), abs=1e-6)
    assert len(r["neurons"]) == 8 and r["neurons"][0]["activation"] >= r["neurons"][-1]["activation"]
    neuron = Image.open(io.BytesIO(base64.b64decode(r["neurons"][0]["picture"].split(",")[1])))
    seen = Image.open(io.BytesIO(base64.b64decode(r["seen"].split(",")[1])))
    assert neuron.size == seen.size == (32, 32) and seen.mode == "L"  # what the network saw: 32x32 grayscale


def test_photos_as_phones_and_the_web_send_them(server, hot_dog_photo):
    photo = Image.open(hot_dog_photo)
    reference = upload(server, hot_dog_photo.read_bytes())[1]
    sideways = photo.transpose(Image.Transpose.ROTATE_90)  # stored turned, with the tag that turns it back
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    big = photo.resize((4032, 3024))  # 12 megapixels, decoded in draft mode
    for name, data in [
        ("tagged.jpg", encoded(sideways, "JPEG", quality=95, exif=exif)),
        ("big.jpg", encoded(big, "JPEG", quality=90)),
        ("alpha.png", encoded(photo.convert("RGBA"), "PNG")),
        ("cmyk.jpg", encoded(photo.convert("CMYK"), "JPEG")),
        ("photo.webp", encoded(photo, "WEBP")),
        ("iphone.heic", heic(photo)),  # what an iPhone sends
        *([("photo.avif", encoded(photo, "AVIF"))] if features.check("avif") else []),
    ]:
        status, r = upload(server, data, name)
        assert status == 200, (name, r)
        assert r["class"] == reference["class"] and abs(r["score"] - reference["score"]) < 0.1, (name, r)


def test_an_exif_orientation_is_applied_in_every_decode(tmp_path):
    upright = drawings.draw_image("hot_dog", np.random.default_rng(1), size=48).resize((64, 48))
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6  # "turn 90 degrees clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "stored.png", exif=exif)
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "untagged.png")
    upright.save(tmp_path / "upright.png")
    decoded = {name: images.decode(tmp_path / f"{name}.png", 32, 3) for name in ("stored", "untagged", "upright")}
    assert np.array_equal(decoded["stored"], decoded["upright"])  # turned upright, exactly
    assert not np.array_equal(decoded["untagged"], decoded["upright"])  # (the tag is what made the difference)


def test_every_bad_upload_gets_a_4xx_and_the_server_keeps_serving(server):
    from test_bad_inputs import png_claiming

    cases = [
        (upload(server, b"just some words\n", "notes.txt"), 415, "not an image"),
        (upload(server, b"", "empty.jpg"), 400, "empty"),
        (upload(server, png_claiming(30000, 30000), "bomb.png"), 413, "too many pixels"),
        (upload(server, encoded(Image.new("L", (9000, 8000), 90), "JPEG"), "72mp.jpg"), 413, "too many pixels"),
        (upload(server, b"\xff" * (21 * 2**20), "huge.jpg"), 413, "over 20 MB"),
        (upload(server, b"abc", "photo.jpg", field="photo"), 400, "field 'file'"),
        (post(f"{server}/predict", b"not a form", "text/plain"), 400, "multipart"),
    ]
    for (status, answer), expected, words in cases:
        assert status == expected and words in answer["error"], (status, answer)
    with urllib.request.urlopen(f"{server}/health") as r:
        assert r.status == 200


def test_a_chunked_upload_is_refused_once_it_passes_the_limit_not_after_it_ends(server):
    """No Content-Length (Transfer-Encoding: chunked): the app counts the bytes as they arrive and answers 413 once
    they pass 20 MB, while the client has not ended the body (nothing parsed or spooled to disk before)."""
    host, port = server.removeprefix("http://").split(":")
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="huge.jpg"\r\n\r\n'.encode()
    request = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    chunk = b"\xff" * 2**20
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request + b"%x\r\n%s\r\n" % (len(head), head))
        for _ in range(21):  # 21 MB of the file, and the body never ended: no last chunk
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            got = s.recv(65536)  # a server that waits for the body's end times out here
            if not got:
                break
            answer += got
    assert answer.startswith(b"HTTP/1.1 413") and b"over 20 MB" in answer, answer[:300]
    with urllib.request.urlopen(f"{server}/health") as r:
        assert r.status == 200


def test_concurrent_requests_are_answered_alike(server, hot_dog_photo):
    data = hot_dog_photo.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: upload(server, data), range(24)))
    assert all(status == 200 for status, _ in answers)
    assert len({(r["class"], round(r["score"], 6)) for _, r in answers}) == 1


def test_a_missing_checkpoint_or_a_busy_port_is_one_sentence(best, tmp_path, capsys, monkeypatch):
    import uvicorn

    from hotdog_torch import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("a server started on a missing checkpoint"))
    r = subprocess.CompletedProcess([], serve.main(["--checkpoint", str(tmp_path / "no.pt")]), *capsys.readouterr())
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint") and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "hotdog_torch.serve", "--checkpoint", str(best), "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_a_port_out_of_range_is_one_sentence(best, capfd, monkeypatch):
    import uvicorn

    from hotdog_torch import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("a server started on a port out of range"))
    r = in_process(serve.main, ["--checkpoint", str(best), "--port", "70000"], capfd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == "error: --port must be between 1 and 65535, got 70000\n"


def chromium():
    pytest.importorskip("playwright", reason="the test extra: pip install -e '.[test,app]'")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("needs a Chromium: apt-get install -y chromium (CI's .ci/run installs it)")
    return path


def test_the_page_in_a_real_browser(server, hot_dog_photo, tmp_path):
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=flags)
        page = browser.new_page()
        page.goto(server + "/")
        page.set_input_files("#photo", str(hot_dog_photo))
        page.wait_for_selector("#verdict.yes", timeout=30_000)
        assert page.inner_text("#verdict") == "Hot dog!"
        assert page.locator("#neurons figure").count() == 8
        page.set_input_files("#photo", str(text))
        page.wait_for_selector("#error", state="visible", timeout=30_000)
        assert "not an image" in page.inner_text("#error") and not page.is_visible("#result")
        browser.close()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_exported_model_agrees_with_pytorch(best, small_tree, tmp_path, fmt, capfd):
    out = tmp_path / ("hotdog.onnx" if fmt == "onnx" else "hotdog.pt")
    args = ["--checkpoint", str(best), "--format", fmt, "--out", str(out)]
    if fmt == "onnx":  # export's main() in this process (a start-up of torch less); TorchScript's: the real command
        r = in_process(export.main, args, capfd)
    else:
        command = [sys.executable, "-m", "hotdog_torch.export", *args]
        r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    net = Classifier(checkpoint.load(best))
    photos = sorted((small_tree / "test").rglob("*.jpg"))[::8]
    batch = np.stack([net.decode(p) for p in photos])  # uint8, the trained size: what the app has after resizing
    expected = net.scores(batch).numpy()
    for n in (1, len(batch)):  # the batch size is free
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(["scores"], {"images": batch[:n]})[0]
        else:
            got = torch.jit.load(str(out))(torch.from_numpy(batch[:n])).numpy()
        assert np.abs(got - expected[:n]).max() <= 1e-5
    assert json.loads(out.with_suffix(".classes.json").read_text())["classes"] == ["hot_dog", "not_hot_dog"]
