"""Shared fixtures: real ImageFolder trees of real JPEG files, drawn by hotdog_torch.synth."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import gc
import os
import random
import signal
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hotdog_torch import config, runtime, synth


def pytest_collection_finish(session):
    gc.freeze()  # what the test modules imported (torch: 190,000 objects) lives to the end: not walked (cli.run)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="session")
def no_home_cache(tmp_path_factory):
    """No test, nor a process it starts, writes the real ~/.cache: the default decode cache is the session's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


def once(tmp_path_factory, name: str, make) -> Path:
    """The session's folder `name`, filled by make(folder) once.  Under pytest-xdist (make test: a process a core)
    each process has fixtures of its own: the first to ask makes the folder where they all look, holding a lock
    the others wait on, and they all read it (a make that failed fails them too, with its error)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each process's own
    made, failed = Path(f"{folder}.made"), Path(f"{folder}.failed")
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # not twice: a torchrun launch that failed takes minutes
            raise RuntimeError(f"another test process failed to make {name}: {failed.read_text()}")
        if not made.exists():
            folder.mkdir()
            try:
                make(folder)
            except BaseException as e:
                failed.write_text(repr(e)[-2000:])
                raise
            made.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """train/{hot_dog,not_hot_dog} (30 + 60) and test/ (10 + 20) of 32x32 JPEGs."""
    counts = dict(hot_dogs=30, others=60, test_hot_dogs=10, test_others=20, size=32, seed=1, workers=1)
    return once(tmp_path_factory, "tiny", lambda f: synth.generate(f / "hotdog", progress=False, **counts)) / "hotdog"


@pytest.fixture
def make_config(tmp_path):
    """make_config(root, "optim.lr=0.1", ...): a config for seconds of CPU training, writing under tmp_path."""

    def make(root, *overrides) -> config.Config:
        return config.from_dict(tiny_doc(root, tmp_path), list(overrides))

    return make


def config_file(tree, tmp_path, name, **changes):
    """A YAML config file of tiny_doc, the run named `name`, with changes given as section__key=value."""
    import yaml

    doc = tiny_doc(tree, tmp_path)
    doc["log"]["run_name"] = name
    for key, value in changes.items():
        section, field = key.split("__")
        doc[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_doc(root, tmp_path) -> dict:
    return {
        "data": {
            "root": str(root),
            "generate": False,
            "image_size": 32,
            "channels": 1,
            "cache_dir": str(tmp_path / "cache"),
            "workers": 1,
        },
        "model": {"hidden": [16], "activation": "sigmoid"},
        "optim": {"lr": 0.5, "batch_size": 16, "momentum": 0.9},
        "train": {"epochs": 3, "target_accuracy": None, "precision": "fp32"},  # pinned: auto is bf16 on some CPUs
        "log": {"dir": str(tmp_path / "runs"), "run_name": "tiny"},
        "device": "cpu",
    }


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """300 training (100 hot dogs) and 60 test 32x32 JPEGs: enough for a tiny run to learn."""
    counts = dict(hot_dogs=100, others=200, test_hot_dogs=20, test_others=40, size=32, seed=3, workers=1)
    return once(tmp_path_factory, "small", lambda f: synth.generate(f / "hotdog", progress=False, **counts)) / "hotdog"


@pytest.fixture(scope="session")
def reduced_tree(tmp_path_factory):
    """1800 training images (300 hot dogs) of 64x64: enough for a network that learns the classes well."""
    counts = dict(hot_dogs=300, others=1500, test_hot_dogs=0, test_others=0, size=64, seed=5)
    return (
        once(tmp_path_factory, "reduced", lambda f: synth.generate(f / "hotdog", progress=False, **counts)) / "hotdog"
    )


@pytest.fixture(scope="session")
def drawn_set(tmp_path_factory):
    """The seed's synthetic set (7200 images of 128x128: ~14 s), drawn once for the tests of drawing a missing set:
    asked for on the command line (data.generate=true) in a folder where it is missing, for a run at 16x16.
    Returns (the folder the run named, its folder's parent, the prepared dataset, what was printed)."""
    import contextlib
    import io

    from hotdog_torch import data

    def settings(tmp):
        at = [f"data.root={tmp}/hotdog-synth", "data.generate=true", "data.image_size=16", f"data.cache_dir={tmp}/c"]
        return config.load(None, at)

    def draw(tmp):
        cfg = settings(tmp)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            made["ds"] = data.prepare(cfg.data, cfg.seed, progress=False)
        (tmp / "printed.txt").write_text(printed.getvalue())

    made = {}
    tmp = once(tmp_path_factory, "drawn", draw)
    cfg = settings(tmp)  # another process drew it: the set from its folder and cache
    ds = made.get("ds") or data.prepare(cfg.data, cfg.seed, progress=False)
    return tmp / "hotdog-synth", tmp, ds, (tmp / "printed.txt").read_text()


@pytest.fixture(scope="session")
def trained(small_tree, tmp_path_factory):
    """(run folder, metrics) of a run on small_tree that learnt (90% validation accuracy), shared by the tests of
    what uses a trained network: evaluate, predict, serve, export."""
    import json

    from hotdog_torch import train

    tmp = tmp_path_factory.mktemp("trained")
    doc = tiny_doc(small_tree, tmp)
    doc["train"].update(epochs=60, target_accuracy=0.9)
    doc["model"]["hidden"] = [32]
    doc["optim"]["lr"] = 0.2
    run_dir = train.run(config.from_dict(doc), progress=False)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


class Hung(BaseException):
    """A call of in_process that ran past its limit (a BaseException: no `except Exception` of a command swallows
    it as one of its own failures)."""


def _hung(limit):
    def handler(signum, frame):
        faulthandler.dump_traceback(all_threads=True)  # where it hung, every thread
        raise Hung(f"the command ran past {limit} s, as a process's timeout")

    return handler


@contextlib.contextmanager
def random_state_kept():
    """torch's CPU generator, numpy's and Python's global ones, and CUDA's: put back as they were.  CUDA's are forked
    where CUDA was initialised before the call; a call that initialises it leaves each device's generator seeded
    afresh, as a process that has not used CUDA finds it (c10's default seed).  A seed queued for CUDA's start
    (torch.manual_seed before CUDA is initialised) stays queued, in torch's own bookkeeping, and applies when a later
    test starts CUDA."""
    cuda = torch.cuda.is_initialized()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
            if not cuda and torch.cuda.is_initialized():
                for generator in torch.cuda.default_generators:
                    generator.manual_seed(FRESH_CUDA_SEED)


FRESH_CUDA_SEED = 67280421310721  # c10's default_rng_seed_val: a CUDA generator's seed before anything seeds it


def in_process(main, args: list[str], capfd, limit: float = 300) -> subprocess.CompletedProcess:
    """`python -m hotdog_torch.<command> ARGS` through the command's main(ARGS) in this process (a start-up of torch
    less, ~3.5 s of CPU): its exit code, stdout and stderr, as subprocess.run gives them, from the repository's
    folder.  capfd (pytest's): what the process's file descriptors got, its forked decode workers' too.  An argparse
    mistake's SystemExit is its exit code.  A call past `limit` seconds (a process's timeout) raises Hung after
    every thread's traceback, failing its test alone; the alarm that raises it runs between Python's bytecodes, so a
    call stuck inside one C call that never returns is ended with the test process, by faulthandler, a minute
    later.  What a command changes in its process is put back for the tests after it: every random generator
    (random_state_kept: a run seeds them), the intra-op threads and subnormal flushing (a run; evaluate and predict
    flush as trained), and warnings.showwarning (train's one-line warnings)."""
    capfd.readouterr()  # the command's output alone, as its process had it
    showwarning, cwd = warnings.showwarning, os.getcwd()
    alarm = signal.signal(signal.SIGALRM, _hung(limit))  # tests run in the main thread, under xdist too
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    try:
        os.chdir(Path(__file__).resolve().parents[1])  # contextlib.chdir: Python 3.11 on
        with random_state_kept():
            code = runtime.keeps_float_mode(main)(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        faulthandler.cancel_dump_traceback_later()
        warnings.showwarning = showwarning
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, *capfd.readouterr())


# ---------------------------------------------------------------- torchrun runs, trained in one launch a session

# A launch of torchrun costs ~8 s before its first step (the launcher and each worker import torch), a run on
# small_tree about one: so the runs that tests compare or read are trained in the session's one launch, by a worker
# that runs the training command's main() once a job, in both processes.  Each job joins and leaves a process group
# of its own: its stdout is kept per rank, with its exit code and whether it left the group (it must).
JOBS = """
import contextlib, gc, json, os, sys
import torch.distributed as td
from hotdog_torch import train
gc.freeze()  # as the command does (cli.run)
jobs, out, rank, prefix = json.loads(open(sys.argv[1]).read()), sys.argv[2], os.environ["RANK"], td.PrefixStore
for i, (name, args) in enumerate(jobs):
    # a store prefix a job: the addresses of the job before are still in torchrun's store, under the same keys
    td.PrefixStore = lambda p, store, i=i: prefix(f"job{i}/{p}", store)
    with open(f"{out}/{name}.{rank}", "w") as f, contextlib.redirect_stdout(f):
        code = train.main(["--no-progress", *args])
    with open(f"{out}/{name}.{rank}.exit", "w") as f:
        f.write(f"{code} {td.is_initialized()}")
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "torchrun(name, *overrides, one=True, then=None, **settings): a run of config_file(small_tree, ..., "
        "**settings) trained in the session's one torchrun launch (fixture torchrun_runs); one: by one process "
        "as well; then: the arguments of a --resume of it, in the same launch, after every run",
    )


class Launched:
    """The runs of one torchrun mark: two (torchrun's two processes), one (a process alone, or None), out (what
    both ranks printed), resumed (what the --resume of `then` printed)."""

    def __init__(self, folder, name, one):
        self.folder, self.name = folder, name
        self.two = folder / name / "runs" / "two"
        self.one = folder / name / "runs" / "one" if one else None

    def printed(self, job):
        """What both ranks of a job printed, once each says it ended with exit code 0 and left its process group."""
        stderr = (self.folder / "stderr").read_text()[-3000:]
        assert [(self.folder / "out" / f"{job}.{r}.exit").read_text() for r in (0, 1)] == ["0 False"] * 2, stderr
        return "".join((self.folder / "out" / f"{job}.{r}").read_text() for r in (0, 1))

    @property
    def out(self):
        return self.printed(self.name)

    @property
    def resumed(self):
        return self.printed(f"{self.name}.resumed")


@pytest.fixture(scope="session")
def torchrun_runs(request, small_tree, tmp_path_factory) -> dict[str, Launched]:
    """{name: Launched} of every @pytest.mark.torchrun of the collected tests, trained in one torchrun launch."""
    marks = {m.args[0]: m for item in request.session.items for m in item.iter_markers("torchrun")}
    folder = once(tmp_path_factory, "torchrun", lambda folder: train_all(folder, marks, small_tree))
    return {name: Launched(folder, name, mark.kwargs.get("one", True)) for name, mark in marks.items()}


def train_all(folder: Path, marks: dict, tree: Path) -> None:
    """Each mark's run by two processes in one torchrun launch (and by one, in this process), then the resumes."""
    from hotdog_torch import train

    jobs, then = [], []
    for name, mark in marks.items():
        (folder / name).mkdir()
        settings = {"data__cache_dir": str(folder / "cache")} | mark.kwargs
        one, resume = settings.pop("one", True), settings.pop("then", None)
        two = config_file(tree, folder / name, "two", **settings)
        jobs.append((name, ["--config", str(two), *mark.args[1:]]))
        if one:  # in this process: what it takes is the run, not a start-up
            one = config_file(tree, folder / name, "one", **settings)
            assert train.main(["--no-progress", "--config", str(one)]) == 0
        if resume is not None:  # after every run: the processes have trained others since this one
            then.append((f"{name}.resumed", ["--resume", str(Launched(folder, name, one).two), *resume]))
    launch(folder, jobs + then)


def launch(folder: Path, jobs: list) -> None:
    """The jobs, in turn, in one launch of torchrun with two processes on the CPU."""
    import json
    import subprocess
    import sys

    (folder / "jobs.json").write_text(json.dumps(jobs))
    (folder / "out").mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python"]
    command = [*launcher, sys.executable, "-c", JOBS, str(folder / "jobs.json"), str(folder / "out")]
    with open(folder / "stderr", "w") as err:
        repo = Path(__file__).resolve().parents[1]
        done = subprocess.run(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=err, timeout=600)
    assert done.returncode == 0, (folder / "stderr").read_text()[-4000:]
