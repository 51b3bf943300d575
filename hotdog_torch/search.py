"""The shot in the dark: random search over every weight, the seed's foil for gradient descent.

Each pass draws every weight and bias afresh from the initial distribution, scores the
draw on the whole training set and keeps it when it beats the best so far.  No gradient
is ever computed.  A pass is charged like one epoch of gradient descent.
"""

from __future__ import annotations

import copy

import torch

from .cost import half_mse
from .loop import EpochResult, Feed, evaluate
from .model import linear_layers

NAME = "random search (a fresh draw of every weight per pass, the best kept; no gradients)"


@torch.no_grad()
def random_search_pass(model, candidate, split, mean, std, n_classes, kept, cost=half_mse, weights=None):
    """One pass of the shot in the dark: draw every weight and bias afresh from the initial distribution,
    score the candidate on the whole training set, and keep it if its error rate (then cost: optim.cost, weighted
    by class as training is) beats the best so far.

    Returns (the candidate's score, the kept score).  No gradient is computed.
    """
    for layer in linear_layers(candidate):
        layer.reset_parameters()
    r = evaluate(candidate, split, mean, std, n_classes, cost=cost, weights=weights)
    score = {"error_rate": r["error_rate"], "cost": r["cost"]}
    if kept is None or (score["error_rate"], score["cost"]) < (kept["error_rate"], kept["cost"]):
        model.load_state_dict(candidate.state_dict())
        kept = score
    return score, kept


class Search:
    """Random search's own small loop: each pass, one draw (a pass is charged as many steps as an epoch of
    gradient descent, so the two share one x axis); the kept draw's score lives in the run's state."""

    def __init__(self, model, feed: Feed, cost=half_mse):
        self.model, self.feed, self.candidate, self.cost = model, feed, copy.deepcopy(model), cost

    def epoch(self, state, tb, stop, first: int) -> EpochResult:
        f, none = self.feed, torch.zeros(0)
        if stop():
            return EpochResult(None, 0, none, none, [])
        score, kept = random_search_pass(
            self.model,
            self.candidate,
            f.split,
            f.mean,
            f.std,
            f.n_classes,
            state.search_kept,
            self.cost,
            f.class_weights,
        )
        state.search_kept = kept
        cost, wrong = torch.tensor([kept["cost"]]), torch.tensor([round(kept["error_rate"] * len(f.split))])
        return EpochResult(None, f.steps(), cost, wrong, [], candidate=score)  # one point, at the pass's last step
