"""Processes that share a decode cache or a data folder: real processes started together, and one killed
mid-decode.  One of them draws or decodes, the others wait and reuse what it made; nothing temporary is left."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import config_file
from PIL import Image

from hotdog_torch import config, data

REPO = Path(__file__).resolve().parents[1]

# A training process whose drawing and decoding are slowed (so two processes overlap in them) and noted in a log.
# The synthetic set is drawn small: the seed's 7200 images would take minutes on two cores.
SLOWED = """
import functools, os, sys, time
from hotdog_torch import cache, synth, train
log, pause = sys.argv[1], float(sys.argv[2])

def note(what, real):
    def noted(*a, **k):
        with open(log, "a") as f:
            f.write(f"{what} {os.getpid()}\\n")
        time.sleep(pause)
        return real(*a, **k)
    return noted

small = functools.partial(synth.generate, hot_dogs=12, others=12, test_hot_dogs=4, test_others=4, size=32, workers=1)
synth.generate = note("draw", small)
cache.decode_all = note("decode", cache.decode_all)
sys.exit(train.main(sys.argv[3:]))
"""


def start(log: Path, pause: float, *args) -> subprocess.Popen:
    command = [sys.executable, "-c", SLOWED, str(log), str(pause), "--no-progress", *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if p.name.endswith(".tmp") or ".drawing-" in p.name]


def test_two_first_runs_at_once_draw_the_set_once_and_decode_it_once(tmp_path):
    root, log = tmp_path / "data" / "synth", tmp_path / "log"
    runs = []
    for name in ("a", "b"):
        cfg = config_file(root, tmp_path, name, train__epochs=1)
        runs.append(start(log, 1.0, "--config", str(cfg), "data.generate=true"))
    for p in runs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    events = log.read_text().split()[::2]
    assert events.count("draw") == 1 and events.count("decode") == 2  # train/ and test/, once each
    cache = tmp_path / "cache"
    assert len(list(cache.glob("*.npy"))) == 2 and not leftovers(cache, root.parent)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) == ["a", "b"]


def test_a_decode_killed_midway_leaves_nothing_behind(tiny_tree, tmp_path):
    cfg = config_file(tiny_tree, tmp_path, "killed", train__epochs=1)
    cache, log = tmp_path / "cache", tmp_path / "log"
    victim = start(log, 30.0, "--config", str(cfg))
    deadline = time.time() + 60
    while not list(cache.glob(".*.tmp")):  # the decode has begun: its temporary file is there
        assert victim.poll() is None and time.time() < deadline, victim.communicate()
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert leftovers(cache)  # what a killed decode leaves
    again = start(log, 0.0, "--config", str(config_file(tiny_tree, tmp_path, "again", train__epochs=1)))
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-3000:]
    assert not leftovers(cache) and len(list(cache.glob("*.npy"))) == 2


def test_a_killed_decodes_temporary_goes_once_no_process_holds_its_lock(tiny_tree, tmp_path):
    """A decode killed, then its folder changed: the next run decodes under another key, and the killed one's
    temporary (a whole decoded folder) was left for ever.  Under an entry's lock its temporaries are a dead
    process's: the next entry written takes them away, and leaves a decoding process's own alone."""
    tree, cache, log = tmp_path / "tree", tmp_path / "cache", tmp_path / "log"
    shutil.copytree(tiny_tree, tree)
    d = config.Data(root=str(tree), image_size=32, channels=1, cache_dir=str(cache), workers=1)  # config_file's
    victim = start(log, 30.0, "--config", str(config_file(tree, tmp_path, "killed", train__epochs=1)))
    try:
        deadline = time.time() + 60
        while not list(cache.glob(".*.tmp")):  # the decode has begun: its temporary file is there
            assert victim.poll() is None and time.time() < deadline, victim.communicate()
            time.sleep(0.05)
        decoding = leftovers(cache)
        data.load_folder(tiny_tree / "test", d, progress=False)  # an entry written while the victim decodes
        assert leftovers(cache) == decoding  # a live process's: kept
    finally:
        victim.kill()
        victim.communicate()
    (tree / "train" / "hot_dog" / "hot_dog_00000.jpg").unlink()  # another key for train/
    data.load_folder(tree / "train", d, progress=False)
    assert not leftovers(cache)


# ---------------------------------------------------------------- a command stopped while its pool decodes

MARK = "HOTDOG_TEST_COMMAND"  # in the environment of a command started here, and so of every process it starts
MODULE = ["-m", "hotdog_torch.train"]  # the prefetch decodes, in a process of its own, with its pool
MAIN = ["-c", "import sys; from hotdog_torch import train; sys.exit(train.main())"]  # no prefetch: the run's pool


def marked(token: str) -> dict[int, int]:
    """{pid: parent pid} of the live processes whose environment carries MARK=token (Linux's /proc)."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARK}={token}".encode() in environ.read_bytes().split(b"\0"):
                stat = (environ.parent / "stat").read_text()
                found[int(environ.parent.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or a zombie
    return found


def survivors(token: str, seconds: float) -> dict[int, str]:
    """{pid: command line} of the processes still marked token after waiting up to seconds for them to go."""
    deadline = time.time() + seconds
    while marked(token) and time.time() < deadline:
        time.sleep(0.05)
    found = {}
    for pid in marked(token):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()[:100].decode(errors="replace")
        except OSError:
            pass
    return found


def kill_marked(token: str) -> None:
    for pid in marked(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def command(tmp_path: Path, start: list[str], name: str, tree: Path) -> subprocess.Popen:
    """The training command on tree, 2 decoding workers, in a session of its own as a terminal starts it; its
    processes marked name, its stderr in tmp_path/name.err (a file: a pipe would wait for every process holding it)."""
    cfg = config_file(tree, tmp_path, name, train__epochs=1, data__workers=2)
    env = {**os.environ, MARK: str(tmp_path / name)}  # unique: another test or session marks others
    with open(tmp_path / f"{name}.err", "w") as err:
        command = [sys.executable, *start, "--config", str(cfg), "--no-progress"]
        return subprocess.Popen(
            command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err
        )


def finishes(tmp_path: Path, p: subprocess.Popen, name: str, seconds: float) -> None:
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} still running after {seconds} s: {survivors(str(tmp_path / name), 0)}") from None
    assert p.returncode == 0, (tmp_path / f"{name}.err").read_text()[-3000:]


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory):
    """train/{hot_dog,not_hot_dog} of 200 PNG files each, 1024x1024: 5 KB on disk but 13 ms to decode (Pillow has
    no draft mode for PNG), so that two workers take seconds over them."""
    side = np.arange(1024)
    x = (np.add.outer(side, side) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x, x.T, x], -1)).save(buffer, "PNG")
    root = tmp_path_factory.mktemp("slow") / "hotdog"
    for cls in ("hot_dog", "not_hot_dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(200):
            (root / "train" / cls / f"{i}.png").write_bytes(buffer.getvalue())
    return root


def decoding(p: subprocess.Popen, token: str, cache: Path) -> int:
    """Wait until the process decoding the entry (the prefetch, or else the command) has its two workers at work;
    return its pid."""
    deadline = time.time() + 60
    while True:
        assert p.poll() is None and time.time() < deadline, f"no decode seen: {p.poll()}"
        parents = list(marked(token).values())
        holders = [pid for pid in parents if parents.count(pid) == 2]  # the prefetch has one child, a decoder two
        if holders and list(cache.glob(".*.tmp")):
            return holders[0]
        time.sleep(0.02)


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")


@needs_proc
@pytest.mark.parametrize(
    "start, how",
    [(MODULE, "SIGKILL"), (MODULE, "SIGTERM"), (MODULE, "Ctrl-C"), (MAIN, "SIGKILL"), (MAIN, "Ctrl-C")],
    ids=["prefetch-SIGKILL", "prefetch-SIGTERM", "prefetch-Ctrl-C", "own-pool-SIGKILL", "own-pool-Ctrl-C"],
)
def test_a_command_stopped_while_it_decodes_takes_every_process_with_it(slow_tree, tmp_path, start, how):
    """Whatever stops the command, none of the processes it started goes on, and the next run on that cache
    (a killed one's workers held the entry's lock: it waited forever) decodes it and trains."""
    p, token = command(tmp_path, start, "stopped", slow_tree), str(tmp_path / "stopped")
    try:
        decoding(p, token, tmp_path / "cache")
        if how == "Ctrl-C":
            os.killpg(p.pid, signal.SIGINT)  # as a terminal does: to the foreground process group
        else:
            os.kill(p.pid, getattr(signal, how))
        p.wait(timeout=30)
        left = survivors(token, 1)
        assert not left, f"left running after {how}: {left}"
    finally:
        kill_marked(token)
    if how == "Ctrl-C":  # one line, not a traceback of every worker the command forked
        said = (tmp_path / "stopped.err").read_text()
        assert p.returncode == 130 and "Traceback" not in said and len(said.strip().splitlines()) == 1, said[-3000:]
    again = command(tmp_path, MODULE, "again", slow_tree)
    try:
        finishes(tmp_path, again, "again", 120)
    finally:
        kill_marked(str(tmp_path / "again"))
    assert not leftovers(tmp_path / "cache")


@needs_proc
def test_a_decoding_process_killed_leaves_no_lock_held(slow_tree, tmp_path):
    """The OOM killer takes the prefetch (the entry's lock holder) while its workers decode: they go with it, and
    the command, waiting on the lock, decodes by itself and trains."""
    p, token = command(tmp_path, MODULE, "oom", slow_tree), str(tmp_path / "oom")
    try:
        os.kill(decoding(p, token, tmp_path / "cache"), signal.SIGKILL)
        finishes(tmp_path, p, "oom", 120)
        left = survivors(token, 1)
        assert not left, f"left running: {left}"
    finally:
        kill_marked(token)


# ---------------------------------------------------------------- Ctrl-C while the command draws the set


@pytest.mark.parametrize("drawn_by", ["train", "synth"])
def test_ctrl_c_while_the_set_is_drawn_says_one_line_not_the_workers_tracebacks(tmp_path, drawn_by):
    """The first `make run` draws the synthetic set (data.generate) on a pool of processes: a Ctrl-C in the terminal
    reaches all of them, and each printed its KeyboardInterrupt's traceback."""
    if drawn_by == "train":
        cfg = config_file(tmp_path / "data" / "synth", tmp_path, "first")
        args = ["-m", "hotdog_torch.train", "--config", str(cfg), "data.generate=true", "--no-progress"]
        drawing = tmp_path / "data"
    else:
        args, drawing = ["-m", "hotdog_torch.synth", "--out", str(tmp_path / "drawn")], tmp_path / "drawn"
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.time() + 60
        while not list(drawing.glob("**/*.jpg")):  # the pool draws
            assert p.poll() is None and time.time() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal does: to the foreground process group
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    said = (tmp_path / "err").read_text()
    assert p.returncode == 130 and "Traceback" not in said and len(said.strip().splitlines()) == 1, said[-3000:]
