"""The cost and one gradient-descent step, checked against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch

from hotdog_torch import cost
from hotdog_torch.model import build_model, linear_layers


def test_half_mse_is_the_hand_formula():
    a = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.1, 0.1]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # ½ · mean over the 3 images of the squared error summed over the 2 outputs
    by_hand = 0.5 * (((0.9 - 1) ** 2 + 0.2**2) + (0.4**2 + (0.7 - 1) ** 2) + ((0.1 - 1) ** 2 + 0.1**2)) / 3
    assert abs(cost.half_mse(a, y).item() - by_hand) < 1e-7


def test_error_rate_counts_the_wrongly_identified():
    a = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.1, 0.3], [0.6, 0.5]])
    labels = torch.tensor([0, 1, 0, 0])
    assert cost.wrong(a, labels).item() == 1  # only the third image
    assert cost.error_rate(a, labels).item() == 0.25


def test_one_sgd_step_is_w_minus_lr_times_the_hand_gradient():
    torch.manual_seed(0)
    model = build_model(6, [4], 2, "sigmoid").double()
    x = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])
    y = cost.one_hot(labels, 2, torch.float64)
    l1, l2 = linear_layers(model)
    W1, b1, W2, b2 = (p.detach().clone() for p in (l1.weight, l1.bias, l2.weight, l2.bias))

    # forward and backpropagation, written out
    s = torch.sigmoid
    h = s(x @ W1.T + b1)
    a = s(h @ W2.T + b2)
    d2 = (a - y) * a * (1 - a) / len(x)  # ∂C/∂z2 for C = ½·mean Σ (a − y)²
    d1 = (d2 @ W2) * h * (1 - h)  # ∂C/∂z1
    grads = [d1.T @ x, d1.sum(0), d2.T @ h, d2.sum(0)]

    lr = 0.7
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    c = cost.half_mse(model(x), y)
    optimizer.zero_grad()
    c.backward()
    optimizer.step()
    for p, before, g in zip((l1.weight, l1.bias, l2.weight, l2.bias), (W1, b1, W2, b2), grads, strict=True):
        assert torch.allclose(p.detach(), before - lr * g, atol=1e-12)


def test_zero_hidden_layers_is_one_layer_of_sigmoid_neurons():
    model = build_model(16384, [], 2)
    (layer,) = linear_layers(model)
    assert layer.weight.shape == (2, 16384)
    x = torch.rand(3, 1, 128, 128)
    assert torch.allclose(model(x), torch.sigmoid(x.flatten(1) @ layer.weight.T + layer.bias))


def test_the_validation_cost_is_the_configured_cost_weighted_as_training_is(tiny_tree, make_config):
    """optim.cost=cross_entropy with class weights: val_cost (which plateau, train.monitor=val_cost and best.pt
    follow) is that weighted cross-entropy of the validation split, not ½·MSE."""
    import json

    from hotdog_torch import checkpoint, data, train

    cfg = make_config(tiny_tree, "optim.cost=cross_entropy", "optim.class_weights=[2.0,0.5]", "train.epochs=1")
    run_dir = train.run(cfg, progress=False)
    val_cost = json.loads((run_dir / "metrics.json").read_text())["val_cost"]
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    ds = data.prepare(cfg.data, cfg.seed, False, None)
    x = data.normalise(ds.val.batch(torch.arange(len(ds.val))), torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]))
    with torch.no_grad():
        outputs = checkpoint.model_from(ckpt)(x)
    weights = torch.tensor([2.0, 0.5])[ds.val.labels]
    expected = cost.cross_entropy(outputs, cost.one_hot(ds.val.labels, 2), weights).item()
    assert val_cost == pytest.approx(expected, rel=1e-5)
