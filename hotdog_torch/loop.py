"""One epoch over shuffled index batches, and the evaluation of a split.

A batch travels: positions from torch.randperm -> rows of the uint8 pool -> the device ->
normalised floats (x/255, then (x − mean)/std) -> the step, which updates the weights.
The epoch's order, labels and one-hot targets are gathered once, so a step costs one gather
of images; costs and outputs stay on the device until the epoch ends (wrong counts are
taken from the outputs then): no host sync inside it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from . import augment, data, dist
from .config import Augment
from .cost import error_rate, half_mse, one_hot
from .step import Step


@dataclass
class Feed:
    """Where a loop's batches come from: rows of a split's uint8 pool by index, moved to the device, normalised."""

    split: data.Split
    mean: torch.Tensor
    std: torch.Tensor
    batch_size: int
    n_classes: int
    device: torch.device
    world: dist.World = dist.SINGLE  # under torchrun, this process takes its share of every batch
    class_weights: torch.Tensor | None = None  # each class's weight in the training cost (optim.class_weights)
    augment: Augment | None = None  # data.augment: each image framed afresh at every step (when enabled)
    router: torch.nn.Module | None = None  # model.router, once trained: each picture un-warped before the classifier
    scale: torch.Tensor = field(init=False)  # data.normalise's constants, computed once
    shift: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.scale = (1 / (255 * self.std)).view(1, -1, 1, 1)
        self.shift = (self.mean / self.std).view(1, -1, 1, 1)

    def steps(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def images_in(self, start: int, stop: int) -> int:
        """The images of an epoch's steps [start, stop), every process's share."""
        return min(stop * self.batch_size, len(self.split)) - min(start * self.batch_size, len(self.split))

    def images(self, rows: torch.Tensor, framings: torch.Tensor | None = None) -> torch.Tensor:
        """These rows of the pool, on the device, framed by their rows of augment.draw (if any), normalised."""
        x = self.split.images[rows]
        if framings is not None:  # framed on the device, from uint8 there: floats 0..255
            x = augment.apply(x.to(self.device, non_blocking=True), framings, self.augment.border)
        x = self.normalised(x)
        if self.router is not None:  # found, then judged: the classifier learns from the pictures the router un-warps
            with torch.no_grad():
                x = self.router(x)
        return x

    def framings(self, n: int, generator: torch.Generator, epoch: int) -> torch.Tensor | None:
        """The framing of each of an epoch's n images, in the epoch's order (None: not augmented).  Drawn for the
        whole batches in every process, from the batch order's generator, so each process takes its own rows."""
        a = self.augment
        return augment.draw(a, n, generator, augment.strength(a, epoch)) if a is not None and a.enabled else None

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float().mul_(self.scale).sub_(self.shift)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, labels) at these positions of the split, on the device."""
        x = self.images(self.split.index[positions])
        return x, self.split.labels[positions].to(self.device, non_blocking=True)


def clamp_batch_size(batch_size: int | None, n: int) -> int:
    """optim.batch_size, or the whole training set for null or anything larger (with a warning)."""
    if batch_size is not None and batch_size > n:
        message = (
            f"optim.batch_size {batch_size} is larger than the {n} training images; using full-batch gradient descent"
        )
        warnings.warn(message, stacklevel=4)
    return min(batch_size or n, n)


def epoch_plan(n: int, batch_size: int, world: dist.World) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Which positions of an epoch's order this process trains on, where each step's rows start and end among
    them, and each step's whole batch size: (positions, bounds, totals).  In one process: all (None)."""
    totals = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    if not world.distributed:
        return None, [min(s, n) for s in range(0, n + batch_size, batch_size)][: len(totals) + 1], totals
    p = torch.arange(n)
    step, offset = p // batch_size, p % batch_size
    total = torch.tensor(totals)[step]
    mine = (offset >= total * world.rank // world.size) & (offset < total * (world.rank + 1) // world.size)
    counts = torch.bincount(step[mine], minlength=len(totals)).tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return p[mine], bounds, totals


@dataclass
class EpochResult:
    """What one pass over the training split gives: its batch order, the steps taken (all of them unless stopped),
    each step's cost and wrong count of the whole batch (summed over torchrun's processes; on the device until
    asked for) and the lr each step used.  `candidate`: random search's score of this pass's draw."""

    order: torch.Tensor | None
    next: int
    costs: torch.Tensor
    wrongs: torch.Tensor
    lrs: list[float]
    candidate: dict | None = None
    framings: torch.Tensor | None = None  # data.augment: each image's framing, the epoch's draw in its order

    def progress(self) -> dict | None:
        """The part-way epoch as checkpoint.RunState.epoch_progress keeps it (for --resume; None: random search)."""
        if self.order is None:
            return None
        p = {"order": self.order, "next": self.next, "costs": self.costs, "wrongs": self.wrongs, "lrs": self.lrs}
        return p if self.framings is None else p | {"framings": self.framings}


def train_one_epoch(
    step: Step,
    feed: Feed,
    generator,
    schedule,
    resume=None,
    should_stop=lambda: False,
    first_step=0,
    log_every=0,
    on_log=None,
) -> EpochResult:
    """One pass over the training split in shuffled batches; schedule.step() after every optimiser step.

    No host sync inside the epoch, except on_log(global_step), called every log_every steps.  resume, an
    EpochResult.progress() saved mid-epoch, continues that epoch where it stopped.  With data.augment enabled, each
    image is framed by its row of the epoch's framings, drawn after the order, from the same generator, for the
    whole batches (each process takes its own rows), at the strength of the curriculum for this epoch, the
    (first_step // steps an epoch + 1)th.
    """
    n, n_steps, split, world = len(feed.split), feed.steps(), feed.split, feed.world
    if resume is None:
        order, start = torch.randperm(n, generator=generator).to(split.index.device, non_blocking=True), 0
        drawn = feed.framings(n, generator, first_step // n_steps + 1)
        drawn = None if drawn is None else drawn.to(feed.device, non_blocking=True)  # once an epoch, as the order
    else:
        order, start, drawn = resume["order"].to(split.index.device), resume["next"], resume.get("framings")
        drawn = None if drawn is None else drawn.to(feed.device)
    positions, bounds, totals = epoch_plan(n, feed.batch_size, world)
    mine = order if positions is None else order[positions.to(order.device)]  # this process's images, in order
    framings = drawn if drawn is None or positions is None else drawn[positions.to(drawn.device)]  # as one process
    rows, labels = split.index[mine], split.labels[mine].to(feed.device)
    targets = one_hot(labels, feed.n_classes)
    weights = None if feed.class_weights is None else feed.class_weights[labels]
    outputs = torch.empty(len(mine), feed.n_classes, device=feed.device)
    costs = torch.zeros(n_steps, device=feed.device)
    lrs = list(resume.get("lrs", [schedule.lr] * start)) if resume else []  # the lr each step used
    i = start
    while i < n_steps and not should_stop():
        k = min(step.window, n_steps - i)  # the window's batches, one after another
        lo, hi = bounds[i], bounds[i + k]
        x = feed.images(rows[lo:hi], None if framings is None else framings[lo:hi])  # a window at a time
        sizes = [bounds[s + 1] - bounds[s] for s in range(i, i + k)]
        lrs += [schedule.lr] * k
        w = None if weights is None else weights[lo:hi]
        for j, (cost, out) in enumerate(step(x, targets[lo:hi], sizes, totals[i : i + k], w)):
            costs[i + j] = cost
            outputs[bounds[i + j] : bounds[i + j + 1]] = out
        schedule.step(k)
        i += k
        if log_every and any((first_step + s + 1) % log_every == 0 for s in range(i - k, i)):
            on_log(first_step + i)  # at the end of the window that held the log step
    sizes = [bounds[s + 1] - bounds[s] for s in range(start, i)]
    wrongs = wrong_counts(outputs[bounds[start] : bounds[i]], labels[bounds[start] : bounds[i]], sizes)
    dist.all_sum(world, costs[start:i])  # the whole batches' figures: every process's part, summed
    dist.all_sum(world, wrongs)
    if resume is not None:
        costs[:start] = resume["costs"].to(feed.device)
        wrongs = torch.cat([resume["wrongs"].to(feed.device), wrongs])
    return EpochResult(order, i, costs[:i], wrongs, lrs, framings=drawn)


def wrong_counts(outputs: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """How many images of each step were wrongly identified, the steps' rows (sizes[s] of them) one after another."""
    wrong = (outputs.argmax(dim=1) != labels).to(torch.int64)
    b = max(sizes, default=1)
    if all(size == b for size in sizes[:-1]):  # equal batches, the last maybe short: no data from the host
        padded = wrong.new_zeros(len(sizes) * b)
        padded[: len(wrong)] = wrong
        return padded.view(-1, b).sum(dim=1)
    step = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(wrong.device, non_blocking=True)
    return torch.zeros(len(sizes), dtype=torch.int64, device=wrong.device).index_add_(0, step, wrong)


@torch.no_grad()
def evaluate(
    model,
    split: data.Split,
    mean,
    std,
    n_classes,
    device=None,
    chunk=1024,
    world=dist.SINGLE,
    cost=half_mse,
    weights=None,
) -> dict:
    """Cost, error rate and accuracy of the whole split, plus every output score.

    The cost is `cost` (training's optim.cost: ½·MSE by default), each image weighted by its class's entry of
    `weights` (optim.class_weights) as the training cost is.

    Under torchrun (world) each process scores its contiguous share of the split and the scores are gathered,
    so every process holds the whole split's and computes the same figures from them.
    """
    model.eval()
    device = device or next(model.parameters()).device
    lo, hi = world.share(len(split))
    positions = torch.arange(lo, hi, device=split.index.device)
    batches = (data.normalise(split.batch(p).to(device), mean, std) for p in positions.split(chunk))
    mine = [model(x).float() for x in batches]
    mine = torch.cat(mine) if mine else torch.empty(0, n_classes, device=device)  # a share of no images
    outputs = dist.all_rows(world, mine, len(split))
    labels = split.labels.to(device)
    c = cost(outputs, one_hot(labels, n_classes), None if weights is None else weights.to(device)[labels]).item()
    err = error_rate(outputs, labels).item()
    model.train()
    return {"cost": c, "error_rate": err, "accuracy": 1 - err, "outputs": outputs}
