"""The one owner of a run's folder, as timm's CheckpointSaver owns best, last and the top k: `RunFiles` alone writes
and removes the run's files (checkpoints/last.pt, best.pt, best-<epoch>.pt, config.yaml, metrics.json, their
temporaries, torchrun's note of the run), and removes only files it wrote: a k-best file is removed only when last.pt
records it as the run's, a temporary only when it is one of the run's files' of a process that is gone.

A resume is checked before anything is written: last.pt records what its state depends on (`fingerprint`: the
training folder's images, the split, the batches an epoch, the router phase's length), and `check` compares it with
what the config and the data give now.  A resume goes on exactly, or is refused in one sentence.

    files = RunFiles.new(cfg, name, world, ...)  or  RunFiles(resume_dir, world, resumed)   # after every check
    files.begin(cfg, resumed)          # config.yaml, checkpoints/ mended, stale temporaries, torchrun's note
    files.keep(r, state, m, due)       # last.pt, then best.pt and best-<epoch>.pt, then those pushed out
    files.save_last(r, state, m, progress)                      # an epoch stopped part-way, a router epoch
    files.write_metrics(m); files.end()                         # the run's end
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from pathlib import Path

import torch

from . import checkpoint, dist, files, report
from .config import Config, UserError

TEMPORARY = re.compile(r"^\.(last\.pt|best(-\d+)?\.pt|config\.yaml|metrics\.json)\.(\d+)\.tmp$")  # atomic_write's


def own_files(resumed: dict | None) -> set[str]:
    """The k-best files a resumed run wrote: as its last.pt records them, or, in a last.pt from before that record,
    those of its k best epochs (exactly what it wrote and kept)."""
    if resumed is None:
        return set()
    if resumed.get("run_files") is not None:
        return set(resumed["run_files"].get("files", []))
    return {f"best-{m['epoch']}.pt" for m in (resumed.get("state") or {}).get("top_k", [])}


class RunFiles:
    """The run folder's files, written by rank 0 alone (every rank calls save_last: the rng state is a collective)."""

    def __init__(self, folder, world: dist.World = dist.SINGLE, resumed: dict | None = None, fingerprint=None):
        self.dir, self.world, self.fingerprint = Path(folder), world, fingerprint
        self.kept = own_files(resumed)  # the best-<epoch>.pt it wrote

    @classmethod
    def new(cls, cfg: Config, config_name: str, world: dist.World, fingerprint: dict, ds, device) -> RunFiles:
        """A new runs/<log.run_name> (nested names too: runs/exp/one), made by rank 0, never an existing one."""
        folder = files.open_run_dir(cfg, config_name, ds, device) if world.main else None
        return cls(dist.broadcast(world, folder), world, None, fingerprint)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def begin(self, cfg: Config | None, resumed: dict | None) -> None:
        """Once every check has passed: config.yaml (cfg None: a finished run's stays), checkpoints/ mended to agree
        with last.pt, stale temporaries removed, and under torchrun the note a restart finds the run by."""
        if not self.world.main:
            return
        if cfg is not None:
            files.write_config(self.dir, cfg)
        self.clear_temporaries()
        if resumed is not None:
            self.mend(resumed)
        if cfg is not None:
            dist.note_run(self.world, cfg.log.dir, self.dir)

    def save(self, name: str, r, state: checkpoint.RunState, metrics: dict, progress=None, rng=None) -> None:
        """checkpoints/<name>.pt of the run r (setup.Run) as it is now; last.pt also holds the progress of an epoch
        stopped part-way, the generators, the schedule and the router's phase, the fingerprint and the files kept."""
        if not self.world.main:
            return
        saved = checkpoint.RunState(**state.as_dict())  # the run's state is not changed by saving it
        saved.epoch_progress, saved.rng = checkpoint.on_cpu(progress), rng
        saved.schedule, saved.router = r.schedule.state_dict(), r.phase and r.phase.state()
        extra = {"run_files": {"fingerprint": self.fingerprint, "files": sorted(self.kept)}} if name == "last" else {}
        router = r.phase and r.phase.net
        path = self.checkpoints / f"{name}.pt"
        checkpoint.save(path, r.model, r.step.optimizer, r.meta, metrics, saved, name == "last", router, extra)

    def save_last(self, r, state: checkpoint.RunState, metrics: dict, progress=None) -> None:
        """last.pt; every rank calls it (each rank's generators are gathered), rank 0 writes."""
        rng = checkpoint.rng_state(r.generator, self.world)
        self.save("last", r, state, metrics, progress, rng)

    def keep(self, r, state: checkpoint.RunState, m: dict, due) -> None:
        """An epoch's files (due: stopping.Due): last.pt first, then best.pt and best-<epoch>.pt, then the k-best
        files pushed out; a kill between them leaves a last.pt that begin() mends the others from."""
        names = ["best"] * due.best + [f"best-{m['epoch']}"] * due.entered
        self.kept |= {f"{n}.pt" for n in names if n != "best"}
        if due.last:
            self.save_last(r, state, m)
        for name in names:
            self.save(name, r, state, m)
        for epoch in due.out:
            self.remove(f"best-{epoch}.pt")

    def remove(self, name: str) -> None:
        """A file of checkpoints/ this run wrote (and only such a one)."""
        if self.world.main and name in self.kept:
            (self.checkpoints / name).unlink(missing_ok=True)
            self.kept.discard(name)

    def mend(self, resumed: dict) -> None:
        """Make checkpoints/ agree with the last.pt a run resumes from: best.pt and best-<epoch>.pt of last.pt's epoch
        written from its weights (that epoch's) when a kill came before them; a k-best file last.pt records as the
        run's but no longer keeps removed.  Nothing last.pt does not record is touched."""
        state = resumed["state"]
        if state.get("epoch_progress") is not None:  # saved mid-epoch: nothing pending
            return
        wanted = {"best.pt": state.get("best"), **{f"best-{m['epoch']}.pt": m for m in state.get("top_k", [])}}
        for name, m in wanted.items():
            path = self.checkpoints / name
            due = m is not None and m["epoch"] == state["epoch"]  # last.pt's epoch: last.pt holds its weights
            if due and (not path.is_file() or checkpoint.load(path)["step"] != resumed["step"]):
                buffer = io.BytesIO()
                torch.save(resumed | {"optimizer": None, "state": None, "metrics": m, "run_files": None}, buffer)
                files.atomic_write(path, lambda f, b=buffer: f.write(b.getbuffer()))
        for name in sorted(self.kept - set(wanted)):
            self.remove(name)

    def clear_temporaries(self) -> None:
        """The half-written temporaries of the run's own files that a process killed during a save left."""
        for folder in (self.dir, self.checkpoints):
            for path in folder.glob(".*.tmp"):
                match = TEMPORARY.match(path.name)
                if match and not alive(int(match.group(3))):
                    path.unlink(missing_ok=True)

    def write_metrics(self, m: dict) -> None:
        if self.world.main:
            report.write_metrics(self.dir, m)

    def has_metrics(self) -> bool:
        return (self.dir / "metrics.json").is_file()

    def end(self, log_dir: str) -> None:
        """The run is over: torchrun's note of it has served."""
        dist.note_run(self.world, log_dir)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fingerprint(cfg: Config, ds, batches: int) -> dict:
    """What a run's saved state depends on: the training folder's images (each class's count, and a digest of their
    names and sizes), the split (data.val_fraction or a val/ folder, the seed, a digest of the training split), the
    batches an epoch and the router phase's steps."""
    shared = ds.val.images is ds.train.images  # val/ cut from the training folder
    paths = ds.train.paths + (ds.val.paths if shared else [])
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(f"{Path(p).parent.name}/{Path(p).name}:{size(p)}\n".encode(errors="surrogateescape"))
    split = hashlib.sha256(
        "\n".join(f"{Path(p).parent.name}/{Path(p).name}" for p in ds.train.paths).encode(errors="surrogateescape")
    )
    router = cfg.model.router and cfg.model.router.epochs * batches
    return {
        "folder": str(Path(cfg.data.root) / ("train" if ds.layout == "splits" else "")),
        "counts": dict(Counter(Path(p).parent.name for p in paths)),
        "files": digest.hexdigest(),
        "val": {"val_fraction": cfg.data.val_fraction if shared else None, "seed": cfg.seed},
        "split": split.hexdigest(),
        "batches": batches,
        "router_steps": router,
    }


def size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def check(resumed: dict, now: dict, run_dir, cfg: Config) -> None:
    """A resume goes on exactly or not at all: refused, in one sentence naming what changed, when the data or the
    config give another training set, split, batch count (mid-epoch) or router phase than last.pt's state was saved
    for.  A last.pt without a fingerprint resumes as it is."""
    was = (resumed.get("run_files") or {}).get("fingerprint")
    if was is None:
        return
    fresh = "start a new run"
    if was["counts"] != now["counts"]:
        n, m = sum(was["counts"].values()), sum(now["counts"].values())
        raise UserError(
            f"{run_dir} was trained on {n} images in {was['folder']}; it now has {m} ({differ(was, now)})"
            f": put them back, or {fresh}"
        )
    if was["files"] != now["files"]:
        raise UserError(
            f"the images in {now['folder']} are not the ones {run_dir} was trained on (a name or a size "
            f"changed): put them back, or {fresh}"
        )
    for key, value in was["val"].items():
        if now["val"][key] != value:
            name = "seed" if key == "seed" else f"data.{key}"
            raise UserError(
                f"{run_dir} was split with {name}={value}; {now['val'][key]} gives another training "
                f"split: resume without that override, or {fresh}"
            )
    if was["split"] != now["split"]:
        raise UserError(f"{run_dir}'s training split is not the one this config and data give: {fresh}")
    state = resumed["state"]
    if state.get("epoch_progress") is not None and was["batches"] != now["batches"]:
        raise UserError(
            f"{run_dir} stopped part-way through an epoch of {was['batches']} batches; "
            f"optim.batch_size={cfg.optim.batch_size} gives {now['batches']}: resume without that override"
        )
    phase = state.get("router")
    if (
        phase
        and cfg.model.router
        and phase["epoch"] < cfg.model.router.epochs
        and was["router_steps"] != now["router_steps"]
    ):
        raise UserError(
            f"{run_dir} stopped in its router phase of {was['router_steps']} steps; this config gives "
            f"{now['router_steps']}: resume as it was, or {fresh}"
        )


def differ(was: dict, now: dict) -> str:
    """'37 fewer in hot_dog, 2 more in not_hot_dog'."""
    out = []
    for c in sorted(set(was["counts"]) | set(now["counts"])):
        d = now["counts"].get(c, 0) - was["counts"].get(c, 0)
        if d:
            out.append(f"{abs(d)} {'more' if d > 0 else 'fewer'} in {c}")
    return ", ".join(out)
