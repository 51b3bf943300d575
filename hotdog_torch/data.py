"""ImageFolder discovery, the decode-once cache, the split, device-resident batches.

torchvision's ImageFolder finds the classes (one per folder) and the files.
Every image is decoded, resized and converted once into one uint8 tensor of
shape (N, C, S, S); that tensor is cached on disk under a key made of the file
list, the files' sizes and mtimes and the image settings, so a changed, added or
removed file means a fresh decode.  Training then draws batches by index from
the tensor held on the training device and normalises them there: no per-epoch
decode, no DataLoader.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from .config import Data, UserError
from .files import atomic_write

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor  # (N, C, S, S) uint8
    labels: torch.Tensor  # (N,) int64, indices into Dataset.classes
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], [self.paths[i] for i in index.tolist()])


@dataclass
class Dataset:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None
    skipped: list[str]  # files found but not decodable
    layout: str  # "folders" (root/{class}) or "splits" (root/{train,val,test}/{class})

    def summary(self) -> str:
        lines = [f"classes: {', '.join(self.classes)} ({self.layout} layout)"]
        for name in SPLITS:
            split = getattr(self, name)
            if split is not None:
                counts = torch.bincount(split.labels, minlength=len(self.classes)).tolist()
                lines.append(f"{name}: {len(split)} images (" + ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts)) + ")")
        lines.append(f"skipped: {len(self.skipped)} undecodable files" + (": " + ", ".join(self.skipped[:5]) if self.skipped else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------- decoding one image


def decode(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """One file as a (channels, size, size) uint8 array, the way training sees it.

    Raises OSError (or a subclass Pillow uses) for a file that is not a decodable image.
    """
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as im:
        im.draft(mode, (size, size))  # JPEG: let libjpeg scale down by 2, 4 or 8 while decoding
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: keep the top 8 bits rather than clipping
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
        im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _decode_or_none(args):
    path, size, channels = args
    try:
        return decode(path, size, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, RecursionError):
        return None


# ---------------------------------------------------------------- a folder of classes, decoded and cached


def _cache_root(data: Data) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hotdog_torch"


def _cache_key(samples, data: Data) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, data.image_size, data.channels]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"\0{os.path.abspath(path)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    try:
        found = ImageFolder(str(folder), loader=str, allow_empty=True)
    except FileNotFoundError:
        raise UserError(f"{folder} holds no class folders: expected {folder}/<class name>/<images>") from None
    return found.classes, found.samples


def _decode_all(samples, data: Data, progress: bool, desc: str):
    from tqdm import tqdm

    jobs = [(path, data.image_size, data.channels) for path, _ in samples]
    workers = data.workers or os.cpu_count() or 1
    bar = dict(total=len(jobs), desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)
    if workers == 1 or len(jobs) < 64:
        return [_decode_or_none(j) for j in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_decode_or_none, jobs, chunksize=max(1, min(256, len(jobs) // (4 * workers)))), **bar))


def load_folder(folder: Path, data: Data, progress: bool = True, scanned=None) -> tuple[list[str], Split, list[str]]:
    """(classes, every decodable image of folder, skipped paths), through the cache."""
    classes, samples = scanned or _scan(folder)
    key = _cache_key(samples, data)
    root = _cache_root(data)
    images_file, meta_file = root / f"{key}.npy", root / f"{key}.json"
    if meta_file.exists() and images_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            images = np.load(images_file)
            if images.shape == tuple(meta["shape"]) and meta["classes"] == classes:
                split = Split(torch.from_numpy(images), torch.tensor(meta["labels"], dtype=torch.int64), meta["paths"])
                return classes, split, meta["skipped"]
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache entry is decoded afresh and rewritten
    decoded = _decode_all(samples, data, progress, f"decoding {folder}")
    keep = [i for i, arr in enumerate(decoded) if arr is not None]
    skipped = [samples[i][0] for i, arr in enumerate(decoded) if arr is None]
    shape = (len(keep), data.channels, data.image_size, data.image_size)
    images = np.stack([decoded[i] for i in keep]) if keep else np.zeros(shape, np.uint8)
    labels = [samples[i][1] for i in keep]
    paths = [samples[i][0] for i in keep]
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(images_file, lambda f: np.save(f, images))
        meta = dict(shape=list(shape), classes=classes, labels=labels, paths=paths, skipped=skipped)
        atomic_write(meta_file, lambda f: f.write(json.dumps(meta).encode()))  # written last: it marks the entry complete
    except OSError as e:
        warnings.warn(f"could not write the decode cache in {root} ({e.strerror}); decoding again next time")
    return classes, Split(torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), paths), skipped


# ---------------------------------------------------------------- the dataset


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: round(fraction * n_c) of each class c goes to val."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def load_dataset(data: Data, seed: int, progress: bool = True) -> Dataset:
    root = Path(data.root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    layout = "splits" if (root / "train").is_dir() else "folders"
    folders = {s: root / s for s in SPLITS if (root / s).is_dir()} if layout == "splits" else {"train": root}
    scanned = {name: _scan(folder) for name, folder in folders.items()}
    classes = scanned["train"][0]
    if len(classes) < 2:
        raise UserError(f"{folders['train']} has {len(classes)} class folder(s); at least two are needed")
    for name, (other, _) in scanned.items():
        if other != classes:
            raise UserError(f"{folders[name]} has classes {other}, but {folders['train']} has {classes}; they must match")
    loaded, skipped = {}, []
    for name, folder in folders.items():
        loaded[name] = load_folder(folder, data, progress, scanned[name])[1:]
        skipped += loaded[name][1]
    train = loaded["train"][0]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} undecodable files, first: {', '.join(skipped[:3])}")
    counts = torch.bincount(train.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise UserError(f"class folder(s) {', '.join(empty)} in {folders['train']} hold no decodable images")
    if "val" in loaded:
        val = loaded["val"][0]
    else:
        if int(counts.min()) < 2:
            raise UserError("every class needs at least two images to hold some out for validation")
        train_idx, val_idx = stratified_split(train.labels, data.val_fraction, seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    test = loaded["test"][0] if "test" in loaded else None
    return Dataset(classes, train, val, test, skipped, layout)


# ---------------------------------------------------------------- on the device


def normalisation(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a uint8 (N, C, S, S) tensor, as floats in [0, 1] units."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64, device=images.device)
    squares = torch.zeros(c, dtype=torch.float64, device=images.device)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float (B, C, S, S): x/255, then (x - mean)/std per channel."""
    scale = (1 / (255 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return images.float() * scale - shift
