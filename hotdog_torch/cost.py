"""The cost gradient descent minimises, and the seed's first (unusable) cost.

cost  C = 1/2 * mean over the batch of sum over outputs of (a - y)^2
      where a is the network's output and y the one-hot target.  Smooth: a
      small change of any weight changes C a little, so its slope says which
      way to move every weight.
error rate = (# wrongly identified) / (total).  A step function of the
      weights: a small change almost never changes it, so it has no slope.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, n_classes: int, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(labels, n_classes).to(dtype)


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """C = 1/2 * mean_batch sum_outputs (a - y)^2, for outputs and one-hot targets of shape (B, K)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def wrong(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions (the highest-scoring class) are wrong, as a 0-d tensor."""
    return (outputs.argmax(dim=1) != labels).sum()


def error_rate(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return wrong(outputs, labels).float() / len(labels)
