"""The run's files: atomic writes (a reader sees the old file or the new one, never half of one), the lock on a
file and the worker processes that write one, the run folder."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

from . import config
from .config import Config, UserError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(binary_file) on a temporary file beside `path`, fsync it, rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def locked(path: str | os.PathLike, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing), printing `waiting` if another process has it.

    A POSIX lock (fcntl.lockf): it belongs to this process alone, so the processes it forks (worker_pool) do not
    hold it too, and the kernel drops it when this process exits, however it dies (SIGKILL too): a lock is never
    left stale, and whatever temporary files its holder writes are stale once another process has it.  (Not flock:
    its lock belongs to the open file, shared by every fork, so orphaned workers of a killed holder would keep it.)
    It excludes other processes, not this one's threads; closing any descriptor of the file here releases it.
    The lock file may be removed by its holder (unlocked_or_none): a waiter then locks the file now at `path`.
    """
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            if not said:
                print(waiting, file=sys.stderr, flush=True)
                said = True
            fcntl.lockf(fd, fcntl.LOCK_EX)
        if _still_at(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def unlocked_or_none(path: str | os.PathLike) -> Iterator[bool]:
    """The lock of `locked`, taken only if no other process holds it: yields whether it was.  Holding it, the
    holder may remove the lock file (its waiters then lock the file made afresh at `path`)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = _still_at(fd, path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            got = False
        yield got
    finally:
        os.close(fd)


def _still_at(fd: int, path) -> bool:
    """Whether the file open as fd is still the one at path (not removed, nor replaced, while its lock was awaited)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def exit_with(parent: int) -> None:
    """End this process when process `parent`, its parent, is gone, however it died (SIGKILL, the OOM killer): a
    thread that looks ten times a second whether it still is the parent (an orphan passes to init or a reaper)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Processes forked to write files, while this one holds their lock: none holds the lock (locked), and none
    outlives this process (exit_with), so that a command stopped any way takes its workers with it.  They ignore
    SIGINT: a terminal's Ctrl-C reaches the whole process group, and this process, their parent, handles it (each
    worker printed its KeyboardInterrupt's traceback); its caller ends the pool with cancel_futures."""
    fork = multiprocessing.get_context("fork")  # the workers' parent is this process (not a forkserver)
    pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_worker, initargs=(os.getpid(),))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C between fork and _worker waits
    try:
        pool.submit(int).result()  # the fork context forks every worker at the first job: now, SIGINT blocked
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C that came meanwhile reaches this process now
    return pool


def _worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending since the fork is ignored
    exit_with(parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """path, a file a command writes once its work is done, checked before the work: not a folder, in a folder that
    exists and takes a file (a temporary one, made and removed: a read-only disk refuses it, to root too)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; name a file")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {option} {path}: the folder {path.parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror})") from None
    return path


def make_run_dir(log_dir: str, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ...: an existing run is never overwritten.  A name may nest (exp/one:
    runs/exp/one, as TensorBoard's loggers allow), inside log.dir."""
    base, parts = Path(log_dir), Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise UserError(f"log.run_name {name!r} must be a folder name inside log.dir, such as exp/one")
    try:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        for k in range(1, 10_000):
            path = base / (name if k == 1 else f"{name}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(
            f"cannot make the run folder {base / name} ({e.strerror}): choose a log.dir you can write"
        ) from None
    raise UserError(f"{base} already holds 10,000 runs named {name}")


def open_run_dir(cfg: Config, config_name: str, ds, device) -> Path:
    """A new runs/<name> with its checkpoints/; config.yaml is written once the run's checks have passed."""
    run_dir = make_run_dir(cfg.log.dir, cfg.log.run_name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    (run_dir / "checkpoints").mkdir()
    announce(run_dir, ds, device)
    return run_dir


def announce(run_dir: Path, ds, device) -> None:
    test = f", {len(ds.test)} test" if ds.test else ""
    images = f"{len(ds.train)} train, {len(ds.val)} val{test} images of {len(ds.classes)} classes"
    print(f"run {run_dir}: {images} on {device}", flush=True)


def write_config(run_dir: Path, cfg: Config) -> None:
    """The run's resolved config.yaml (what --resume reads back)."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
