"""One epoch of training in three pieces, and the evaluation of a split.

    order = epoch_order(loader, generator, epoch, saved)   # the epoch's order: drawn, or restored mid-epoch
    for batch in batches(loader, order, window):          # this process's rows, gathered on the device
        for cost, outputs in step(batch): ...             # step.py: forward, cost, backward, update
    summary(...)                                          # the epoch's costs and wrong counts, every process's

A batch travels: positions from torch.randperm -> rows of the uint8 pool -> the device -> framed (data.augment)
-> normalised floats (x/255, then (x − mean)/std) -> the step.  Labels and one-hot targets are gathered once an
epoch; costs and outputs stay on the device until the epoch ends: no host sync inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import data, dist
from .cost import error_rate, half_mse, one_hot
from .data import Loader
from .step import Batch, Step


@dataclass
class Order:
    """An epoch's order of the training split and each image's framing (data.augment), and this process's rows of
    every batch; a resumed epoch starts at batch `start`, with what the batches before it gave."""

    positions: torch.Tensor  # the epoch's permutation of the split
    framings: torch.Tensor | None  # augment.draw's rows, in the epoch's order (None: not augmented)
    start: int = 0
    costs: torch.Tensor | None = None  # the batches' before start, and their wrong counts and lrs
    wrongs: torch.Tensor | None = None
    lrs: list[float] | None = None  # None: a last.pt from before lrs were saved
    mine: torch.Tensor | None = None  # this process's positions of the order (None: all, in one process)
    bounds: list[int] = field(default_factory=list)  # batch s is rows bounds[s]:bounds[s + 1] of this process's
    sizes: list[int] = field(default_factory=list)  # each whole batch's size


def epoch_order(loader: Loader, generator: torch.Generator, epoch: int, saved: dict | None = None) -> Order:
    """The epoch's order, drawn from the generator (then its framings, for the whole batches in every process), or
    restored from `saved`, an EpochResult.progress() of an epoch stopped part-way; and this process's share."""
    n, device = len(loader.split), loader.split.index.device
    if saved is None:
        positions = torch.randperm(n, generator=generator).to(device, non_blocking=True)
        framings = loader.framings(n, generator, epoch)
        o = Order(positions, None if framings is None else framings.to(loader.device, non_blocking=True))
    else:
        framings = saved.get("framings")
        o = Order(saved["order"].to(device), None if framings is None else framings.to(loader.device), saved["next"])
        o.costs, o.wrongs, o.lrs = saved["costs"], saved["wrongs"], saved.get("lrs")
    o.sizes = [min(loader.batch_size, n - s) for s in range(0, n, loader.batch_size)]
    o.mine, o.bounds = shares(o.sizes, loader.world)
    return o


def shares(sizes: list[int], world: dist.World) -> tuple[torch.Tensor | None, list[int]]:
    """This process's positions of an epoch's order, and where its part of each batch starts and ends among them:
    of each batch of B, rank r takes [B·r/W, B·(r+1)/W).  In one process: every position (None)."""
    starts, mine, bounds = [0], [], [0]
    for size in sizes:
        lo, hi = world.share(size)
        mine.append(torch.arange(starts[-1] + lo, starts[-1] + hi))
        starts.append(starts[-1] + size)
        bounds.append(bounds[-1] + hi - lo)
    return (torch.cat(mine), bounds) if world.distributed else (None, starts)


def batches(loader: Loader, o: Order, window: int = 1) -> Iterator[Batch]:
    """This process's rows of each batch from o.start on, `window` consecutive batches at a time (the windowed
    step's), each gathered from the pool, framed and normalised on the device when its turn comes."""
    mine = o.positions if o.mine is None else o.positions[o.mine.to(o.positions.device)]
    framings = o.framings if o.framings is None or o.mine is None else o.framings[o.mine.to(o.framings.device)]
    rows, labels = loader.split.index[mine], loader.split.labels[mine].to(loader.device)
    targets = one_hot(labels, loader.n_classes)
    weights = None if loader.class_weights is None else loader.class_weights[labels]
    for i in range(o.start, len(o.sizes), window):
        k = min(window, len(o.sizes) - i)
        lo, hi = o.bounds[i], o.bounds[i + k]
        x = loader.images(rows[lo:hi], None if framings is None else framings[lo:hi])
        counts = [o.bounds[s + 1] - o.bounds[s] for s in range(i, i + k)]
        yield Batch(x, targets[lo:hi], None if weights is None else weights[lo:hi], counts, o.sizes[i : i + k])


@dataclass
class EpochResult:
    """What one pass over the training split gives: its order, the batches taken (all of them unless stopped),
    each batch's cost and wrong count (every process's rows; on the device until asked for), each batch's lr."""

    order: torch.Tensor
    next: int
    costs: torch.Tensor
    wrongs: torch.Tensor
    lrs: list[float]
    framings: torch.Tensor | None = None  # data.augment: each image's framing, the epoch's draw in its order

    def progress(self) -> dict:
        """The part-way epoch as checkpoint.RunState.epoch_progress keeps it (for --resume)."""
        p = {"order": self.order, "next": self.next, "costs": self.costs, "wrongs": self.wrongs, "lrs": self.lrs}
        return p if self.framings is None else p | {"framings": self.framings}


def train_one_epoch(step: Step, loader: Loader, order: Order, schedule, should_stop=None, after=None) -> EpochResult:
    """The epoch's batches from order.start on, a step each (`step.window` batches a call); schedule.step() after
    every optimiser step, after(lo, hi) once batches [lo, hi) are taken.  Stops early when should_stop() says so."""
    costs, outputs, i = torch.zeros(len(order.sizes), device=loader.device), [], order.start
    lrs = [schedule.lr] * i if order.lrs is None else list(order.lrs)  # a resumed epoch's batches before it
    for batch in batches(loader, order, step.window):
        if should_stop is not None and should_stop():
            break
        lrs += [schedule.lr] * len(batch.rows)
        for j, (cost, out) in enumerate(step(batch)):
            costs[i + j] = cost
            outputs.append(out)
        i += len(batch.rows)
        schedule.step(len(batch.rows))
        if after is not None:
            after(i - len(batch.rows), i)
    return summary(loader, order, costs, outputs, lrs, i)


def summary(loader: Loader, o: Order, costs: torch.Tensor, outputs: list, lrs: list[float], i: int) -> EpochResult:
    """Each batch's cost and wrong count, every process's part summed; a resumed epoch's earlier batches in front."""
    mine = o.positions if o.mine is None else o.positions[o.mine.to(o.positions.device)]
    labels = loader.split.labels[mine[o.bounds[o.start] : o.bounds[i]]].to(loader.device)
    out = torch.cat(outputs) if outputs else torch.empty(0, loader.n_classes, device=loader.device)
    wrongs = wrong_counts(out, labels, [o.bounds[s + 1] - o.bounds[s] for s in range(o.start, i)])
    dist.all_sum(loader.world, costs[o.start : i])
    dist.all_sum(loader.world, wrongs)
    if o.start:
        costs[: o.start] = o.costs.to(loader.device)
        wrongs = torch.cat([o.wrongs.to(loader.device), wrongs])
    return EpochResult(o.positions, i, costs[:i], wrongs, lrs, o.framings)


def wrong_counts(outputs: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """How many images of each batch were wrongly identified, the batches' rows (sizes[s] of them) one after another."""
    wrong = (outputs.argmax(dim=1) != labels).to(torch.int64)
    b = max(sizes, default=1)
    if all(size == b for size in sizes[:-1]):  # equal batches, the last maybe short: no data from the host
        padded = wrong.new_zeros(len(sizes) * b)
        padded[: len(wrong)] = wrong
        return padded.view(-1, b).sum(dim=1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(wrong.device, non_blocking=True)
    return torch.zeros(len(sizes), dtype=torch.int64, device=wrong.device).index_add_(0, batch, wrong)


@torch.no_grad()
def evaluate(
    model, split: data.Split, mean, std, n_classes, chunk=1024, world=dist.SINGLE, cost=half_mse, weights=None
):
    """Cost, error rate and accuracy of the whole split, and every output score.  The cost is `cost` (training's
    optim.cost), each image weighted by its class's entry of `weights` (optim.class_weights) as in training.
    Under torchrun each process scores its contiguous share and the scores are gathered: every process holds the
    whole split's and computes the same figures from them."""
    model.eval()
    device = next(model.parameters()).device
    positions = torch.arange(*world.share(len(split)), device=split.index.device)
    mine = [model(data.normalise(split.batch(p).to(device), mean, std)).float() for p in positions.split(chunk)]
    mine = torch.cat(mine) if mine else torch.empty(0, n_classes, device=device)  # a share of no images
    outputs = dist.all_rows(world, mine, len(split))
    labels = split.labels.to(device)
    c = cost(outputs, one_hot(labels, n_classes), None if weights is None else weights.to(device)[labels]).item()
    err = error_rate(outputs, labels).item()
    model.train()
    return {"cost": c, "error_rate": err, "accuracy": 1 - err, "outputs": outputs}
