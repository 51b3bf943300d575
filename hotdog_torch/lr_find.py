"""Find a learning rate: python -m hotdog_torch.lr_find --config FILE [section.key=value ...] [--out DIR]
    [--min-lr 1e-7] [--max-lr 10] [--steps 100] [--checkpoint FILE]

fastai's learning-rate range test (Learner.lr_find, after Smith's "Cyclical Learning Rates"): train a copy of the
network for up to `steps` optimiser steps while the learning rate rises exponentially,

    lr_i = min_lr · (max_lr / min_lr)^(i / (steps − 1)),   i = 0 … steps − 1   (the last step at max_lr),

written into the optimiser's param_groups before each step: every step path (fused or autograd; SGD, momentum,
AdamW, Adam) reads it there.  Each batch's cost is smoothed as fastai's AvgSmoothLoss does,

    avg_i = β·avg_(i−1) + (1 − β)·C_i,  avg_(−1) = 0,   smoothed_i = avg_i / (1 − β^(i+1)),   β = 0.98,

and the test stops once the smoothed cost passes 4× its lowest (or a cost is NaN/inf).  The suggestion is
fastai's default, 'valley': on the smoothed curve without its first tenth and last 5 steps, the longest run of
decreasing costs (the longest decreasing subsequence), and the lr halfway down it.

With a router (model.router) the test measures the classifier's lr (optim.lr; the router's own, model.router.lr,
is its phase's): the pictures are un-warped by the router of --checkpoint, or without one by a new router, which is
the identity (the classifier then sees the pictures as they are framed, at its own side).

The network trained is a copy: the config, the data cache, the checkpoint (--checkpoint is only read) and every
random generator (torch's CPU and CUDA ones, numpy's, Python's) are as they were.  Writes lr_find.png (the cost
against the lr, log axis, the suggestion marked) and a TensorBoard run into --out (default
<log.dir>/lr_find-<config stem>-<timestamp>, never an existing folder), and prints one line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from . import checkpoint, cli, config, dist, files, loop, router_training, runtime, setup
from .board import Board
from .config import Config, UserError
from .data import Loader
from .model import build_model, input_side, linear_layers
from .step import Step, make_step

BETA = 0.98  # fastai's smoothing of the cost
BLOW_UP = 4.0  # stop once the smoothed cost passes this many times its lowest


@dataclass
class Finding:
    """What one range test saw: each step's lr, the cost of its batch before its update, the smoothed cost."""

    lrs: list[float]
    costs: list[float]
    smooth: list[float]  # one per finite cost
    steps: int  # asked for
    suggestion: int | None  # the suggested lr's step (None: too few steps before the cost blew up)
    blew_up: str | None  # why the test stopped before its last step, or None
    step_name: str
    cost_name: str
    config: dict
    data: str

    @property
    def lr(self) -> float | None:
        return None if self.suggestion is None else self.lrs[self.suggestion]


def check(min_lr: float, max_lr: float, steps: int) -> None:
    if not (math.isfinite(min_lr) and min_lr > 0):
        raise UserError(f"--min-lr must be a number above 0, got {min_lr}")
    if not (math.isfinite(max_lr) and max_lr > min_lr):
        raise UserError(f"--max-lr must be above --min-lr ({min_lr:g}), got {max_lr:g}")
    if steps < 2:
        raise UserError(f"--steps must be at least 2 for the lr to rise, got {steps}")


def rates(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """min_lr · (max_lr / min_lr)^(i / (steps − 1)): from min_lr to max_lr, the same ratio every step."""
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smoothed(costs: list[float], beta: float = BETA) -> list[float]:
    """fastai's AvgSmoothLoss: an exponential moving average from 0, divided by 1 − β^(i+1) so it starts unbiased."""
    avg, out = 0.0, []
    for i, c in enumerate(costs):
        avg = beta * avg + (1 - beta) * c
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def valley(smooth: list[float]) -> int | None:
    """fastai's suggest 'valley': skip the first tenth and the last 5 points, find the longest decreasing
    subsequence of the smoothed cost, and take the point 1/3 + 1/6 of the way along it (halfway down).  Its start
    is the subsequence's first point (fastai's, `end - length`, is one before it: -1, the largest lr, on a short
    curve that falls from its first point or does not fall at all)."""
    lo, hi = len(smooth) // 10, len(smooth) - 5
    if hi - lo < 3:  # a short test: use every point
        lo, hi = 0, len(smooth)
    if hi - lo < 2:
        return None
    s = smooth[lo:hi]
    longest, first, end = [1] * len(s), list(range(len(s))), 0  # the longest descent ending at each point
    for i in range(1, len(s)):
        for j in range(i):
            if s[i] < s[j] and longest[i] < longest[j] + 1:
                longest[i], first[i] = longest[j] + 1, first[j]
        if longest[end] < longest[i]:
            end = i
    third = (end - first[end]) / 3
    return lo + first[end] + int(third) + int(third / 2)


@contextlib.contextmanager
def random_state_kept(device: torch.device):
    """torch's CPU generator (and CUDA's, when in use), numpy's and Python's, put back as they were on exit."""
    cuda = device.type == "cuda" or torch.cuda.is_initialized()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@runtime.keeps_float_mode  # the caller's threads and subnormal mode, as they were
def find(cfg: Config, min_lr=1e-7, max_lr=10.0, steps=100, model=None, progress=False) -> Finding:
    """The range test on a copy of `model` (None: a fresh network, initialised as train.py does) with cfg's data,
    optimiser and cost, set up by train.py's own functions; cfg, the model and every random state are left as
    they were."""
    check(min_lr, max_lr, steps)
    cfg = copy.deepcopy(cfg)
    cfg.optim.fused_window = 1  # a window of steps shares one lr; here every step has its own
    device = runtime.resolve_device(cfg.device)
    runtime.use_tf32(device)  # the arithmetic train.py's run would do
    router = getattr(model, "router", None)  # a routed checkpoint: its router un-warps, its classifier is trained
    model = getattr(model, "classifier", model)
    if model is not None:
        check_network(cfg, model, linear_layers(model)[-1].out_features)  # before anything is decoded or written
    ds = setup.load_data(cfg, device, dist.SINGLE, progress)
    with random_state_kept(device):
        loader = setup.make_loader(cfg, ds, device)
        net = setup.network(cfg, loader, device, seed=torch.default_generator.manual_seed)  # as train.py draws it
        if model is not None:
            check_network(cfg, model, len(ds.classes))
            net = copy.deepcopy(model).train().to(device)
        step = make_step(net, cfg, device)
        if cfg.model.router is not None:
            loader.router = (router or router_training.build(cfg, device)).to(device).eval()
        lrs, costs, blew_up = descend(
            step, loader, torch.Generator().manual_seed(cfg.seed), rates(min_lr, max_lr, steps)
        )
    smooth = smoothed([c for c in costs if math.isfinite(c)])
    doc = config.to_dict(cfg)
    return Finding(lrs, costs, smooth, steps, valley(smooth), blew_up, step.name, cfg.optim.cost, doc, ds.summary())


def check_network(cfg: Config, model, n_classes: int) -> None:
    """Refuse, in one sentence, a network that is not the config's for data of n_classes."""
    width = cfg.data.channels * input_side(cfg.data.image_size, cfg.model.router and cfg.model.router.size) ** 2
    with torch.device("meta"):  # the shape alone: no weights drawn, no random state used
        config_net = build_model(width, cfg.model.hidden, n_classes, cfg.model.activation, cfg.model.dropout)
    if str(model) != str(config_net):
        raise UserError(
            f"the network given ({_layers(model)}) is not the config's ({_layers(config_net)}) for this data"
        )


def _layers(model) -> str:
    return " -> ".join(type(m).__name__ + (f"({m.out_features})" if hasattr(m, "out_features") else "") for m in model)


def descend(step: Step, loader: Loader, generator, lrs: list[float]) -> tuple[list, list, str | None]:
    """One step at each lr, written into every param group first; stops when the smoothed cost blows up.
    Returns the lrs used, each step's cost (its batch's, before the update) and why it stopped early."""
    used, costs, avg, best = [], [], 0.0, math.inf
    for i, (lr, batch) in enumerate(zip(lrs, batches(loader, generator), strict=False)):
        for group in step.optimizer.param_groups:
            group["lr"] = lr
        cost = float(step(batch)[0][0])
        used.append(lr)
        costs.append(cost)
        if not math.isfinite(cost):
            return used, costs, f"the cost turned {cost}"
        avg = BETA * avg + (1 - BETA) * cost  # smoothed(), one step at a time
        smooth = avg / (1 - BETA ** (i + 1))
        best = min(best, smooth)
        if smooth > BLOW_UP * best:
            return used, costs, f"the smoothed cost passed {BLOW_UP:g}x its lowest"
    return used, costs, None


def batches(loader: Loader, generator):
    """The training run's batches (loop.py: shuffled, framed as data.augment frames them), epoch after epoch."""
    for epoch in itertools.count(1):
        yield from loop.batches(loader, loop.epoch_order(loader, generator, epoch))


def plot(f: Finding) -> Image.Image:
    """The cost of each batch (faint) and its smoothed curve against the lr on a log axis, the suggestion marked."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    finite = [(lr, c) for lr, c in zip(f.lrs, f.costs, strict=True) if math.isfinite(c)]
    lrs = [lr for lr, _ in finite]
    ax.plot(lrs, [c for _, c in finite], color="0.78", lw=1, label="cost of each batch")
    ax.plot(lrs, f.smooth, color="C0", lw=2, label=f"smoothed (β = {BETA:g})")
    if f.suggestion is not None:
        ax.plot([f.lr], [f.smooth[f.suggestion]], "o", color="C3", ms=8, label=f"suggested lr {f.lr:.2g} (valley)")
    if f.smooth:  # from the lowest cost to the smoothed top, or its 4x line (a blow-up would flatten the rest)
        lo, hi = min(min(c for _, c in finite), *f.smooth), min(max(f.smooth), BLOW_UP * min(f.smooth))
        ax.set_ylim(lo - 0.15 * (hi - lo) - 1e-3, hi + 0.15 * (hi - lo) + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"cost ({f.cost_name})")
    ax.set_title(f"lr_find: {f.step_name}"[:90], fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def write(f: Finding, out: Path) -> None:
    """lr_find.png, and the TensorBoard run: lr, cost and smoothed cost per step, the picture, the config."""
    picture = plot(f)
    files.atomic_write(out / "lr_find.png", lambda file: picture.save(file, format="PNG", optimize=True))
    tb = Board(out)
    tb.text(yaml.safe_dump(f.config, sort_keys=False), f.data)
    tb.steps("lr_find/lr", f.lrs, 1)
    tb.steps("lr_find/cost", f.costs, 1)
    tb.steps("lr_find/smoothed_cost", f.smooth, 1)
    tb.picture("lr_find", picture, len(f.lrs))
    tb.close()


def out_dir(out: str | None, cfg: Config, config_name: str) -> Path:
    """--out, or <log.dir>/lr_find-<config stem>-<timestamp>; an existing folder gets a -2, -3, ... suffix."""
    if out is None:
        return files.make_run_dir(cfg.log.dir, f"lr_find-{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return files.make_run_dir(Path(out).parent, Path(out).name)


@contextlib.contextmanager
def made_first(out: str | None, cfg: Config, config_name: str):
    """out_dir, made before the test, so that a folder it cannot write is said before the work, in one sentence;
    removed again if the test fails, with the folders made above it, each only while it is empty."""
    base = Path(cfg.log.dir) if out is None else Path(out).parent
    missing = [folder for folder in [base, *base.parents] if not folder.exists()]
    try:
        made = out_dir(out, cfg, config_name)
    except OSError as e:
        where = "--out" if out is not None else "log.dir (or --out)"
        raise UserError(
            f"cannot write lr_find's results in {base} ({e.strerror}); set {where} to a folder you can write"
        ) from None
    try:
        yield made
    except BaseException:
        for folder in [made, *made.parents][: len(missing) + 1]:
            with contextlib.suppress(OSError):  # not empty: something else is in it, kept
                folder.rmdir()
        raise


def line(f: Finding, out: Path) -> str:
    """The one line: the suggestion and how it was chosen, and where and why the test stopped."""
    if f.suggestion is None:
        said = f"no suggestion: too few steps before the cost blew up; lower --min-lr (now {f.lrs[0]:.2g})"
    else:
        said = f"suggested lr {f.lr:.3g} (fastai's 'valley': halfway down the longest descent of the smoothed cost)"
    if len(f.lrs) < f.steps:
        stop = f"stopped early at lr {f.lrs[-1]:.3g}, step {len(f.lrs)} of {f.steps}, because the cost blew up"
        stop += f" ({f.blew_up})"
    else:
        stop = f"{f.steps} steps from lr {f.lrs[0]:.2g} to {f.lrs[-1]:.2g}"
    return f"{said}; {stop}; {out}/lr_find.png"


def main(argv=None) -> int:
    what = "fastai's learning-rate range test on a copy of the network: the lr rises exponentially, step by step, "
    what += "until the smoothed cost passes 4x its lowest; prints the suggested lr, writes lr_find.png and TensorBoard."
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.lr_find", description=what)
    p.add_argument("--config", help="YAML config (keys: hotdog_torch/config.py); without it, the schema's defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. optim.name=adamw")
    p.add_argument("--out", help="folder for lr_find.png and the TensorBoard run (default runs/lr_find-...)")
    p.add_argument("--min-lr", type=float, default=1e-7, help="the first step's lr (default 1e-7)")
    p.add_argument("--max-lr", type=float, default=10.0, help="the last step's lr (default 10)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps from --min-lr to --max-lr (default 100)")
    p.add_argument("--checkpoint", help="start from this checkpoint's network (only read) instead of a fresh one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_intermixed_args(argv)  # flags and positionals in any order
    warnings.showwarning = lambda message, *args, **kw: print(f"warning: {message}", file=sys.stderr)

    def command():
        check(a.min_lr, a.max_lr, a.steps)
        cfg = config.load(a.config, a.overrides)
        model = checkpoint.model_from(checkpoint.load(a.checkpoint)) if a.checkpoint else None
        progress = not a.no_progress and sys.stderr.isatty()
        with made_first(a.out, cfg, Path(a.config).stem if a.config else "run") as out:
            f = find(cfg, a.min_lr, a.max_lr, a.steps, model, progress)
        write(f, out)
        print(line(f, out), flush=True)

    return cli.exit_code(command, interrupted="nothing was written")


if __name__ == "__main__":
    cli.run(main)
