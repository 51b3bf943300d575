"""One image file as the network sees it: decoded, turned upright, converted, resized, as uint8.

Training's decode cache, evaluate, predict and the app all read images through decode(), so a
model sees a photo the same way whichever command shows it one, and the way people see it: a
photo taken upright but stored sideways with an EXIF orientation tag is turned upright first.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# The file extensions torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS) ...
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# ... and the phones' photos: HEIC/HEIF (an iPhone's, read through pillow-heif, the heif extra) and AVIF (Pillow's
# own reader, where Pillow was built with it).  Without the reader such a file is skipped and counted, not ignored.
PHOTO_EXTENSIONS = (".heic", ".heif", ".avif")
IMG_EXTENSIONS = TORCHVISION_EXTENSIONS + PHOTO_EXTENSIONS


class BadImage(OSError):
    """A file Pillow's parsers or decoders failed on, whatever they raised (their errors for damaged files vary)."""


# What decode() raises for a file that is not a (whole, sane) image; such a file is skipped and counted.
DECODE_ERRORS = (OSError, Image.DecompressionBombError)
# What Pillow's code raises besides OSError on damaged files (fuzzing finds each); from our own code these are bugs
PILLOW_FAILURES = (SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)
PILLOW_FAILURES += (RecursionError,)


@functools.cache
def read_heif() -> bool:
    """Teach Pillow to open HEIC/HEIF files, once per process, when pillow-heif is installed; whether it is."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def open_scaled(path, size: int, mode: str, max_pixels: int | None = None) -> Image.Image:
    """Image.open, with a JPEG larger than size x size set to decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode).
    Raises Image.DecompressionBombError for a file of more than max_pixels pixels, counted as the file holds them:
    draft mode shrinks the size Pillow reports."""
    read_heif()  # here, not at import: the decoding processes each register it, and no command pays for it unused
    im = Image.open(path)
    if max_pixels is not None and im.width * im.height > max_pixels:
        im.close()
        raise Image.DecompressionBombError(f"{im.width} x {im.height} pixels")
    im.draft(mode, (size, size))  # libjpeg scales in the DCT: decoding 512x512 for a 128x128 input costs about 1/16
    return im


ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or turned


def decode(path: str | os.PathLike | BinaryIO, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """One file (a path or a binary file object) as a (channels, size, size) uint8 array, the way training sees it.

    Raises OSError (BadImage for whatever else Pillow raised on it) for a file that is not a decodable image, and
    Image.DecompressionBombError for one of more than max_pixels pixels (default: Pillow's own limit); anything
    else is a bug and raises as it is.
    """
    try:
        return _decode(path, size, channels, max_pixels)
    except PILLOW_FAILURES as e:
        if not _raised_in_pillow(e):
            raise  # a bug of ours: it must not pass for an undecodable image
        raise BadImage(f"{type(e).__name__}: {e}") from e


def _raised_in_pillow(e: BaseException) -> bool:
    """Was e raised by Pillow's code (its innermost Python frame in a PIL module)?"""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(("PIL.", "pillow_heif"))


def _decode(path, size: int, channels: int, max_pixels: int | None) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    with open_scaled(path, size, mode, max_pixels) as im:
        if im.getexif().get(ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)  # as the photo was taken, not as the sensor stored it
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: keep the top 8 bits rather than clipping
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
        im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy of a read-only view warns)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def dimensions(file) -> tuple[int, int]:
    """A photo's (width, height) in pixels as it was taken (EXIF orientation applied), from its header."""
    read_heif()
    if hasattr(file, "seek"):
        file.seek(0)  # an upload read once already
    with Image.open(file) as im:
        w, h = im.size
        turned = im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)  # stored a quarter turn away from upright
    return (h, w) if turned else (w, h)


def shown(path: str) -> str:
    """A path as text that can be printed and logged (file names need not be UTF-8)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")
