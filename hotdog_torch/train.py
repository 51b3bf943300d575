"""Train the hot-dog network: python -m hotdog_torch.train --config configs/hotdog.yaml [section.key=value ...]

Decode the images once into a uint8 tensor on the device; each epoch, batches of shuffled indices, each a step of
gradient descent on C = optim.cost (½·MSE by default; step.py) at the lr the schedule gives; then evaluate on
validation (same C), log, save checkpoints, and stop at the target, on divergence, without improvement, or at the end.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import augment, board, checkpoint, cli, config, data, dist, files, report, runtime, schedule, search, stopping
from .checkpoint import RunState
from .config import Config, UserError
from .cost import COSTS, class_weights, confusion_matrix, per_class
from .loop import EpochResult, Feed, clamp_batch_size, evaluate, train_one_epoch
from .model import build_model, input_side
from .optim import make_optimizer
from .router_training import Phase, phase_of, routed, run_phase
from .step import check_step, fuses, make_step


@dataclass
class Run:  # what one training run is made of, once set up
    cfg: Config
    ds: data.Dataset
    dir: Path
    model: torch.nn.Sequential
    optimizer: torch.optim.Optimizer
    schedule: schedule.Schedule  # the lr, written into the optimiser's param_groups step by step
    generator: torch.Generator  # the batch order
    feed: Feed  # the training split's batches
    meta: dict  # what a checkpoint needs besides the weights (checkpoint.meta)
    world: dist.World = dist.SINGLE  # under torchrun, rank 0 alone writes
    phase: Phase | None = None  # model.router: the router and its phase (before the epochs)

    @property
    def network(self) -> torch.nn.Module:  # what judges a picture: the classifier, or the router then the classifier
        return routed(self.phase, self.model)

    def save(self, name: str, state: RunState, metrics: dict, progress=None) -> None:
        """checkpoints/<name>.pt; progress, when an epoch stopped part-way, is where (for --resume)."""
        rng = checkpoint.rng_state(self.generator, self.world) if name == "last" else None  # every rank's: all call
        if not self.world.main:
            return
        state.epoch_progress, state.rng = checkpoint.on_cpu(progress), rng  # rng: for --resume, in last.pt alone
        state.schedule, path = self.schedule.state_dict(), self.dir / "checkpoints" / f"{name}.pt"
        state.router, router = None if self.phase is None else self.phase.state(), self.phase and self.phase.net
        checkpoint.save(path, self.model, self.optimizer, self.meta, metrics, state, name == "last", router)

    def evaluate(self, split: data.Split, model=None, world=dist.SINGLE) -> dict:  # the cost training minimises
        f, how = self.feed, {"world": world, "cost": COSTS[self.cfg.optim.cost], "weights": self.feed.class_weights}
        return evaluate(model or self.network, split, f.mean, f.std, f.n_classes, **how)


@runtime.keeps_float_mode  # flush_denormal is the run's, not the caller's
def run(cfg: Config, config_name: str = "run", progress: bool = True, resume_dir: str | Path | None = None) -> Path:
    """Train one run from a checked config, or continue the run in resume_dir; returns its folder."""
    r, state, resumed = set_up(cfg, config_name, progress, resume_dir)
    if state is None:  # nothing to resume
        return dist.finish(r.world) or r.dir
    if cfg.optim.name == "random_search":  # the shot in the dark: a draw a pass, no step
        step_name, epoch_pass = search.NAME, search.Search(r.model, r.feed, COSTS[cfg.optim.cost]).epoch
    else:
        step = make_step(r.model, r.optimizer, cfg, r.feed.device, r.world)
        step_name, every = step.name, cfg.log.every_steps

        def epoch_pass(state, tb, stop, first):  # one epoch of gradient descent
            return train_one_epoch(
                step, r.feed, r.generator, r.schedule, state.epoch_progress, stop, first, every, tb.norms
            )

    print(f"step: {step_name}; data {r.ds.where(r.feed.device)}", flush=True)
    purge = state.step + 1 if resumed else None  # TensorBoard drops what a resumed run logged after its checkpoint
    tb = board.Board(r.dir, purge, r.world.main)
    if not resumed:
        tb.text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), r.ds.summary())
    watch = stopping.DivergenceWatch(cfg.train.diverge_factor, cfg.train.diverge_steps, state.divergence)
    session_start, seconds_before = time.perf_counter(), state.seconds
    if r.world.distributed and not resumed:  # a restart after a worker dies resumes from here at the least
        r.save("last", state, {})
    with stopping.StopRequest() as request:
        stop = dist.StopFlag(r.world, request)  # under torchrun, all ranks stop at the same step
        if r.phase is not None and not run_phase(r, state, tb, lambda: stop(now=True)):
            where = f"router epoch {r.phase.epoch} of {r.phase.epochs}"
            stopping.saved_and_stopped(r.dir, where, request.signal or signal.SIGTERM)
        tb.watch(r.model, r.feed, COSTS[cfg.optim.cost], r.network)
        for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
            t0, tb.seconds = time.perf_counter(), 0.0
            first = state.step - (state.epoch_progress or {}).get("next", 0)  # also when resumed mid-epoch
            done = epoch_pass(state, tb, stop, first)
            state.seconds = seconds_before + time.perf_counter() - session_start
            if stop(now=True):
                stopping.interrupt(r, state, done, first, epoch, request.signal or signal.SIGTERM)
            seconds, images = time.perf_counter() - t0, r.feed.images_in(state.step - first, done.next)  # resumed: part
            if epoch > 1 or cfg.train.epochs == 1:  # steady state: the first epoch pays for warm-up
                state.count(seconds, images)
            m = end_epoch(r, state, tb, watch, epoch, done, first)
            m["seconds"] = time.perf_counter() - t0  # the whole epoch: training, evaluation and logging
            report.print_epoch(epoch, cfg.train.epochs, m, images / seconds)
            keep(r, state, m)
            if state.stopped_because in ("target_accuracy", "diverged", "no_improvement"):
                break
    finish(r, state, tb, step_name)
    dist.finish(r.world)
    return r.dir


def set_up(cfg: Config, config_name: str, progress: bool, resume_dir) -> tuple[Run, RunState | None, bool]:
    """Data, run folder, model, optimiser, schedule and batch order; the state to go on from (None: nothing left)."""
    world = dist.from_env()  # one process, or one of torchrun's
    device = dist.start(world, runtime.resolve_device(cfg.device))
    runtime.use_tf32(device)
    check_step(cfg, device, world)  # a config no step can take here, before anything is written
    resume_dir = resume_dir or dist.restarted_run(world, cfg.log.dir)  # a worker died: go on where the run was
    resumed = checkpoint.load(Path(resume_dir) / "checkpoints" / "last.pt") if resume_dir else None
    budget = cfg.data.memory_budget if cfg.data.memory_budget is not None else data.default_memory_budget(device)
    ds = dist.main_first(world, lambda: data.prepare(cfg.data, cfg.seed, progress, budget))  # decoded once
    ds = ds.to(device)  # each pool once, in every process: the batches are gathered from it on the device
    batch_size = clamp_batch_size(cfg.optim.batch_size, len(ds.train))
    total_steps = cfg.train.epochs * math.ceil(len(ds.train) / batch_size)
    schedule.check(cfg.optim, total_steps)  # before anything is written
    weights = class_weights(cfg.optim.class_weights, ds.train.labels, ds.classes)  # a tensor, or None
    if world.main:
        run_dir = files.open_run_dir(cfg, config_name, resume_dir, resumed, ds, device)
        dist.note_run(world, cfg.log.dir, run_dir)
    run_dir = dist.broadcast(world, run_dir if world.main else None)
    torch.manual_seed(cfg.seed)
    width = cfg.data.channels * input_side(cfg.data.image_size, cfg.model.router and cfg.model.router.size) ** 2
    model = build_model(width, cfg.model.hidden, len(ds.classes), cfg.model.activation, cfg.model.dropout).to(device)
    runtime.set_up_cpu(device, cfg.train.flush_denormal, [width, *cfg.model.hidden, len(ds.classes)], batch_size)
    if world.distributed and cfg.model.dropout:  # each rank's rows their own dropout masks
        torch.manual_seed(cfg.seed + world.rank)
    optimizer = make_optimizer(model, cfg, fuses(cfg, device, world))
    generator = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same order on any device, and resumable
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    weights = None if weights is None else weights.to(device)
    feed = Feed(ds.train, mean, std, batch_size, len(ds.classes), device, world, weights, cfg.data.augment)
    meta = checkpoint.meta(config.to_dict(cfg), ds.classes, mean.tolist(), std.tolist())
    state = RunState()
    if resumed is not None:  # the config given trains, not the checkpoint's numbers
        state = checkpoint.restore(resumed, model, optimizer, generator, run_dir, cfg.train, cfg.optim)
    lr = schedule.Schedule(optimizer, cfg.optim, total_steps, state and state.schedule, state.step if state else 0)
    phase = phase_of(cfg, device, feed.steps(), resumed, state)
    if world.main and state is not None:  # only now: a refused resume changes nothing on disk
        checkpoint.settle(run_dir, cfg, resumed)
    elif world.main and resumed is not None:  # finished: only a best.pt a kill left behind last.pt, mended
        checkpoint.mend(run_dir, resumed)
    return Run(cfg, ds, run_dir, model, optimizer, lr, generator, feed, meta, world, phase), state, resumed is not None


def end_epoch(r: Run, state: RunState, tb: board.Board, watch, epoch: int, done: EpochResult, first: int) -> dict:
    """Evaluate on validation, log the epoch, decide whether to stop; returns the epoch's metrics."""
    val = r.evaluate(r.ds.val, world=r.world)  # each rank its share
    costs = done.costs.tolist()  # the epoch's one transfer to the host
    train = {"train_cost": sum(costs) / len(costs), "train_error_rate": int(done.wrongs.sum()) / len(r.ds.train)}
    m = {"epoch": epoch, **train, **{f"val_{k}": val[k] for k in ("cost", "error_rate", "accuracy")}}
    m |= augment.recorded(r.cfg.data.augment, epoch)
    state.step, state.epoch_progress, state.epoch = first + done.next, None, epoch
    tb.steps("cost/train", costs, state.step - len(costs) + 1)
    tb.steps("lr", done.lrs, first + 1)
    if done.candidate is not None:
        tb.scalars(state.step, {f"random_search/candidate_{k}": v for k, v in done.candidate.items()})
    confusion = confusion_matrix(val["outputs"], r.ds.val.labels.to(r.feed.device), r.feed.n_classes)
    tb.epoch(state.step, m, per_class(confusion, r.ds.classes))
    if done.candidate is None and tb.norms_step != state.step:  # at least once an epoch, however short the run
        tb.norms(state.step)
    diverged = done.candidate is None and watch.update(costs)
    state.divergence = watch.state()
    r.schedule.end_epoch(m["val_cost"])
    better = stopping.improved(m, state.reference, r.cfg.train)  # by more than min_delta on the last improvement
    state.reference, state.bad_epochs = (m, 0) if better else (state.reference, state.bad_epochs + 1)
    verdict = stopping.verdict(r.cfg, epoch, m["val_accuracy"], diverged, state.bad_epochs)
    state.stopped_because = dist.broadcast(r.world, verdict)  # rank 0's, so that every rank stops with it
    if diverged:
        print(stopping.divergence_advice(r.cfg, epoch), flush=True)
    every = r.cfg.log.images_every_epochs
    if state.stopped_because or (every and epoch % every == 0):
        tb.summaries(state.step, val, confusion, r.ds.val, r.ds.classes, gradients=done.candidate is None)
    tb.flush()
    m["logging_seconds"] = tb.seconds
    return m


def keep(r: Run, state: RunState, m: dict) -> None:
    """The epoch into the history; best.pt (and the k best's files) and last.pt, when due and before those: mend."""
    state.history.append(m)
    best = state.best is None or (math.isfinite(m["train_cost"]) and stopping.better(m, state.best, r.cfg.train))
    state.best, entered, out = m if best else state.best, False, []
    if r.cfg.train.keep_top_k and math.isfinite(m["train_cost"]) and math.isfinite(m["val_cost"]):
        state.top_k, entered, out = stopping.top_k(state.top_k, m, r.cfg.train)
    if best or entered or m["epoch"] % r.cfg.train.checkpoint_every_epochs == 0 or state.stopped_because:
        r.save("last", state, m)
    for name in ["best"] * best + [f"best-{m['epoch']}"] * entered:
        r.save(name, state, m)
    for gone in out if r.world.main else ():
        (r.dir / "checkpoints" / f"best-{gone['epoch']}.pt").unlink(missing_ok=True)


def finish(r: Run, state: RunState, tb: board.Board, step_name: str) -> None:
    """metrics.json (the best epoch, and the test split scored with best.pt), HParams, and the last line."""
    if not r.world.main:
        return
    device = r.feed.device
    m = report.metrics(state, peak_memory_bytes=runtime.peak_memory_bytes(device), step=step_name)
    m |= {"stopped_because": state.stopped_because, "device": str(device), "classes": r.ds.classes}
    m["skipped_files"] = len(r.ds.skipped)
    if r.ds.test is not None:
        test = r.evaluate(r.ds.test, checkpoint.model_from(checkpoint.load(r.dir / "checkpoints/best.pt")).to(device))
        m.update(test_accuracy=test["accuracy"], test_error_rate=test["error_rate"], test_cost=test["cost"])
    tb.hparams(r.cfg, {k: m.get(k) for k in board.HPARAM_METRICS})
    tb.close()
    report.write_metrics(r.dir, m)
    report.print_end(r.cfg, state, m, r.dir)


def main(argv=None) -> int:
    args = cli.command_line(argv)  # the prefetch reads them the same way (cache.prefetch)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)  # not a source line
    try:
        cfg = config.load_run(args.config, args.resume, args.overrides)
        run(cfg, Path(args.config).stem if args.config else "run", not args.no_progress, args.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except stopping.Interrupted as e:
        return e.code
    except KeyboardInterrupt:
        print("interrupted; the checkpoints already written are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
