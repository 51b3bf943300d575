"""ImageFolder discovery, the decode-once cache, the split, device-resident batches.

The classes and files are found by torchvision's ImageFolder rules (one class per subfolder, sorted;
image extensions only; subfolders followed, links too), scanned here without importing torchvision,
which costs 1.5 s of start-up (tests/test_data.py checks the scan against ImageFolder itself).
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

from . import synth
from .config import Data, UserError
from .files import atomic_write, locked
from .images import DECODE_ERRORS, IMG_EXTENSIONS, decode, shown

CACHE_VERSION = 2  # 2: EXIF orientation applied
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """Some images of a pool, by index: a shard or a split is just a subset of indices.

    images is the pool: every decoded image of one folder, (N, C, S, S) uint8, held
    on the training device, or memory-mapped from the cache file when the data
    set is larger than data.memory_budget.  Splits cut from one folder share it.
    """

    images: torch.Tensor
    index: torch.Tensor  # (n,) int64 rows of images that belong to this split
    labels: torch.Tensor  # (n,) int64 indices into Dataset.classes, on the device of index
    paths: list[str]
    mapped: bool = False  # images is a memory-mapped cache file, not a tensor in memory

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> Split:
        paths = [self.paths[i] for i in positions.tolist()]
        return Split(self.images, self.index[positions], self.labels[positions], paths, self.mapped)

    def batch(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 images at these positions of the split (a gather from the pool)."""
        return self.images[self.index[positions]]


@dataclass
class Dataset:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None
    skipped: list[str]  # files found but not decodable
    layout: str  # "folders" (root/{class}) or "splits" (root/{train,val,test}/{class})

    def splits(self) -> dict[str, Split]:
        return {name: getattr(self, name) for name in SPLITS if getattr(self, name) is not None}

    def to(self, device: torch.device) -> Dataset:
        """Each pool moved to the device once, the splits cut from it sharing the copy (memory-mapped pools stay
        mapped; their batches move).  It is the only copy of the images made for training: the budget counts it."""
        pools = {id(s.images): s.images for s in self.splits().values() if not s.mapped}
        moved = {key: pool.to(device) for key, pool in pools.items()}
        out = {
            name: s if s.mapped else Split(moved[id(s.images)], s.index.to(device), s.labels.to(device), s.paths)
            for name, s in self.splits().items()
        }
        return Dataset(self.classes, out["train"], out["val"], out.get("test"), self.skipped, self.layout)

    def where(self, device) -> str:
        mapped = self.train.mapped
        return "memory-mapped from the cache (larger than data.memory_budget)" if mapped else f"resident on {device}"

    def summary(self) -> str:
        lines = [f"classes: {', '.join(self.classes)} ({self.layout} layout)"]
        for name, split in self.splits().items():
            counts = torch.bincount(split.labels.cpu(), minlength=len(self.classes)).tolist()
            lines.append(
                f"{name}: {len(split)} images ("
                + ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts, strict=True))
                + ")"
            )
        lines.append(
            f"skipped: {len(self.skipped)} undecodable files"
            + (": " + ", ".join(shown(p) for p in self.skipped[:5]) if self.skipped else "")
        )
        return "\n".join(lines)


_FILES: dict[str, int] = {}  # per process: the cache file being written, opened once


def _decode_block(job) -> list[int]:
    """Decode consecutive rows into one buffer, write it into the .npy with one pwrite; return the undecodable rows."""
    paths, first_row, out_file, offset, size, channels = job
    buffer = np.zeros((len(paths), channels, size, size), np.uint8)
    bad = []
    for k, path in enumerate(paths):
        try:
            buffer[k] = decode(path, size, channels)
        except DECODE_ERRORS:
            bad.append(first_row + k)
    fd = _FILES.get(out_file)
    if fd is None:
        fd = _FILES[out_file] = os.open(out_file, os.O_WRONLY)
    os.pwrite(fd, buffer.data, offset + first_row * buffer[0].nbytes)
    return bad


# ---------------------------------------------------------------- a folder of classes, decoded and cached


def _cache_root(data: Data) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hotdog_torch"


def _cache_key(samples, data: Data) -> str:
    """A hash of the image settings and of every sample's path, class, size and modification time."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, data.image_size, data.channels]).encode())
    for path, label, size, mtime in samples:
        h.update(os.fsencode(os.path.abspath(path)) + f"\0{label}\0{size}\0{mtime}\0".encode())
    return h.hexdigest()[:32]


def image_folder(folder) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index), ...]) by ImageFolder's rules: each subfolder a class, sorted by name; in it,
    every file with an image extension (any case), walking subfolders (and links) in sorted order."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
            samples += [(os.path.join(root, f), label) for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
    return classes, samples


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """ImageFolder's classes and (path, class, size, mtime) samples, each file stat()ed once; a file reached twice
    (through a symlink, or a hard link) counts once.  A dangling link stays in, to be skipped as undecodable."""
    try:
        classes, found = image_folder(folder)
    except (FileNotFoundError, NotADirectoryError):
        classes = []
    if not classes:
        raise UserError(f"{folder} holds no class folders: expected {folder}/<class name>/<images>")
    seen, samples = set(), []
    for path, label in found:
        try:
            st = os.stat(path)
        except OSError:
            samples.append((path, label, -1, -1))
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            samples.append((path, label, st.st_size, st.st_mtime_ns))
    return classes, samples


def _decode_all(samples, data: Data, out_file: Path, offset: int, progress: bool, desc: str) -> set[int]:
    """Decode sample i into row i of out_file (an .npy whose data starts at offset) on data.workers processes.

    Work goes out in blocks of 32 consecutive rows; each block is one write, so the
    processes share no memory and send back only the rows they could not decode.
    """
    from tqdm import tqdm

    block = 32
    jobs = [
        ([sample[0] for sample in samples[i : i + block]], i, str(out_file), offset, data.image_size, data.channels)
        for i in range(0, len(samples), block)
    ]
    workers = min(data.workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)
    bad: set[int] = set()
    try:
        if workers <= 1:
            results = map(_decode_block, jobs)
        else:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_decode_block, jobs)
        for job, rows in zip(jobs, results, strict=True):
            bad.update(rows)
            bar.update(len(job[0]))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown()
        fd = _FILES.pop(str(out_file), None)
        if fd is not None:
            os.close(fd)
    return bad


def _build_entry(samples, classes, data: Data, images_file: Path, meta_file: Path, progress: bool, desc: str) -> None:
    """Decode into a temporary .npy, fsync, rename into place; then the .json that marks the entry complete.
    Called holding the entry's lock: any temporary file of this entry is a killed process's."""
    shape = (len(samples), data.channels, data.image_size, data.image_size)
    for stale in images_file.parent.glob(f".{images_file.stem}.*.tmp"):  # of a process killed building this entry
        stale.unlink()
    tmp = images_file.with_name(f".{images_file.name}.{os.getpid()}.tmp")
    try:
        empty = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)  # header + room for every row
        offset = empty.offset
        del empty
        bad = _decode_all(samples, data, tmp, offset, progress, desc)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, images_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    rows = [i for i in range(len(samples)) if i not in bad]
    meta = dict(
        version=CACHE_VERSION,
        shape=list(shape),
        classes=classes,
        rows=rows,
        labels=[samples[i][1] for i in rows],
        paths=[samples[i][0] for i in rows],
        skipped=[samples[i][0] for i in sorted(bad)],
    )
    atomic_write(meta_file, lambda f: f.write(json.dumps(meta).encode()))


def _read_entry(images_file: Path, meta_file: Path, classes, in_memory: bool):
    """(pool, meta) of a complete, undamaged cache entry, else None."""
    try:
        meta = json.loads(meta_file.read_text())
        pool = np.load(images_file, mmap_mode=None if in_memory else "c")
        if pool.shape != tuple(meta["shape"]) or meta["classes"] != classes or meta.get("version") != CACHE_VERSION:
            return None
        if in_memory and not pool.flags.writeable:
            pool = pool.copy()
        return pool, meta
    except (OSError, ValueError, KeyError, TypeError, EOFError, json.JSONDecodeError):
        return None  # missing, truncated or damaged: decoded afresh and rewritten


def decoded_bytes(n_images: int, data: Data) -> int:
    return n_images * data.channels * data.image_size**2


def load_folder(
    folder: Path, data: Data, progress: bool = True, scanned=None, in_memory: bool = True
) -> tuple[list[str], Split, list[str]]:
    """(classes, every decodable image of folder, skipped paths), through the cache.

    in_memory=False leaves the pool memory-mapped from the cache file (bigger-than-memory data).
    """
    classes, samples = scanned or _scan(folder)
    key = _cache_key(samples, data)
    root = _cache_root(data)
    images_file, meta_file = root / f"{key}.npy", root / f"{key}.json"
    entry = _read_entry(images_file, meta_file, classes, in_memory)
    if entry is None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the decode cache folder {root} ({e.strerror}); set data.cache_dir to a writable folder"
            ) from None
        with locked(root / f"{key}.lock", f"waiting for another process decoding {folder} into {root}"):
            entry = _read_entry(images_file, meta_file, classes, in_memory)  # it decoded while this one waited
            if entry is None:
                _build_entry(samples, classes, data, images_file, meta_file, progress, f"decoding {folder}")
                entry = _read_entry(images_file, meta_file, classes, in_memory)
        if entry is None:
            raise OSError(f"the decode cache entry {images_file} could not be read back after writing it")
    pool, meta = entry
    rows, labels = torch.tensor(meta["rows"], dtype=torch.int64), torch.tensor(meta["labels"], dtype=torch.int64)
    split = Split(torch.from_numpy(pool), rows, labels, meta["paths"], mapped=not in_memory)
    return classes, split, meta["skipped"]


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


def prepare(data: Data, seed: int, progress: bool = True, memory_budget: int | None = None) -> Dataset:
    """load_dataset, after drawing the synthetic set into data.root when the config asks for it (data.generate)."""
    synth.draw_if_missing(data.root, data.generate, progress)
    return load_dataset(data, seed, progress, memory_budget)


def load_dataset(data: Data, seed: int, progress: bool = True, memory_budget: int | None = None) -> Dataset:
    """The train, val and (if present) test splits of data.root.

    When the decoded images exceed memory_budget bytes (None: no limit), the pools
    stay memory-mapped from the cache files and batches are read from them.
    """
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
            raise UserError(
                f"{folders[name]} has classes {other}, but {folders['train']} has {classes}; they must match"
            )
    total = decoded_bytes(sum(len(samples) for _, samples in scanned.values()), data)
    in_memory = memory_budget is None or total <= memory_budget
    loaded, skipped = {}, []
    for name, folder in folders.items():
        loaded[name] = load_folder(folder, data, progress, scanned[name], in_memory)[1:]
        skipped += loaded[name][1]
    train = loaded["train"][0]
    if skipped:
        first = ", ".join(shown(p) for p in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} files that are not decodable images, first: {first}", stacklevel=3)
    counts = torch.bincount(train.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
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


def normalisation(split: Split, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a split's images, as floats in [0, 1] units.

    From each channel's histogram of the 256 uint8 values (exact integer counts): mean = Σ v·n_v / N and
    E[x²] = Σ v²·n_v / N, in float64, then std = √(E[x²] − mean²).
    """
    c = split.images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.int64, device=split.index.device)
    for i in range(0, len(split), chunk):
        x = split.batch(torch.arange(i, min(i + chunk, len(split)), device=split.index.device))
        for k in range(c):
            counts[k] += torch.bincount(x[:, k].flatten(), minlength=256).to(counts.device)
    values = torch.arange(256, dtype=torch.float64, device=counts.device) / 255
    n = counts.sum(dim=1).double()
    mean = (counts.double() * values).sum(dim=1) / n
    std = ((counts.double() * values * values).sum(dim=1) / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def default_memory_budget(device: torch.device) -> int:
    """Half the free GPU memory on CUDA, half the available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float (B, C, S, S): x/255, then (x - mean)/std per channel."""
    scale = (1 / (255 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return images.float().mul_(scale).sub_(shift)  # in place on the fresh float copy: no extra temporaries
