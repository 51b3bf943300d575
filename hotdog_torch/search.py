"""The shot in the dark: random search over every weight, the seed's foil for gradient descent.

Each pass draws every weight and bias afresh from the initial distribution, scores the
draw on the whole training set and keeps it when it beats the best so far.  No gradient
is ever computed.  A pass is charged like one epoch of gradient descent.
"""

from __future__ import annotations

import torch

from .loop import evaluate
from .model import linear_layers

NAME = "random search (a fresh draw of every weight per pass, the best kept; no gradients)"


@torch.no_grad()
def random_search_pass(model, candidate, split, mean, std, n_classes, kept):
    """One pass of the shot in the dark: draw every weight and bias afresh from the initial distribution,
    score the candidate on the whole training set, and keep it if its error rate (then cost) beats the best so far.

    Returns (the candidate's score, the kept score).  No gradient is computed.
    """
    for layer in linear_layers(candidate):
        layer.reset_parameters()
    r = evaluate(candidate, split, mean, std, n_classes)
    score = {"error_rate": r["error_rate"], "cost": r["cost"]}
    if kept is None or (score["error_rate"], score["cost"]) < (kept["error_rate"], kept["cost"]):
        model.load_state_dict(candidate.state_dict())
        kept = score
    return score, kept
