"""The optimiser owns its numbers: AdamW/Adam, weight decay, clipping, dropout and class weights through the one
backward, checked step by step against autograd + torch.optim in float64; schedules against torch's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hotdog_torch import config, cost, optim, schedule, step
from hotdog_torch.model import build_model


def pair(name, *overrides, hidden=(7, 5), dropout=0.0):
    """The same float64 network twice: one on the fused path, one on autograd, each with its own optimiser."""
    plain = [f"optim.name={name}", "optim.lr=0.05", "optim.momentum=0", "optim.fused_window=1", "train.precision=fp32"]
    common = [*plain, f"model.dropout={dropout}", *overrides]
    cfgs = [config.load(None, common), config.load(None, [*common, "optim.fused=false"])]
    torch.manual_seed(0)
    a = build_model(12, list(hidden), 3, "sigmoid", dropout).double()
    b = copy.deepcopy(a)
    cpu = torch.device("cpu")
    steps = []
    for model, cfg in zip((a, b), cfgs, strict=True):
        take = step.make_step(model, cfg, cpu)
        steps.append((model, take.optimizer, take))
    assert steps[0][2].name.startswith("fused") and steps[1][2].name.startswith("autograd")
    return steps


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, dtype=torch.float64, generator=g)
    return x, cost.one_hot(torch.randint(0, 3, (n,), generator=g), 3, torch.float64)


def run_both(steps, sizes=(8, 8, 8, 5), weights=None, reseed=False):
    (a, opt_a, fused), (b, opt_b, autograd) = steps
    for i, n in enumerate(sizes):
        x, t = batch(n, i)
        w = None if weights is None else weights[torch.arange(n) % 3]
        if reseed:
            torch.manual_seed(100 + i)  # dropout: the same masks on both paths
        ((c1, o1),) = fused(step.Batch(x, t, w))
        if reseed:
            torch.manual_seed(100 + i)
        ((c2, o2),) = autograd(step.Batch(x, t, w))
        assert torch.allclose(c1, c2, rtol=0, atol=1e-10) and torch.allclose(o1, o2, rtol=0, atol=1e-10)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.allclose(pa, pb, rtol=0, atol=1e-10)
    return opt_a, opt_b


@pytest.mark.parametrize("name", ["adamw", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_backward_with_torch_adamw_equals_autograd(name, weight_decay):
    steps = pair(name, f"optim.weight_decay={weight_decay}", "optim.betas=[0.8,0.95]")
    opt_a, opt_b = run_both(steps)
    assert steps[0][2].name.startswith(f"fused backward + torch.optim.{optim.NAMES[name]}")
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"], strict=True):
        assert torch.allclose(opt_a.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, extra", [("sgd", ["optim.momentum=0.9"]), ("sgd", []), ("adamw", [])])
def test_clipping_to_a_global_norm_equals_torchs_clip_grad_norm(name, extra):
    steps = pair(name, "optim.clip_grad_norm=0.01", *extra)
    run_both(steps)
    assert "clip 0.01" in steps[0][2].name


def test_the_gram_form_of_a_layers_gradient_norm_is_the_norm():
    d, a = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 300, dtype=torch.float64)
    g = step.Product(d, a)
    assert math.isclose(
        g.sq_norm().item(), ((d.t() @ a).square().sum() + d.sum(0).square().sum()).item(), rel_tol=1e-12
    )


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_class_weights_weigh_each_images_cost_on_both_paths(name):
    steps = pair(name, "optim.momentum=0" if name == "sgd" else "optim.eps=1e-8")
    run_both(steps, weights=torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("hidden", [(7,), (7, 5)])
def test_fused_dropout_equals_nn_dropout_given_the_same_random_state(hidden):
    steps = pair("sgd", "optim.momentum=0.9", hidden=hidden, dropout=0.3)
    run_both(steps, reseed=True)
    assert "dropout 0.3" in steps[0][2].name


def lrs_of(o: config.Optim, total: int, epochs_costs=None) -> list[float]:
    model = build_model(3, [], 2)
    opt = step.FusedSGD(model.parameters(), o.lr)
    s, out = schedule.Schedule(opt, o, total), []
    for i in range(total):
        out.append(s.lr)
        opt.step([], [])  # the step the schedule follows (no layers to move)
        s.step()
        if epochs_costs and (i + 1) % 10 == 0:
            s.end_epoch(epochs_costs[(i + 1) // 10 - 1])
    return out


def torch_lrs(make, total: int, lr: float) -> list[float]:
    opt = torch.optim.SGD(build_model(3, [], 2).parameters(), lr=lr)
    sched, out = make(opt), []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_give_torchs_values_and_the_documented_end_points():
    ls, o = torch.optim.lr_scheduler, config.Optim(lr=0.5, min_lr=0.01, warmup_steps=5, step_every=7, gamma=0.5)
    o.schedule = "cosine"
    cosine = lrs_of(o, 40)
    warm = lambda opt: ls.LinearLR(opt, 1 / 5, 1.0, 4)  # noqa: E731
    assert cosine == torch_lrs(
        lambda opt: ls.SequentialLR(opt, [warm(opt), ls.CosineAnnealingLR(opt, 34, 0.01)], [5]), 40, 0.5
    )
    assert math.isclose(cosine[0], 0.1) and math.isclose(cosine[4], 0.5) and math.isclose(cosine[-1], 0.01)
    o.schedule = "step"
    assert lrs_of(o, 30) == torch_lrs(
        lambda opt: ls.SequentialLR(opt, [warm(opt), ls.StepLR(opt, 7, 0.5)], [5]), 30, 0.5
    )
    o.schedule, o.warmup_steps = "one_cycle", 0
    cycle = lrs_of(o, 100)
    fastai = dict(pct_start=0.25, div_factor=25.0, final_div_factor=1e5, cycle_momentum=False)
    assert cycle == torch_lrs(lambda opt: ls.OneCycleLR(opt, 0.5, total_steps=100, **fastai), 100, 0.5)
    assert math.isclose(cycle[0], 0.5 / 25) and max(cycle) == cycle[24] and math.isclose(cycle[-1], 0.5 / 25 / 1e5)
    o.schedule = "constant"
    assert lrs_of(o, 5) == [0.5] * 5


def test_plateau_cuts_the_lr_after_patience_epochs_as_torch_does():
    o = config.Optim(lr=0.5, schedule="plateau", patience=1, factor=0.5, min_lr=0.1)
    costs = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.0, 1.0]  # no better than 0.9 after epoch 2
    lrs = lrs_of(o, 100, costs)
    model = build_model(3, [], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plateau, expected = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=0.1), []
    for c in costs:
        expected += [opt.param_groups[0]["lr"]] * 10
        plateau.step(c)
    assert lrs == expected and lrs[-1] == 0.1 and lrs[0] == 0.5


def plateau_run(o: config.Optim, costs, saved=None, steps=0):
    model = build_model(3, [], 2)
    opt = step.FusedSGD(model.parameters(), o.lr)
    s = schedule.Schedule(opt, o, 100, saved, steps)
    for c in costs:
        opt.step([], [])
        s.step(10)
        s.end_epoch(c)
    return s


def test_a_resumed_plateau_makes_its_cuts_again_then_follows_the_config_given():
    o = config.Optim(lr=1.0, schedule="plateau", patience=0, factor=0.5)
    first = plateau_run(o, [1.0, 1.1])  # one cut: 1.0 -> 0.5
    assert first.lr == 0.5 and first.cuts == [(0.5, 0.0)]
    same = plateau_run(o, [], first.state_dict(), 20)
    assert same.lr == 0.5 and same.plateau.state_dict() == first.plateau.state_dict()
    given = config.Optim(lr=1.0, schedule="plateau", patience=0, factor=0.1)  # resumed with optim.factor=0.1
    resumed = plateau_run(given, [], first.state_dict(), 20)
    assert resumed.lr == 0.5  # the cut made, as it was made
    resumed.step(10)
    resumed.end_epoch(1.2)
    assert resumed.lr == pytest.approx(0.05)  # the next cut by the config's factor


def test_a_schedule_refuses_a_run_longer_than_it_spans():
    o = config.Optim(lr=0.1, schedule="one_cycle")
    with pytest.raises(config.UserError, match="more than train.epochs gives"):
        schedule.Schedule(step.FusedSGD(build_model(3, [], 2).parameters(), 0.1), o, 50, {"total": 100}, 60)


def test_early_stopping_measures_min_delta_from_the_last_improvement_as_keras_does():
    from hotdog_torch import stopping

    train = config.Train(patience=3, min_delta=0.01)
    reference, bad = None, []
    for acc in (0.80, 0.806, 0.812, 0.818):
        m = {"val_accuracy": acc, "val_cost": 0.1}
        if stopping.improved(m, reference, train):
            reference = m
        bad.append(reference is not m)
    assert bad == [False, True, False, True]  # 0.812 is 0.012 above 0.80, the last improvement


def test_an_epoch_with_a_nan_validation_cost_is_never_among_the_best():
    from hotdog_torch import stopping

    epochs = [{"epoch": e, "val_cost": c, "val_accuracy": 0.9} for e, c in ((1, 0.10), (2, math.nan), (3, 0.08))]
    for monitor in ("val_cost", "val_accuracy"):
        train, kept = config.Train(keep_top_k=2, monitor=monitor), []
        for m in epochs:
            kept, _, _ = stopping.top_k(kept, m, train)
        assert [e["epoch"] for e in kept] == [3, 1]
        assert not stopping.better(epochs[1], epochs[0], train)
