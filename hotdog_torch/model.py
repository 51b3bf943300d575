"""The feedforward network: Flatten -> (Linear + activation) per hidden width -> Linear -> sigmoid.

Each Linear layer is a row of artificial neurons: every neuron takes a weighted
sum of its inputs plus a bias and passes it through the activation.  With
hidden=[] the network is one layer of perceptron-like sigmoid neurons reading
the pixels directly.  There is one output neuron per class; its sigmoid output
is that class's score in (0, 1).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
FUNCTIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}  # the same, as plain functions


def build_model(
    in_features: int, hidden: list[int], n_classes: int, activation: str = "sigmoid", dropout: float = 0.0
) -> nn.Sequential:
    """dropout > 0: an nn.Dropout after each hidden layer's activation (in training only)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    layers += [nn.Linear(width, n_classes), nn.Sigmoid()]
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The MLP's Linear layers in order (of a network with a router, router.Routed, the classifier's)."""
    return [m for m in getattr(model, "classifier", model) if isinstance(m, nn.Linear)]


def input_side(image_size: int, router_size: int | None) -> int:
    """The side of the pictures the classifier judges: the data's, or with a router the router's (model.router.size:
    it un-warps each picture to that side, so it may sample a larger one)."""
    return image_size if router_size is None else router_size


def neuron_pictures(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Each first-layer neuron's weights as an input image, (N, C, S, S) uint8, scaled to 0..255 per neuron:
    what it looks for (bright: pixels that excite it, dark: pixels that inhibit it)."""
    size = round((weight.shape[1] / channels) ** 0.5)
    w = weight.detach().float().cpu().view(-1, channels, size, size)
    lo = w.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    hi = w.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return ((w - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)
