"""Processes that share a decode cache or a data folder: real processes started together, and one killed
mid-decode.  One of them draws or decodes, the others wait and reuse what it made; nothing temporary is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import config_file

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
