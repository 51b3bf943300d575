"""One epoch over shuffled index batches, and the evaluation of a split.

A batch travels: positions from torch.randperm -> rows of the uint8 pool (split.batch) ->
the device -> normalised floats (data.normalise) -> the step, which updates the weights.
Costs and wrong counts stay on the device until the epoch ends: no host sync inside it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import data
from .cost import error_rate, half_mse, one_hot, wrong
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

    def steps(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, labels) at these positions of the split, on the device."""
        x = data.normalise(self.split.batch(positions).to(self.device, non_blocking=True), self.mean, self.std)
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
    n, n_steps, b = len(feed.split), feed.steps(), feed.batch_size
    costs = torch.zeros(n_steps, device=feed.device)
    wrongs = torch.zeros(n_steps, dtype=torch.int64, device=feed.device)
    if resume is None:
        order, start = torch.randperm(n, generator=generator, device=feed.split.index.device), 0
    else:
        order, start = resume["order"].to(feed.split.index.device), resume["next"]
        costs[:start], wrongs[:start] = resume["costs"].to(feed.device), resume["wrongs"].to(feed.device)
    i = start
    while i < n_steps:
        if should_stop():
            return {"order": order, "next": i, "costs": costs[:i], "wrongs": wrongs[:i]}
        steps = range(i, min(i + step.window, n_steps))
        pos = order[i * b : (steps[-1] + 1) * b]  # the window's batches, one after another
        x, y = feed.batch(pos)
        sizes = [min(b, len(pos) - k * b) for k in range(len(steps))]
        for j, labels, (cost, outputs) in zip(
            steps, y.split(sizes), step(x, one_hot(y, feed.n_classes), sizes), strict=True
        ):
            costs[j] = cost
            wrongs[j] = wrong(outputs, labels)
        i = steps[-1] + 1
        if log_every and any((first_step + j + 1) % log_every == 0 for j in steps):
            on_log(first_step + i)  # at the end of the window that held the log step
    return {"order": order, "next": n_steps, "costs": costs, "wrongs": wrongs}


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
