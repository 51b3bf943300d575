"""The hot-dog app: take a photo, get the verdict, see which neurons fired.

    python -m hotdog_torch.serve --checkpoint runs/<name>/checkpoints/best.pt [--host 127.0.0.1] [--port 8000]

One page (hotdog_torch/static/index.html: the phone's camera, or choose or drop a file) and a JSON API
beside it, served by Starlette on uvicorn (pip install -e '.[app]'):

    GET  /          the page
    GET  /health    {"status": "ok", "classes": [...], "image_size": S, "channels": C, "checkpoint": PATH}
    POST /predict   multipart field `file` -> {"class", "score", "scores": {class: score}, "neurons": [...], "seen"}

The network loads once; requests are classified in a thread pool (read-only inference, safe to run side by
side).  A photo goes through the same decode as predict and training (predict.Classifier).  An upload that
is empty, too large (over 20 MB), not an image, or an image with too many pixels gets a 4xx answer with
{"error": one sentence}, and the server goes on serving.  It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import io
import socket
from importlib import resources
from pathlib import Path

from . import checkpoint, cli, images
from .config import UserError
from .predict import Classifier

MAX_BYTES = 20 * 2**20  # a photo from a phone is a few MB; anything bigger is refused before decoding
MAX_PIXELS = 64_000_000  # 8000 x 8000: above a phone camera's 48 megapixels, far below a decompression bomb


def error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(checkpoint_path: str | Path):
    """The Starlette application for one checkpoint (loaded here, once)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    net = Classifier(checkpoint.load(checkpoint_path))
    page = (resources.files("hotdog_torch") / "static" / "index.html").read_text(encoding="utf-8")
    about = {"classes": net.classes, "image_size": net.size, "channels": net.channels}

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        return JSONResponse({"status": "ok", **about, "checkpoint": str(checkpoint_path)})

    async def predict(request):
        upload = await read_upload(request)
        if not isinstance(upload, bytes):
            return upload  # the error answer
        try:
            return JSONResponse(await run_in_threadpool(classify, net, upload))
        except images.Image.DecompressionBombError:
            return error(413, f"the image has too many pixels (over {MAX_PIXELS:,}); send a smaller one")
        except images.DECODE_ERRORS:
            return error(415, "the file is not an image this app can read (send a JPEG, PNG, WebP, ... photo)")

    routes = [Route("/", index), Route("/health", health), Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes)


async def read_upload(request):
    """The uploaded file's bytes, or an error answer.  The body is counted as it arrives, with a Content-Length or
    chunked without one, and refused once it passes the limit: nothing is parsed or spooled to disk before."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    too_large = error(413, f"the upload is over {MAX_BYTES // 2**20} MB; send a smaller photo")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BYTES + 2**16:
        if int(length) <= 4 * MAX_BYTES:  # read it to the end, so that the client gets the answer, not a reset
            async for _ in request.stream():
                pass
        return too_large
    body = await body_within(request, MAX_BYTES + 2**16)  # the photo and its multipart framing
    if body is None:
        return too_large

    async def replay():  # the body, read once, handed to the multipart parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception:  # noqa: BLE001 - whatever the multipart parser makes of a malformed body, the body is at fault
        return error(400, "send the photo as a multipart form, in the field 'file'")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        return error(400, "send the photo as a multipart form, in the field 'file'")
    data = await upload.read(MAX_BYTES + 1)
    if not data:
        return error(400, "the upload is empty")
    return too_large if len(data) > MAX_BYTES else data


async def body_within(request, limit: int) -> bytes | None:
    """The request's body as it arrives, or None as soon as it passes limit bytes (the rest is not waited for)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def classify(net: Classifier, data: bytes) -> dict:
    """The verdict on an uploaded photo; with a router, its box in the photo's own pixels."""
    photo = io.BytesIO(data)
    array = net.decode(photo, max_pixels=MAX_PIXELS)
    return net.explain(array, photo_size=images.dimensions(photo) if net.router is not None else None)


def check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt of a run")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only); 0.0.0.0 for the whole network")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)

    def command():
        try:
            import uvicorn
        except ImportError:
            raise UserError("the app needs its extra packages: pip install -e '.[app]'") from None
        app = create_app(a.checkpoint)
        check_port(a.host, a.port)
        print(f"serving {a.checkpoint} on http://{a.host}:{a.port}/ (Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")

    return cli.exit_code(command, interrupted="the app stopped")


if __name__ == "__main__":
    cli.run(main)
