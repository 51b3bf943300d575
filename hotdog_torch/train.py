"""Train the hot-dog network: python -m hotdog_torch.train --config configs/hotdog.yaml [section.key=value ...]

Decode the images once into a uint8 tensor on the device; each epoch, batches of shuffled indices, each a step of
gradient descent on C = optim.cost (½·MSE by default; step.py) at the lr the schedule gives; then evaluate on
validation (same C), log, save checkpoints, and stop at the target, on divergence, without improvement, or at the end.

    run() -> loop.train_one_epoch() -> step(batch) -> optimizer.step()     (the weight update, step.py)
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from pathlib import Path

import yaml

from . import augment, board, checkpoint, cli, config, dist, loop, report, runtime, stopping
from .checkpoint import RunState
from .config import Config
from .cost import COSTS, confusion_matrix, per_class
from .router_training import run_phase
from .setup import Run, set_up

STOPS = ("target_accuracy", "diverged", "no_improvement", "pruned")  # verdicts that end a run before its last epoch


@runtime.keeps_float_mode  # flush_denormal is the run's, not the caller's
def run(
    cfg: Config, config_name: str = "run", progress: bool = True, resume_dir: str | Path | None = None, pruned=None
) -> Path:
    """Train one run from a checked config, or continue the run in resume_dir; returns its folder.  pruned(metrics),
    a tuner's, after each epoch's: true ends the run there (stopped_because "pruned")."""
    r, state, resumed = set_up(cfg, config_name, progress, resume_dir)
    finished = state.stopped_because is not None  # nothing to train; finish() again if a stop kept it from its end
    if finished and dist.broadcast(r.world, r.files.has_metrics()):
        return r.end()
    tb, started = open_board(r, state, resumed), time.perf_counter() - state.seconds
    with stopping.StopRequest() as request:  # finish() too: a stop during it waits for metrics.json
        stop = stopping.StopFlag(r.world, request)  # under torchrun, all ranks stop at the same step
        if r.phase is not None and not run_phase(r, state, tb, lambda: stop(now=True)):  # model.router: its phase
            where = f"router epoch {r.phase.epoch} of {r.phase.epochs}"
            stopping.saved_and_stopped(r.dir, where, request.signal or signal.SIGTERM)
        tb.watch(r.model, r.loader, COSTS[cfg.optim.cost], r.network)
        for epoch in range(state.epoch + 1, (state.epoch if finished else cfg.train.epochs) + 1):
            t0, tb.seconds = runtime.clock(r.loader.device), 0.0
            before = state.global_step - (state.epoch_progress or {}).get("next", 0)  # also when resumed mid-epoch
            order = loop.epoch_order(r.loader, r.generator, epoch, state.epoch_progress)
            result = loop.train_one_epoch(r.step, r.loader, order, r.schedule, stop, norms_due(r, tb, before))
            state.seconds = time.perf_counter() - started
            if stop(now=True):
                stopping.interrupt(r, state, result, before, epoch, request.signal or signal.SIGTERM)
            m = end_epoch(r, state, tb, epoch, result, before, t0)
            r.files.keep(r, state, m, stopping.keep(state, m, cfg.train))  # last.pt, then best.pt and k best
            if pruned is not None and pruned(m) and not state.stopped_because:  # the tuner's pruner (tune.py)
                state.stopped_because = "pruned"
            if state.stopped_because in STOPS:
                break
        finish(r, state, tb)
    return r.end()


def open_board(r: Run, state: RunState, resumed: bool) -> board.Board:
    """TensorBoard, which drops what a resumed run logged after its checkpoint; the step line on the console."""
    print(f"step: {r.step.name}; data {r.ds.where(r.loader.device)}", flush=True)
    tb = board.Board(r.dir, state.global_step + 1 if resumed else None, r.world.main)
    if not resumed:
        tb.text(yaml.safe_dump(config.to_dict(r.cfg), sort_keys=False), r.ds.summary())
    if r.world.distributed and not resumed:  # a restart after a worker dies resumes from here at the least
        r.files.save_last(r, state, {})
    return tb


def norms_due(r: Run, tb: board.Board, before: int):
    """after(lo, hi), once batches [lo, hi) of the epoch are taken: the weight and gradient norms, when a multiple
    of log.every_steps was passed."""
    every = r.cfg.log.every_steps

    def after(lo: int, hi: int) -> None:
        if every and (before + hi) // every > (before + lo) // every:
            tb.norms(before + hi)  # at the end of the window that held the log step

    return after


def end_epoch(r: Run, state: RunState, tb: board.Board, epoch: int, result, before: int, t0: float) -> dict:
    """Evaluate on validation, log the epoch, judge it; returns the epoch's metrics."""
    seconds = runtime.clock(r.loader.device) - t0  # the training alone, its queued GPU work finished
    images = r.loader.images_in(state.global_step - before, result.next)  # a resumed epoch: its own batches
    if epoch > 1 or r.cfg.train.epochs == 1:  # steady state: the first epoch pays for warm-up
        state.count(seconds, images)
    val = r.evaluate(r.ds.val, world=r.world)  # each rank its share
    costs = result.costs.tolist()  # the epoch's one transfer to the host
    train = {"train_cost": sum(costs) / len(costs), "train_error_rate": int(result.wrongs.sum()) / len(r.ds.train)}
    m = {"epoch": epoch, **train, **{f"val_{k}": val[k] for k in ("cost", "error_rate", "accuracy")}}
    m |= augment.recorded(r.cfg.data.augment, epoch)
    state.global_step, state.epoch_progress, state.epoch = before + result.next, None, epoch
    tb.steps("cost/train", costs, state.global_step - len(costs) + 1)
    tb.steps("lr", result.lrs, before + 1)
    confusion = confusion_matrix(val["outputs"], r.ds.val.labels.to(r.loader.device), r.loader.n_classes)
    tb.epoch(state.global_step, m, per_class(confusion, r.ds.classes))
    if tb.norms_step != state.global_step:  # at least once an epoch, however short the run
        tb.norms(state.global_step)
    r.schedule.end_epoch(m["val_cost"])  # plateau: its cut
    stopping.judge(r.cfg, state, m, costs, r.world)
    every = r.cfg.log.images_every_epochs
    if state.stopped_because or (every and epoch % every == 0):
        tb.summaries(state.global_step, val, confusion, r.ds.val, r.ds.classes)
    tb.flush()
    m["logging_seconds"], m["seconds"] = tb.seconds, time.perf_counter() - t0  # the whole epoch, logging too
    report.print_epoch(epoch, r.cfg.train.epochs, m, images / seconds)
    return m


def finish(r: Run, state: RunState, tb: board.Board, step_name: str | None = None) -> None:
    """metrics.json (the best epoch, and the test split scored with best.pt), HParams, and the last line."""
    if not r.world.main:
        return
    device = r.loader.device
    router = r.phase and r.phase.state()  # model.router: its phase's figures
    m = report.metrics(
        state, router, peak_memory_bytes=runtime.peak_memory_bytes(device), step=step_name or r.step.name
    )
    m |= {"stopped_because": state.stopped_because, "device": str(device), "classes": r.ds.classes}
    m["precision"] = r.step.precision  # what the products ran in
    m["skipped_files"] = len(r.ds.skipped)
    if r.ds.test is not None:
        test = r.evaluate(r.ds.test, checkpoint.model_from(checkpoint.load(r.dir / "checkpoints/best.pt")).to(device))
        m.update(test_accuracy=test["accuracy"], test_error_rate=test["error_rate"], test_cost=test["cost"])
    tb.hparams(r.cfg, {k: m.get(k) for k in board.HPARAM_METRICS})
    tb.close()
    r.files.write_metrics(m)
    report.print_end(r.cfg, state, m, r.dir)


def main(argv=None) -> int:
    args = cli.command_line(argv)  # the prefetch reads them the same way (cache.prefetch)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)  # not a source line

    def command():
        cfg = config.load_run(args.config, args.resume, args.overrides)
        run(cfg, Path(args.config).stem if args.config else "run", not args.no_progress, args.resume)

    return cli.exit_code(command, stopping.Interrupted)


if __name__ == "__main__":
    cli.run(main)
