"""The shot in the dark: random search over every weight, the seed's foil for gradient descent.

    python -m hotdog_torch.search --config configs/hotdog.yaml [section.key=value ...]

Each pass draws every weight and bias afresh from the initial distribution, scores the draw on the whole training
set and keeps it when it beats the best so far.  No gradient is ever computed.  A pass is charged like one epoch of
gradient descent (its steps), so the two share TensorBoard's x axis; the run folder is a training run's (config.yaml,
TensorBoard, checkpoints/best.pt and last.pt, metrics.json), so evaluate, predict and the lessons read it alike.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import yaml

from . import board, checkpoint, cli, config, dist, files, loop, report, runtime, setup, stopping
from .checkpoint import RunState
from .config import Config, UserError
from .cost import COSTS, confusion_matrix, per_class
from .data import Loader
from .model import linear_layers

NAME = "random search (a fresh draw of every weight per pass, the best kept; no gradients)"


@torch.no_grad()
def random_search_pass(model, candidate, loader: Loader, kept: dict | None, cost) -> tuple[dict, dict]:
    """One pass: draw every weight and bias of the candidate afresh, score it on the whole training set, and keep
    it in `model` if its error rate (then cost: optim.cost, class-weighted as training is) beats the kept score.
    Returns (the candidate's score, the kept score)."""
    for layer in linear_layers(candidate):
        layer.reset_parameters()
    f = loader
    r = loop.evaluate(candidate, f.split, f.mean, f.std, f.n_classes, cost=cost, weights=f.class_weights)
    score = {"error_rate": r["error_rate"], "cost": r["cost"]}
    if kept is None or (score["error_rate"], score["cost"]) < (kept["error_rate"], kept["cost"]):
        model.load_state_dict(candidate.state_dict())
        kept = score
    return score, kept


@runtime.keeps_float_mode
def run(cfg: Config, config_name: str = "search", progress: bool = True) -> Path:
    """Random search for train.epochs passes (or until train.target_accuracy); returns the run folder."""
    if cfg.model.router is not None:
        raise UserError("random search draws the classifier's weights alone: set model.router=null")
    if dist.from_env().distributed:
        raise UserError("random search runs in one process: start it without torchrun")
    device = runtime.resolve_device(cfg.device)
    runtime.use_tf32(device)  # the arithmetic a training run does
    ds = setup.load_data(cfg, device, dist.SINGLE, progress)
    loader = setup.make_loader(cfg, ds, device)
    run_dir = files.open_run_dir(cfg, config_name, ds, device)
    files.write_config(run_dir, cfg)
    model = setup.network(cfg, loader, device)  # the start gradient descent would take
    candidate, cost, state, kept = copy.deepcopy(model), COSTS[cfg.optim.cost], RunState(), None
    meta = checkpoint.meta(config.to_dict(cfg), ds.classes, loader.mean.tolist(), loader.std.tolist())
    meta["trained_by"] = "random_search"
    print(f"step: {NAME}; data {ds.where(device)}", flush=True)
    tb = board.Board(run_dir)
    tb.text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), ds.summary())
    tb.watch(model, loader, cost)
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        score, kept = random_search_pass(model, candidate, loader, kept, cost)
        state.epoch, state.global_step = epoch, epoch * loader.batches_per_epoch()
        m = log_pass(cfg, ds, loader, model, tb, state, kept, score)
        m["seconds"] = time.perf_counter() - t0
        state.seconds += m["seconds"]
        if epoch > 1 or cfg.train.epochs == 1:  # steady state, as a training run counts it
            state.count(m["seconds"], len(ds.train))
        report.print_epoch(epoch, cfg.train.epochs, m, len(ds.train) / m["seconds"])
        due, save = stopping.keep(state, m, cfg.train), saver(run_dir, model, meta, m, state)
        for name in ["last"] * due.last + ["best"] * due.best + [f"best-{epoch}"] * due.entered:  # last.pt first
            save(name)
        for e in due.out:  # a best-<epoch>.pt this search wrote, pushed out of the k best
            (run_dir / "checkpoints" / f"best-{e}.pt").unlink(missing_ok=True)
        if state.stopped_because:
            break
    finish(cfg, ds, loader, run_dir, tb, state)
    return run_dir


def saver(run_dir: Path, model, meta: dict, m: dict, state: RunState):
    """save(name): checkpoints/<name>.pt of the kept draw (last.pt with the run's state, for the lessons)."""
    return lambda name: checkpoint.save(
        run_dir / "checkpoints" / f"{name}.pt", model, None, meta, m, state, name == "last"
    )


def log_pass(cfg: Config, ds, loader: Loader, model, tb: board.Board, state: RunState, kept: dict, score: dict):
    """Score the kept draw on validation, log the pass, judge it; returns its metrics."""
    f, how = loader, {"cost": COSTS[cfg.optim.cost], "weights": loader.class_weights}  # as training scores
    val = loop.evaluate(model, ds.val, f.mean, f.std, f.n_classes, **how)
    m = {"epoch": state.epoch, "train_cost": kept["cost"], "train_error_rate": kept["error_rate"]}
    m |= {f"val_{k}": val[k] for k in ("cost", "error_rate", "accuracy")}
    tb.steps("cost/train", [kept["cost"]], state.global_step)
    tb.scalars(state.global_step, {f"random_search/candidate_{k}": v for k, v in score.items()})
    confusion = confusion_matrix(val["outputs"], ds.val.labels.to(loader.device), loader.n_classes)
    tb.epoch(state.global_step, m, per_class(confusion, ds.classes))
    better = stopping.improved(m, state.reference, cfg.train)
    state.reference, state.bad_epochs = (m, 0) if better else (state.reference, state.bad_epochs + 1)
    state.stopped_because = stopping.verdict(cfg, state.epoch, m["val_accuracy"], False, state.bad_epochs)
    every = cfg.log.images_every_epochs
    if state.stopped_because or (every and state.epoch % every == 0):
        tb.summaries(state.global_step, val, confusion, ds.val, ds.classes, gradients=False)
    tb.flush()
    return m


def finish(cfg: Config, ds, loader: Loader, run_dir: Path, tb: board.Board, state: RunState) -> None:
    """metrics.json (the best pass, and the test split scored with its draw), HParams, and the last line."""
    memory = runtime.peak_memory_bytes(loader.device)
    m = report.metrics(state, peak_memory_bytes=memory, step=NAME, stopped_because=state.stopped_because)
    m["device"] = str(loader.device)
    m |= {"classes": ds.classes, "skipped_files": len(ds.skipped)}
    if ds.test is not None:
        best = checkpoint.model_from(checkpoint.load(run_dir / "checkpoints/best.pt")).to(loader.device)
        f, how = loader, {"cost": COSTS[cfg.optim.cost], "weights": loader.class_weights}
        test = loop.evaluate(best, ds.test, f.mean, f.std, f.n_classes, **how)
        m.update(test_accuracy=test["accuracy"], test_error_rate=test["error_rate"], test_cost=test["cost"])
    tb.hparams(cfg, {k: m.get(k) for k in board.HPARAM_METRICS})
    tb.close()
    report.write_metrics(run_dir, m)
    report.print_end(cfg, state, m, run_dir)


def main(argv=None) -> int:
    args = cli.command_line(argv, prog="python -m hotdog_torch.search")

    def command():
        if args.resume:
            raise UserError("a random search runs start to end in seconds: start it again rather than --resume")
        run(config.load(args.config, args.overrides), Path(args.config).stem if args.config else "search")

    return cli.exit_code(command)


if __name__ == "__main__":
    cli.run(main)
