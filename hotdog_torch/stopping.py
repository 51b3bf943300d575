"""When a run stops: at the target accuracy, when the cost diverges, after the last epoch, or on a signal."""

from __future__ import annotations

import math
import signal
import sys
from typing import NamedTuple

from . import dist
from .config import Config, Train


class DivergenceWatch:
    """Diverged: a NaN or infinite cost, or the mean cost of the last n steps above k x the lowest such mean
    (and above the first such mean: back above where training started) for n steps running.

    The second condition keeps the noise of small batches near a low cost from reading as divergence.
    """

    def __init__(self, k: float, n: int, state: dict | None = None):
        self.k, self.n = k, n
        state = state or {"window": [], "best": None, "first": None, "above": 0}
        self.window, self.best, self.first, self.above = state["window"], state["best"], state["first"], state["above"]

    def update(self, costs: list[float]) -> bool:
        for c in costs:
            if not math.isfinite(c):
                return True
            self.window = (self.window + [c])[-self.n :]
            if len(self.window) == self.n:
                mean = sum(self.window) / self.n
                self.first = mean if self.first is None else self.first
                self.best = mean if self.best is None else min(self.best, mean)
                self.above = self.above + 1 if mean > self.k * self.best and mean > self.first else 0
                if self.above >= self.n:
                    return True
        return False

    def state(self) -> dict:
        return {"window": self.window, "best": self.best, "first": self.first, "above": self.above}


def verdict(cfg: Config, epoch: int, val_accuracy: float, diverged: bool, bad_epochs: int = 0) -> str | None:
    """Why the run stops after this epoch ("diverged", "target_accuracy", "no_improvement", "epochs"), or None."""
    if diverged:
        return "diverged"
    if cfg.train.target_accuracy is not None and val_accuracy >= cfg.train.target_accuracy:
        return "target_accuracy"
    if cfg.train.patience is not None and bad_epochs >= cfg.train.patience:
        return "no_improvement"
    if epoch == cfg.train.epochs:
        return "epochs"
    return None


def rank(m: dict, monitor: str = "val_accuracy") -> tuple:
    """Larger is better: the monitored figure first (accuracy up, cost down), the other one to break ties; an epoch
    whose validation cost is not finite ranks below every other.  In an augmented run, an epoch of the curriculum's
    ramp never beats one at full strength (its network is the template the augmentation is there to unlearn,
    however well it scores on pictures as drawn)."""
    cost, ramp = m["val_cost"] if math.isfinite(m["val_cost"]) else math.inf, m.get("augment_strength", 1.0)
    if monitor == "val_cost":
        return (ramp, -cost, m["val_accuracy"])
    return (ramp, m["val_accuracy"] if cost < math.inf else -math.inf, -cost)


def better(m: dict, best: dict | None, train: Train) -> bool:
    """Is this epoch the best so far by train.monitor (best.pt)?"""
    return best is None or rank(m, train.monitor) > rank(best, train.monitor)


def improved(m: dict, reference: dict | None, train: Train) -> bool:
    """Has train.monitor improved by more than train.min_delta on the epoch of its last such improvement (Keras's
    EarlyStopping keeps that reference: gains smaller than min_delta do not move it)?"""
    if reference is None:
        return math.isfinite(m["val_cost"])
    if train.monitor == "val_cost":
        return m["val_cost"] < reference["val_cost"] - train.min_delta
    return m["val_accuracy"] > reference["val_accuracy"] + train.min_delta


def top_k(kept: list, m: dict, train: Train) -> tuple[list, bool, list]:
    """The train.keep_top_k best epochs with this one: (their metrics best first, whether this one is among them,
    those pushed out)."""
    ranked, k = sorted([*kept, m], key=lambda e: rank(e, train.monitor), reverse=True), train.keep_top_k
    return ranked[:k], any(e is m for e in ranked[:k]), ranked[k:]


def divergence_advice(cfg: Config, epoch: int) -> str:
    return (
        f"the cost diverged at epoch {epoch} (NaN/inf, or its {cfg.train.diverge_steps}-step mean stayed above "
        f"{cfg.train.diverge_factor:g}x its lowest): lower optim.lr (now {cfg.optim.lr:g})"
    )


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Training stopped by a signal after saving; carries the exit code."""

    def __init__(self, code: int):
        self.code = code


def interrupt(r, state, result, before: int, epoch: int, signum: int):
    """Save where the epoch stopped (the resumed run continues from that very step), say how to resume, and exit.
    r: setup.Run; result: loop.EpochResult; before: the steps taken before the epoch."""
    state.global_step = before + result.next
    r.files.save_last(r, state, state.history[-1] if state.history else {}, result.progress())
    saved_and_stopped(r.dir, f"epoch {epoch}, step {result.next} of {r.loader.batches_per_epoch()}", signum)


def saved_and_stopped(run_dir, where: str, signum: int):
    """Say where the run was saved (checkpoints/last.pt, at `where`) and how to resume it; end with Interrupted."""
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    resume = f"python -m hotdog_torch.train --resume {run_dir}"
    print(
        f"\n{name}: saved {run_dir}/checkpoints/last.pt at {where}. Resume with: {resume}", file=sys.stderr, flush=True
    )
    raise Interrupted(128 + signum)


STOP_EVERY = 16  # under torchrun, steps between the ranks' agreements on a stop request


class StopFlag:
    """Should the run stop: request() (a signal seen by this process), agreed on by every rank at the same call.

    Agreeing costs an all-reduce and a host sync, so under torchrun the ranks agree every `every` calls (steps)
    and whenever a caller asks for it now (an epoch's end), and otherwise go on: a request is acted on within
    `every` steps, by all the ranks at the same step, since they all call this as often.  Once true, it stays.
    """

    def __init__(self, world: dist.World, request, every: int = STOP_EVERY):
        self.world, self.request, self.every, self.calls, self.stopped = world, request, every, 0, False

    def __call__(self, now: bool = False) -> bool:
        if not self.world.distributed:
            return bool(self.request())
        self.calls += 1
        if not self.stopped and (now or self.calls % self.every == 0):
            self.stopped = dist.agree(self.world, bool(self.request()))
        return self.stopped


def judge(cfg: Config, state, m: dict, costs: list[float], world: dist.World = dist.SINGLE) -> None:
    """An epoch's divergence, improvement and verdict, into the run's state (rank 0's verdict, so that every rank
    stops with it).  state: checkpoint.RunState; costs: the epoch's step costs."""
    watch = DivergenceWatch(cfg.train.diverge_factor, cfg.train.diverge_steps, state.divergence)
    diverged = watch.update(costs)
    state.divergence = watch.state()
    better = improved(m, state.reference, cfg.train)  # by more than min_delta on the last improvement
    state.reference, state.bad_epochs = (m, 0) if better else (state.reference, state.bad_epochs + 1)
    state.stopped_because = dist.broadcast(
        world, verdict(cfg, m["epoch"], m["val_accuracy"], diverged, state.bad_epochs)
    )
    if diverged:
        print(divergence_advice(cfg, m["epoch"]), flush=True)


class Due(NamedTuple):
    """The files an epoch is due to write: last.pt, best.pt, its best-<epoch>.pt; and the k-best epochs pushed out."""

    last: bool
    best: bool
    entered: bool
    out: list


def keep(state, m: dict, train: Train) -> Due:
    """The epoch into the history, the best and the k best; which files that makes due (run_files.RunFiles.keep
    writes them): last.pt when train.checkpoint_every_epochs says so, and whenever a best or k-best file is."""
    state.history.append(m)
    best = state.best is None or (math.isfinite(m["train_cost"]) and better(m, state.best, train))
    state.best, entered, out = m if best else state.best, False, []
    if train.keep_top_k and math.isfinite(m["train_cost"]) and math.isfinite(m["val_cost"]):
        state.top_k, entered, out = top_k(state.top_k, m, train)
    last = best or entered or m["epoch"] % train.checkpoint_every_epochs == 0 or bool(state.stopped_because)
    return Due(last, best, entered, [gone["epoch"] for gone in out])
