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

from .config import UserError


def one_hot(labels: torch.Tensor, n_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, K) targets, 1 at each label (a scatter: unlike F.one_hot, no check that waits for the GPU)."""
    out = torch.zeros(len(labels), n_classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1)


def half_mse(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """C = 1/2 * mean_batch sum_outputs (a - y)^2, for outputs and one-hot targets of shape (B, K); with weights,
    each image's term weighted by its class's weight (optim.class_weights)."""
    if weights is not None:
        return 0.5 * (((outputs - targets) ** 2).sum(dim=1) * weights).mean()
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def wrong(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions (the highest-scoring class) are wrong, as a 0-d tensor."""
    return (outputs.argmax(dim=1) != labels).sum()


def error_rate(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return wrong(outputs, labels).float() / len(labels)


def confusion_matrix(outputs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    predicted = outputs.argmax(dim=1)
    return torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).view(n_classes, n_classes)


def per_class(confusion: torch.Tensor, classes: list[str]) -> dict:
    """Precision, recall and F1 of each class, and the balanced accuracy (mean recall).

    With 1000 hot dogs against 5000 others, accuracy flatters: always answering
    "not hot dog" scores 83%, but its balanced accuracy is 50% and hot_dog's recall 0.
    """
    c = confusion.double()
    tp = c.diag()
    predicted, actual = c.sum(dim=0), c.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros_like(tp)
    )
    out = {
        name: {
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(actual[i]),
        }
        for i, name in enumerate(classes)
    }
    present = actual > 0
    return {"classes": out, "balanced_accuracy": recall[present].mean().item() if present.any() else 0.0}


def error_rate_cost(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's first cost, # wrong / total, written so that autograd can differentiate it.

    An image is wrong when its true class's score is not above every other: wrong =
    ceil(clamp(-margin, 0, 1)), a step function of the weights.  Its slope is 0
    wherever it is defined, so gradient descent on it never moves: that is the lesson.
    """
    true_score = (outputs * targets).sum(dim=1)
    best_other = (outputs - 2 * targets).max(dim=1).values  # the true class pushed out of the running
    wrong = torch.ceil(torch.clamp(best_other - true_score, 0, 1))
    return (wrong if weights is None else wrong * weights).mean()


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Not the seed's cost: binary cross-entropy of each sigmoid output, summed over outputs, mean over the batch.
    A diverged network's NaN outputs make it NaN, as they make ½·MSE, for the divergence watch to see: torch's
    binary_cross_entropy refuses them (an error, on the CPU), so they are scored as 0.5 and the cost set to NaN
    after, with no host sync."""
    broken = outputs.isnan().any()
    outputs = outputs.nan_to_num(0.5)
    if weights is not None:
        c = (F.binary_cross_entropy(outputs, targets, reduction="none").sum(dim=1) * weights).mean()
    else:
        c = F.binary_cross_entropy(outputs, targets, reduction="sum") / len(outputs)
    return torch.where(broken, torch.nan, c)


COSTS = {"half_mse": half_mse, "error_rate": error_rate_cost, "cross_entropy": cross_entropy}


def class_weights(given, labels: torch.Tensor, classes: list[str]) -> torch.Tensor | None:
    """optim.class_weights as one number per class: balanced = n / (classes · n_class), as scikit-learn's."""
    if given is None:
        return None
    if given == "balanced":
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        return torch.tensor([len(labels) / (len(counts) * max(c, 1)) for c in counts])
    if len(given) != len(classes):
        raise UserError(f"optim.class_weights has {len(given)} weights for the {len(classes)} classes {classes}")
    return torch.tensor([float(w) for w in given])
