"""The fast paths compute the same thing as the plain ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hotdog_torch import checkpoint, config, cost, step, train
from hotdog_torch.model import build_model, linear_layers


def twins(hidden, activation, lr, seed, momentum=0.0, nesterov=False, weight_decay=0.0):
    """A float64 MLP with hotdog_torch's fused step (FusedSGD), and a copy of it with autograd + torch.optim.SGD."""
    torch.manual_seed(seed)
    a = build_model(12, hidden, 3, activation).double()
    b = copy.deepcopy(a)
    optimizer = torch.optim.SGD(b.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    options = [
        f"optim.momentum={momentum}",
        f"optim.nesterov={str(nesterov).lower()}",
        f"optim.weight_decay={weight_decay}",
    ]
    common = [f"optim.lr={lr}", *options, f"model.activation={activation}", "train.precision=fp32"]  # float64 maths
    cpu = torch.device("cpu")
    autograd_step = step.make_step(b, config.load(None, [*common, "optim.fused=false"]), cpu, optimizer=optimizer)
    assert autograd_step.name.startswith("autograd")
    cfg = config.load(None, [*common, "optim.fused_window=1"])
    fused = step.FusedSGD(a.parameters(), lr, momentum, nesterov, weight_decay)
    fused_step = step.make_step(a, cfg, cpu, optimizer=fused)
    assert fused_step.name.startswith("fused SGD") and fused_step.window == 1
    return a, b, fused_step, autograd_step, fused, optimizer


def batch(n, dtype=torch.float64):
    return torch.randn(n, 12, dtype=dtype), cost.one_hot(torch.randint(0, 3, (n,)), 3, dtype)


def assert_same(a, b, *pairs, atol=1e-10):
    for x, y in pairs:
        assert torch.allclose(x, y, rtol=0, atol=atol)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=atol)
        assert not torch.equal(pa, torch.zeros_like(pa))


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("hidden", [[], [7], [9, 5]])
def test_fused_sgd_step_equals_autograd_and_torch_optim(activation, hidden):
    a, b, fused_step, autograd_step, _, _ = twins(hidden, activation, 0.3, seed=0)
    for _ in range(5):
        x, t = batch(8)
        ((c1, out1),) = fused_step(step.Batch(x, t))
        ((c2, out2),) = autograd_step(step.Batch(x, t))
        assert_same(a, b, (c1, c2), (out1, out2))


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("hidden", [[], [7], [9, 5]])
@pytest.mark.parametrize("window", [2, 3, 4])
def test_windowed_first_layer_updates_are_the_same_sgd(activation, hidden, window):
    a, b, _, autograd_step, fused, _ = twins(hidden, activation, 0.4, seed=1)
    sizes = [8] * (window - 1) + [5]  # the last batch of an epoch may be short
    xs, ts = zip(*(batch(n) for n in sizes), strict=True)
    layers = linear_layers(a)
    windowed = step.sgd_window(layers, fused, activation, step.Batch(torch.cat(xs), torch.cat(ts), rows=sizes))
    for (c1, out1), x, t in zip(windowed, xs, ts, strict=True):
        ((c2, out2),) = autograd_step(step.Batch(x, t))  # one ordinary step after another
        assert torch.allclose(c1, c2, atol=1e-12) and torch.allclose(out1, out2, atol=1e-12)
    assert_same(a, b, atol=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("hidden", [[], [7], [9, 5]])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_momentum_equals_autograd_and_torch_optim_step_by_step(activation, hidden, nesterov, weight_decay):
    a, b, fused_step, autograd_step, fused, optimizer = twins(
        hidden, activation, 0.3, seed=2, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )
    for n in (8, 8, 8, 8, 5):  # the last batch of an epoch may be short
        x, t = batch(n)
        ((c1, out1),) = fused_step(step.Batch(x, t))
        ((c2, out2),) = autograd_step(step.Batch(x, t))
        assert_same(a, b, (c1, c2), (out1, out2))
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.allclose(
                fused.state[pa]["momentum_buffer"], optimizer.state[pb]["momentum_buffer"], atol=1e-10
            )


@pytest.mark.parametrize("hidden", [[], [9, 5]])
def test_plain_sgd_with_weight_decay_equals_torch_optim(hidden):
    a, b, fused_step, autograd_step, _, _ = twins(hidden, "sigmoid", 0.3, seed=4, weight_decay=0.1)
    for n in (8, 8, 5):
        x, t = batch(n)
        ((c1, out1),) = fused_step(step.Batch(x, t))
        ((c2, out2),) = autograd_step(step.Batch(x, t))
        assert_same(a, b, (c1, c2), (out1, out2))


def test_the_fused_momentum_velocity_is_torch_optims_buffer():
    model = build_model(6, [4], 2).double()
    cfg = config.load(None, ["optim.momentum=0.9", "optim.lr=0.1", "train.precision=fp32"])
    take = step.make_step(model, cfg, torch.device("cpu"))
    optimizer = take.optimizer
    assert take.name == "fused SGD with momentum 0.9 (fp32)" and take.window == 1
    x, t = torch.randn(5, 6, dtype=torch.float64), cost.one_hot(torch.tensor([0, 1, 1, 0, 1]), 2, torch.float64)
    take(step.Batch(x, t))
    saved = optimizer.state_dict()["state"]
    assert len(saved) == 4 and all(saved[i]["momentum_buffer"].abs().sum() > 0 for i in saved)
    sgd = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(optimizer.state_dict())  # the same form: a checkpoint resumes on either path


@pytest.mark.parametrize("window, momentum", [(1, 0), (4, 0), (1, 0.9)])
def test_fused_and_autograd_runs_end_with_the_same_weights(small_tree, make_config, window, momentum):
    runs = {}
    for fused in (True, False):
        cfg = make_config(
            small_tree,
            f"optim.momentum={momentum}",
            f"optim.fused={str(fused).lower()}",
            f"optim.fused_window={window}",
            f"log.run_name=fused-{fused}-{window}-{momentum}",
            "train.epochs=3",
        )
        run_dir = train.run(cfg, progress=False)
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["step"].startswith("fused" if fused else "autograd")
        runs[fused] = checkpoint.load(run_dir / "checkpoints/last.pt")["model"]
    for k in runs[True]:
        assert torch.allclose(runs[True][k], runs[False][k], atol=1e-5), k


def test_fused_false_uses_autograd_and_bf16_and_momentum_run_fused():
    cpu = torch.device("cpu")

    def name(*overrides):
        cfg = config.load(None, ["train.precision=fp32", *overrides])  # pinned: auto is bf16 on some CPUs
        return step.make_step(build_model(4, [3], 2), cfg, cpu).name

    assert name("optim.momentum=0.9").startswith("fused SGD with momentum 0.9")
    assert name("optim.momentum=0.9", "optim.fused=false").startswith("autograd + torch.optim.SGD")
    assert name("optim.momentum=0", "train.precision=bf16").startswith("fused SGD (bf16")
    assert name("optim.momentum=0").startswith("fused SGD (fp32")
    assert name("optim.name=adamw", "optim.momentum=0").startswith("fused backward + torch.optim.AdamW")


def test_memory_mapped_data_gives_the_same_weights(small_tree, make_config):
    weights = {}
    for budget in ("null", "0"):
        run_dir = train.run(
            make_config(small_tree, f"data.memory_budget={budget}", f"log.run_name=budget-{budget}", "train.epochs=3"),
            progress=False,
        )
        weights[budget] = checkpoint.load(run_dir / "checkpoints/last.pt")["model"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["peak_memory_bytes"] > 0
    for k in weights["null"]:
        assert torch.equal(weights["null"][k], weights["0"][k]), k


def test_a_zero_budget_keeps_the_pool_memory_mapped(small_tree, tmp_path):
    from hotdog_torch import data

    d = config.Data(root=str(small_tree), image_size=32, channels=1, cache_dir=str(tmp_path / "c"), workers=1)
    mapped = data.load_dataset(d, 0, progress=False, memory_budget=0)
    resident = data.load_dataset(d, 0, progress=False, memory_budget=None)
    assert mapped.train.mapped and not resident.train.mapped
    moved = mapped.to(torch.device("cpu"))
    assert moved.train.images is mapped.train.images  # stays mapped: no copy into memory
    pos = torch.tensor([5, 0, 17])
    assert torch.equal(mapped.train.batch(pos), resident.train.batch(pos))


@pytest.mark.parametrize(
    "extra", [["optim.momentum=0.9"], ["optim.momentum=0.9", "optim.nesterov=true"], ["optim.momentum=0"]]
)
def test_the_bf16_fused_step_follows_fp32_autograd_and_repeats_itself(extra):
    """The products in bf16 (torch emulates them on a CPU without native bf16): each weight's change over four steps
    within bf16's rounding of fp32 autograd's, and the same seed gives the same bits."""
    cpu, ends = torch.device("cpu"), []
    for precision, fused in (("fp32", "false"), ("bf16", "true"), ("bf16", "true")):
        torch.manual_seed(0)
        model = build_model(300, [24], 3)
        start = [p.detach().clone() for p in model.parameters()]
        cfg = config.load(None, [*extra, f"train.precision={precision}", f"optim.fused={fused}", "optim.lr=0.5"])
        take, g = step.make_step(model, cfg, cpu), torch.Generator().manual_seed(1)
        assert (precision in take.name) and take.name.startswith("fused" if fused == "true" else "autograd")
        for _ in range(4):  # 2 batches of 16 each time: one window of 2, or two steps
            x, t = torch.randn(32, 300, generator=g), cost.one_hot(torch.randint(0, 3, (32,), generator=g), 3)
            for i in range(0, 32, 16 * take.window):
                rows = slice(i, i + 16 * take.window)
                take(step.Batch(x[rows], t[rows].float(), rows=[16] * take.window))
        ends.append([p.detach() - s for p, s in zip(model.parameters(), start, strict=True)])
    for ref, low in zip(ends[0], ends[1], strict=True):
        assert (low - ref).norm() <= 0.02 * ref.norm() + 1e-6, float((low - ref).norm() / ref.norm())
    assert all(torch.equal(a, b) for a, b in zip(ends[1], ends[2], strict=True))
