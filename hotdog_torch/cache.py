"""The decode-once cache, without torch: the ImageFolder scan, the key of a folder's decode, and the entry itself.

An entry is one .npy of every image of a folder, decoded, resized and converted to uint8 (N, C, S, S), and a .json
that marks it complete, under a key made of the image settings and every file's path, class, size and mtime, so a
changed, added or removed file means a fresh decode.  Nothing here imports torch (2 s of start-up here), so that
`python -m hotdog_torch.train` can start decoding in processes of its own while torch loads (prefetch);
data.load_folder then finds the entry complete, or waits on its lock for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import cli, config
from .config import Data, UserError
from .files import atomic_write, exit_with, locked, unlocked_or_none, worker_pool
from .images import DECODE_ERRORS, IMG_EXTENSIONS, decode

CACHE_VERSION = 2  # 2: EXIF orientation applied
SPLITS = ("train", "val", "test")
_PREFETCH: list = []  # this process's prefetching process, once started


_FILES: dict[str, int] = {}  # per process: the cache file being written, opened once


def decode_block(job) -> list[int]:
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


def cache_root(data: Data) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hotdog_torch"


def cache_key(samples, data: Data) -> str:
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


def scan(folder: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
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


def decode_all(samples, data: Data, out_file: Path, offset: int, progress: bool, desc: str) -> set[int]:
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
            results = map(decode_block, jobs)
        else:
            pool = worker_pool(workers)
            results = pool.map(decode_block, jobs)
        for job, rows in zip(jobs, results, strict=True):
            bad.update(rows)
            bar.update(len(job[0]))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown(cancel_futures=True)  # Ctrl-C: the blocks at work end, the others are not started
        fd = _FILES.pop(str(out_file), None)
        if fd is not None:
            os.close(fd)
    return bad


def build_entry(folder: Path, samples, classes, data: Data, images_file: Path, meta_file: Path, progress: bool):
    """Decode into a temporary .npy, fsync, rename into place; then the .json that marks the entry complete.
    Called holding the entry's lock: any temporary file of this entry is a killed process's."""
    shape = (len(samples), data.channels, data.image_size, data.image_size)
    for stale in _temporaries(images_file.parent, images_file.stem):  # of a process killed building this entry
        stale.unlink()
    tmp = images_file.with_name(f".{images_file.name}.{os.getpid()}.tmp")
    try:
        empty = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)  # header + room for every row
        offset = empty.offset
        del empty
        bad = decode_all(samples, data, tmp, offset, progress, f"decoding {folder}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, images_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    rows = [i for i in range(len(samples)) if i not in bad]
    meta = dict(
        version=CACHE_VERSION,
        folder=os.path.abspath(folder),  # whose entry it is: a newer one of the folder evicts it (tidy)
        shape=list(shape),
        classes=classes,
        rows=rows,
        labels=[samples[i][1] for i in rows],
        paths=[samples[i][0] for i in rows],
        skipped=[samples[i][0] for i in sorted(bad)],
    )
    atomic_write(meta_file, lambda f: f.write(json.dumps(meta).encode()))


# ---------------------------------------------------------------- what the cache removes, and only that

_ENTRY = re.compile(r"([0-9a-f]{32})\.(npy|json|lock)")  # the cache's own names: an entry's files and its lock
_TEMPORARY = re.compile(r"\.([0-9a-f]{32})\.(npy|json)\.[0-9]+\.tmp")  # build_entry's, atomic_write's


def _temporaries(root: Path, key: str) -> list[Path]:
    return [p for p in root.glob(f".{key}.*.tmp") if _TEMPORARY.fullmatch(p.name) and p.is_file()]


def tidy(root: Path, key: str, folder: Path, data: Data) -> None:
    """After entry `key` of folder is written: every other entry's temporaries, where no process holds that
    entry's lock (only its holder writes them: they are a killed process's), and the folder's older entries at the
    same image settings (its files have changed since: never read again), with their locks.  Nothing is removed but
    files named as the cache names its own, and an entry only when its .json says it is the folder's; an entry
    some process holds (decoding, or waiting for it) is left for a later tidy."""
    keys = {m[1] for n in os.listdir(root) if (m := _ENTRY.fullmatch(n) or _TEMPORARY.fullmatch(n))} - {key}
    for other in sorted(keys):
        lock, meta_file, images_file = (root / f"{other}.{end}" for end in ("lock", "json", "npy"))
        older = _is_older(meta_file, folder, data)
        bare = lock.is_file() and not meta_file.exists() and not images_file.exists()  # a lock of no entry
        if not (older or bare or _temporaries(root, other)):
            continue
        with unlocked_or_none(lock) as ours:
            if not ours:
                continue
            for path in ([meta_file, images_file] if older else []) + _temporaries(root, other):  # .json first
                path.unlink(missing_ok=True)
            if not meta_file.exists() and not images_file.exists():
                lock.unlink(missing_ok=True)  # held: its waiters lock the one made afresh (files.locked)


def _is_older(meta_file: Path, folder: Path, data: Data) -> bool:
    """Whether meta_file marks a complete entry of folder at data's image settings (then, not the new one: older)."""
    try:
        meta = json.loads(meta_file.read_text())
        made = [meta.get("version"), meta.get("folder"), meta["shape"][1:]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False  # not an entry's: left alone
    return made == [CACHE_VERSION, os.path.abspath(folder), [data.channels, data.image_size, data.image_size]]


def read_entry(images_file: Path, meta_file: Path, classes, in_memory: bool):
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


def entry(folder: Path, data: Data, progress: bool = True, scanned=None, in_memory: bool = True):
    """(classes, pool, meta) of folder's complete cache entry, decoding it first unless it is there; pool is a numpy
    array, memory-mapped from the file unless in_memory.  Of processes asking at once, one decodes (the lock)."""
    classes, samples = scanned or scan(folder)
    key = cache_key(samples, data)
    root = cache_root(data)
    images_file, meta_file = root / f"{key}.npy", root / f"{key}.json"
    found = read_entry(images_file, meta_file, classes, in_memory)
    if found is None:
        writable(root, root / f"{key}.lock")
        with locked(root / f"{key}.lock", _waiting(folder, root)):
            found = read_entry(images_file, meta_file, classes, in_memory)  # it decoded while this one waited
            if found is None:
                build_entry(folder, samples, classes, data, images_file, meta_file, progress)
                tidy(root, key, folder, data)
                found = read_entry(images_file, meta_file, classes, in_memory)
        if found is None:
            raise OSError(f"the decode cache entry {images_file} could not be read back after writing it")
    return classes, *found


def writable(root: Path, lock: Path) -> None:
    """Refuse, before any decode, a cache folder that cannot be made or written in: its entry's lock file is the
    first thing written there (a folder of complete entries is read, written or not)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the decode cache folder {root} ({e.strerror}); set data.cache_dir to a writable folder"
        ) from None
    try:
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise UserError(
            f"cannot write in the decode cache folder {root} ({e.strerror}); set data.cache_dir to a writable folder"
        ) from None


def _waiting(folder, root) -> str:
    if _PREFETCH:
        return f"decoding {folder} (started with the command, while torch loaded)"
    return f"waiting for another process decoding {folder} into {root}"


def folders(data: Data) -> dict[str, Path]:
    """The image folders of data.root: its train/, val/, test/ splits, or the root itself as the training folder."""
    root = Path(data.root)
    return {s: root / s for s in SPLITS if (root / s).is_dir()} if (root / "train").is_dir() else {"train": root}


def prefetch(argv: list[str]):
    """For the command `python -m hotdog_torch.train ARGV`, before it imports torch: start decoding the folders its
    run will load, in a process of its own that ends with the command, however it ends; None when there is nothing
    to start.  A mistake in the arguments is left for the command itself to report, and under torchrun rank 0
    decodes first anyway."""
    try:
        args = cli.command_line(argv, quiet=True)  # read as the command reads them (--config=FILE, --conf FILE)
        cfg = config.load_run(args.config, args.resume, args.overrides)
    except (UserError, OSError):
        return None
    cuda = cfg.device.startswith("cuda")  # maybe absent: the command's first check, before any data
    if "RANK" in os.environ or cuda or not Path(cfg.data.root).is_dir():
        return None
    # a new interpreter, not a fork: this runs while the package is being imported (its import locks are held);
    # in a session of its own, out of the terminal's reach: it ends when the command does (exit_with)
    code = "import sys; from hotdog_torch import cache; cache.prefetched(int(sys.argv[1]), sys.argv[2])"
    d = cfg.data  # what the cache reads of it
    keys = dict(root=d.root, image_size=d.image_size, channels=d.channels, cache_dir=d.cache_dir, workers=d.workers)
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command = [sys.executable, "-c", code, str(os.getpid()), json.dumps(keys)]
    process = subprocess.Popen(command, start_new_session=True, **quiet)
    _PREFETCH.append(process)
    return process


def prefetched(command: int, keys: str) -> None:
    """The prefetching process: every folder of the run into the cache, for as long as its command lives."""
    exit_with(command)
    decode_folders(Data(**json.loads(keys)))


def decode_folders(data: Data) -> None:
    """Every folder of data.root into the cache; an entry already complete is left on disk (its header read)."""
    for folder in folders(data).values():
        try:
            entry(folder, data, progress=False, in_memory=False)
        except (UserError, OSError):
            return  # the run finds the same fault, and says it
