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

from . import data
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
    scale: torch.Tensor = field(init=False)  # data.normalise's constants, computed once
    shift: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.scale = (1 / (255 * self.std)).view(1, -1, 1, 1)
        self.shift = (self.mean / self.std).view(1, -1, 1, 1)

    def steps(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """These rows of the pool, on the device, normalised (as data.normalise does)."""
        return self.split.images[rows].to(self.device, non_blocking=True).float().mul_(self.scale).sub_(self.shift)

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


def train_one_epoch(
    step: Step, feed: Feed, generator, resume=None, should_stop=lambda: False, first_step=0, log_every=0, on_log=None
) -> dict:
    """One pass over the training split in shuffled batches.

    Returns {"order", "next", "costs", "wrongs"}: the epoch's batch order, the
    number of steps taken (all of them unless should_stop() said stop), and the
    per-step costs and wrong counts.  These stay on the device until the caller
    asks for them: no host sync inside the epoch, except on_log(global_step),
    called every log_every steps.  resume, a dict of the same form saved
    mid-epoch, continues that epoch where it stopped.
    """
    n, n_steps, b, split = len(feed.split), feed.steps(), feed.batch_size, feed.split
    if resume is None:
        order, start = torch.randperm(n, generator=generator, device=split.index.device), 0
    else:
        order, start = resume["order"].to(split.index.device), resume["next"]
    rows, labels = split.index[order], split.labels[order].to(feed.device)  # the epoch's images, in batch order
    targets = one_hot(labels, feed.n_classes)
    outputs = torch.empty(n, feed.n_classes, device=feed.device)
    costs = torch.zeros(n_steps, device=feed.device)
    i = start
    while i < n_steps and not should_stop():
        k = min(step.window, n_steps - i)  # the window's batches, one after another
        first, end = i * b, min((i + k) * b, n)
        sizes = [b] * (k - 1) + [end - first - (k - 1) * b]
        for j, (cost, out) in enumerate(step(feed.images(rows[first:end]), targets[first:end], sizes)):
            costs[i + j] = cost
            outputs[first + j * b : first + j * b + sizes[j]] = out
        i += k
        if log_every and any((first_step + s + 1) % log_every == 0 for s in range(i - k, i)):
            on_log(first_step + i)  # at the end of the window that held the log step
    wrongs = wrong_counts(outputs[start * b : min(i * b, n)], labels[start * b : min(i * b, n)], b)
    if resume is not None:
        costs[:start] = resume["costs"].to(feed.device)
        wrongs = torch.cat([resume["wrongs"].to(feed.device), wrongs])
    return {"order": order, "next": i, "costs": costs[:i], "wrongs": wrongs}


def wrong_counts(outputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """How many of each batch's images were wrongly identified, the batches being consecutive rows."""
    wrong = (outputs.argmax(dim=1) != labels).to(torch.int64)
    padded = wrong.new_zeros(math.ceil(len(wrong) / batch_size) * batch_size)
    padded[: len(wrong)] = wrong
    return padded.view(-1, batch_size).sum(dim=1)


@torch.no_grad()
def evaluate(model, split: data.Split, mean, std, n_classes, device=None, chunk=1024) -> dict:
    """Cost, error rate and accuracy of the whole split, plus every output score."""
    model.eval()
    device = device or next(model.parameters()).device
    positions = torch.arange(len(split), device=split.index.device)
    batches = (data.normalise(split.batch(p).to(device), mean, std) for p in positions.split(chunk))
    outputs = torch.cat([model(x).float() for x in batches])
    labels = split.labels.to(device)
    cost = half_mse(outputs, one_hot(labels, n_classes)).item()
    err = error_rate(outputs, labels).item()
    model.train()
    return {"cost": cost, "error_rate": err, "accuracy": 1 - err, "outputs": outputs}
