"""Where a training step's time goes: torch.profiler over 40 steps of each training path.

    python scripts/profile_step.py [--config configs/bench.yaml] [--steps 40]

Prints the top operators by self CPU time for the fused SGD step, and for
autograd + torch.optim.SGD with zero_grad(set_to_none=False) and with the default
zero_grad() (set_to_none=True), which is what a tutorial writes and what
hotdog_torch's autograd path does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotdog_torch import config, data, loop, step  # noqa: E402
from hotdog_torch.cost import half_mse  # noqa: E402
from hotdog_torch.model import build_model  # noqa: E402


def tutorial_step(model, optimizer, set_to_none=True):
    def take(x, targets, sizes):
        outputs = model(x)
        cost = half_mse(outputs, targets)
        optimizer.zero_grad(set_to_none=set_to_none)  # True: a fresh gradient tensor every step
        cost.backward()
        optimizer.step()
        return [(cost.detach(), outputs.detach())]

    return step.Step(take, 1, "tutorial")


def zeroing_step(model, optimizer):
    return tutorial_step(model, optimizer, set_to_none=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args(argv)
    cfg = config.load(a.config, ["device=cpu"])
    device = torch.device("cpu")
    ds = data.prepare(cfg.data, cfg.seed, progress=False)
    sub = ds.train.subset(torch.arange(min(len(ds.train), cfg.optim.batch_size * a.steps)))
    mean, std = data.normalisation(ds.train)
    k = len(ds.classes)
    for label in (
        "fused SGD, first-layer updates in windows of 2 steps",
        "fused SGD, every step",
        "autograd, zero_grad(set_to_none=False)",
        "autograd, zero_grad() (hotdog_torch's autograd path, as in the tutorial)",
    ):
        torch.manual_seed(0)
        model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, k, cfg.model.activation)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        c = config.from_dict(
            config.to_dict(cfg),
            [
                f"optim.fused={'true' if label.startswith('fused') else 'false'}",
                "optim.momentum=0",
                f"optim.fused_window={2 if 'windows' in label else 1}",
            ],
        )
        if "zero_grad()" in label:
            take = tutorial_step(model, optimizer)
        else:
            take = zeroing_step(model, optimizer) if "False" in label else step.make_step(model, optimizer, c, device)
        g = torch.Generator().manual_seed(0)
        feed = loop.Feed(sub, mean, std, cfg.optim.batch_size, k, device)
        loop.train_one_epoch(take, feed, g)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop.train_one_epoch(take, feed, g)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
        rate = cfg.optim.batch_size * a.steps / total * 1e3
        print(
            f"\n## {label}: {total / a.steps:.1f} ms per step of {cfg.optim.batch_size} images "
            f"({rate:,.0f} images/s while profiled)\n"
        )
        print("| operator | self CPU ms per step | share | calls per step |\n|---|---|---|---|")
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        for e in rows:
            ms = e.self_cpu_time_total / 1e3
            print(f"| {e.key} | {ms / a.steps:.2f} | {ms / total:.0%} | {e.count / a.steps:g} |")


if __name__ == "__main__":
    main()
