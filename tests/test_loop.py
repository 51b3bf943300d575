"""The epoch in three pieces (loop.py): the order, drawn or restored mid-epoch; the batches; the summary."""

from __future__ import annotations

import torch

from hotdog_torch import dist, loop, schedule, setup, step


def pieces(tree, make_config, *overrides):
    cfg = make_config(tree, *overrides)
    ds = setup.load_data(cfg, torch.device("cpu"), dist.SINGLE, progress=False)
    loader = setup.make_loader(cfg, ds, torch.device("cpu"))
    model = setup.network(cfg, loader, torch.device("cpu"))
    take = step.make_step(model, cfg, torch.device("cpu"))
    return cfg, loader, take, schedule.Schedule(take.optimizer, cfg.optim, 100)


def test_an_epoch_stopped_part_way_goes_on_from_its_saved_order_an_old_one_without_lrs_too(tiny_tree, make_config):
    """A last.pt saved mid-epoch before the lrs were kept (no "lrs" in its epoch_progress) still resumes: the
    batches before it are logged at the lr the run resumes with, as they were before the redesign."""
    cfg, loader, take, lr = pieces(tiny_tree, make_config, "optim.batch_size=16")
    generator, calls = torch.Generator().manual_seed(0), []
    order = loop.epoch_order(loader, generator, 1)
    part = loop.train_one_epoch(take, loader, order, lr, should_stop=lambda: len(calls) > 2 or calls.append(1))
    saved = part.progress()
    assert 0 < saved["next"] < len(order.sizes)
    del saved["lrs"]
    rest = loop.train_one_epoch(take, loader, loop.epoch_order(loader, generator, 1, saved), lr)
    assert rest.next == len(order.sizes) and len(rest.lrs) == len(rest.costs) == rest.next
    assert torch.equal(rest.order, part.order) and torch.equal(rest.costs[: saved["next"]], part.costs)
