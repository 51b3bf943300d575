"""The data set of a run: its folders through the decode-once cache (cache.py), the split, device-resident batches.

Every image is decoded, resized and converted once into one uint8 tensor of shape (N, C, S, S) per folder, cached
on disk (cache.py: the folder scanned by torchvision's ImageFolder rules without importing torchvision, which costs
1.5 s of start-up; tests/test_data.py checks the scan against ImageFolder itself).  Training then draws batches by
index from the tensor held on the training device and normalises them there: no per-epoch decode, no DataLoader.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import augment, cache, dist, synth
from .cache import image_folder  # noqa: F401 - the scan by ImageFolder's rules, tests/test_data.py checks it
from .config import Augment, Data, UserError
from .images import shown

SPLITS = cache.SPLITS


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


def decoded_bytes(n_images: int, data: Data) -> int:
    return n_images * data.channels * data.image_size**2


def load_folder(
    folder: Path, data: Data, progress: bool = True, scanned=None, in_memory: bool = True
) -> tuple[list[str], Split, list[str]]:
    """(classes, every decodable image of folder, skipped paths), through the cache.

    in_memory=False leaves the pool memory-mapped from the cache file (bigger-than-memory data).
    """
    classes, pool, meta = cache.entry(folder, data, progress, scanned, in_memory)
    rows, labels = torch.tensor(meta["rows"], dtype=torch.int64), torch.tensor(meta["labels"], dtype=torch.int64)
    split = Split(torch.from_numpy(pool), rows, labels, meta["paths"], mapped=not in_memory)
    return classes, split, meta["skipped"]


# ---------------------------------------------------------------- the dataset


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: round(fraction * n_c) of each class c goes to val, but at least one image and at most
    n_c - 1: a class of few images keeps one in each split (load_dataset refuses a class of fewer than two)."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
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
    folders = cache.folders(data)
    scanned = {name: cache.scan(folder) for name, folder in folders.items()}
    classes = scanned["train"][0]
    if len(classes) < 2:
        raise UserError(f"{folders['train']} has {len(classes)} class folder(s); at least two are needed")
    for name, (other, _) in scanned.items():
        if other != classes:
            raise UserError(
                f"{folders[name]} has classes {other}, but {folders['train']} has {classes}; they must match"
            )
    for name, (_, samples) in scanned.items():
        if name != "train" and not samples:  # before any decode
            raise UserError(empty_split(folders[name], name, "images"))
    total = decoded_bytes(sum(len(samples) for _, samples in scanned.values()), data)
    in_memory = memory_budget is None or total <= memory_budget
    loaded, skipped = {}, []
    for name, folder in folders.items():
        loaded[name] = load_folder(folder, data, progress, scanned[name], in_memory)[1:]
        skipped += loaded[name][1]
        if name != "train" and not len(loaded[name][0]):
            raise UserError(empty_split(folder, name, "decodable images"))
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


def empty_split(folder: Path, name: str, what: str) -> str:
    """The sentence for a val/ or test/ folder with nothing in it to score: an error, as an empty validation set is
    in Keras or Lightning (it scored nan, or was silently left out)."""
    instead = "hold out data.val_fraction of train/ instead" if name == "val" else "train without a test set"
    return f"{folder} holds no {what}: put some in its class folders, or remove it to {instead}"


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


@dataclass
class Loader:
    """Where training's batches come from: rows of a split's uint8 pool by index, moved to the device, framed
    (data.augment), normalised, un-warped by the router (model.router, once trained)."""

    split: Split
    mean: torch.Tensor
    std: torch.Tensor
    batch_size: int
    n_classes: int
    device: torch.device
    world: dist.World = dist.SINGLE  # under torchrun, this process takes its share of every batch
    class_weights: torch.Tensor | None = None  # each class's weight in the training cost (optim.class_weights)
    augment: Augment | None = None  # data.augment: each image framed afresh at every step (when enabled)
    router: torch.nn.Module | None = None  # model.router, once trained: each picture un-warped before the classifier

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def images_in(self, start: int, stop: int) -> int:
        """The images of an epoch's batches [start, stop), every process's share."""
        return min(stop * self.batch_size, len(self.split)) - min(start * self.batch_size, len(self.split))

    def images(self, rows: torch.Tensor, framings: torch.Tensor | None = None) -> torch.Tensor:
        """These rows of the pool, on the device, framed by their rows of augment.draw (if any), normalised."""
        x = self.split.images[rows].to(self.device, non_blocking=True)
        if framings is not None:  # framed on the device, from uint8 there: floats 0..255
            x = augment.apply(x, framings, self.augment.border)
        x = normalise(x, self.mean, self.std)
        if self.router is not None:  # found, then judged: the classifier learns from the pictures the router un-warps
            with torch.no_grad():
                x = self.router(x)
        return x

    def framings(self, n: int, generator: torch.Generator, epoch: int) -> torch.Tensor | None:
        """The framing of each of an epoch's n images, in the epoch's order (None: not augmented).  Drawn for the
        whole batches in every process, from the batch order's generator, so each process takes its own rows."""
        a = self.augment
        return augment.draw(a, n, generator, augment.strength(a, epoch)) if a is not None and a.enabled else None

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, labels) at these positions of the split, on the device."""
        x = self.images(self.split.index[positions])
        return x, self.split.labels[positions].to(self.device, non_blocking=True)


def clamp_batch_size(batch_size: int | None, n: int) -> int:
    """optim.batch_size, or the whole training set for null or anything larger (with a warning)."""
    if batch_size is not None and batch_size > n:
        message = (
            f"optim.batch_size {batch_size} is larger than the {n} training images; using full-batch gradient descent"
        )
        warnings.warn(message, stacklevel=4)
    return min(batch_size or n, n)
