"""The router's phase of a run: before the classifier's epochs, the router learns where the subject is.

Each router epoch frames every training picture afresh (augment.draw at full strength, from the phase's own
generator) and the router learns, by gradient descent on the mean squared error, the numbers that framed it
(shift, zoom, angle: a regression whose labels cost nothing).  AdamW, with a one-cycle lr over the phase's steps.
Then the router is frozen, and the classifier's epochs learn from the pictures it un-warps (data.Loader).

The phase is saved at the end of every router epoch (checkpoint.RunState.router: its epoch, optimiser, schedule,
generator and costs), so a run killed in it resumes from the last one bit for bit; a stop request finishes the
router epoch under way first (a second or two), then the run saves and stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import augment, data, router
from .config import Config, UserError
from .data import Loader

SEED = 1  # the phase's generator and the router's first weights: cfg.seed + SEED, apart from the batch order's


@dataclass
class Phase:
    net: router.Router
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # its batch order and framings
    epochs: int
    epoch: int = 0  # router epochs done
    costs: list = field(default_factory=list)  # each router epoch's mean cost
    seconds: list = field(default_factory=list)  # each router epoch's time

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    def state(self) -> dict:
        """What RunState.router keeps (the weights go with the checkpoint's `router`)."""
        return {
            "epoch": self.epoch,
            "costs": list(self.costs),
            "seconds": list(self.seconds),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": self.generator.get_state(),
        }


def build(cfg: Config, device) -> router.Router:
    """The router, its first weights drawn from a generator of its own (the classifier's draws stay as they were)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed + SEED)  # not torch.manual_seed: that reseeds CUDA too
        return router.build(cfg.data.channels, cfg.model.router, cfg.data.augment).to(device)


def start(net: router.Router, cfg: Config, steps: int, saved: dict | None) -> Phase:
    """The phase, from its first step or from where a checkpoint's RunState.router left it."""
    s = cfg.model.router
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr)
    total = s.epochs * steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=max(total, 1))
    generator = torch.Generator().manual_seed(cfg.seed + SEED)
    phase = Phase(net, optimizer, schedule, generator, s.epochs)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["rng"])
        phase.epoch, phase.costs, phase.seconds = saved["epoch"], list(saved["costs"]), list(saved["seconds"])
    return phase


def train(phase: Phase, loader: Loader, board, should_stop, save) -> bool:
    """Router epochs until the phase is done (True) or a stop is asked for (False, after the epoch under way).
    save() after every router epoch; board.router_epoch logs its costs and, when due, where it looks."""
    steps = loader.batches_per_epoch()
    while not phase.done:
        t0 = time.perf_counter()
        costs = one_epoch(phase, loader)
        phase.epoch += 1
        phase.costs.append(sum(costs) / len(costs))
        phase.seconds.append(time.perf_counter() - t0)
        board.router_epoch(phase.net, phase.epoch, costs, (phase.epoch - 1) * steps + 1, phase.done)
        save()
        speed = f"{len(loader.split) / phase.seconds[-1]:,.0f} images/s"
        print(f"router epoch {phase.epoch:3d}/{phase.epochs}  cost {phase.costs[-1]:.4f}  {speed}", flush=True)
        if should_stop() and not phase.done:
            return False
    return True


def one_epoch(phase: Phase, loader: Loader) -> list[float]:
    """One pass over the training pictures, each framed afresh; the router learns the framings.  The costs."""
    a, split, n = loader.augment, loader.split, len(loader.split)
    order = torch.randperm(n, generator=phase.generator).to(split.index.device)
    framings = augment.draw(a, n, phase.generator, 1.0).to(loader.device)
    rows, costs = split.index[order], []
    for lo in range(0, n, loader.batch_size):
        p = framings[lo : lo + loader.batch_size]
        framed = augment.apply(split.images[rows[lo : lo + loader.batch_size]].to(loader.device), p, a.border)
        x = data.normalise(framed, loader.mean, loader.std)
        cost = ((phase.net.net(phase.net.glimpse(x)) - router.targets(p, phase.net)) ** 2).mean()
        phase.optimizer.zero_grad(set_to_none=True)
        cost.backward()
        phase.optimizer.step()
        phase.schedule.step()
        costs.append(cost.detach())
    return torch.stack(costs).tolist()


def phase_of(cfg: Config, device, steps: int, resumed: dict | None, state) -> Phase | None:
    """model.router's phase (None without a router): from the start, or as the resumed checkpoint left it."""
    if resumed is not None:
        check_resume(cfg, resumed, state)
    if cfg.model.router is None:
        return None
    net = build(cfg, device)
    if resumed is not None:
        net.load_state_dict(resumed["router"])
    return start(net, cfg, steps, state.router if state is not None else None)


def check_resume(cfg: Config, resumed: dict, state) -> None:
    """A resume goes on with the router it trained: refused (one sentence, before anything is written) when the
    override adds or drops it, changes what it is, or changes its phase's plan before the phase is done."""
    saved, given = resumed["config"]["model"].get("router"), cfg.model.router
    if (saved is None) != (given is None):
        had = "with" if saved is not None else "without"
        raise UserError(f"this run was trained {had} model.router: resume it as it was, or start a new run")
    if saved is None:
        return
    fixed = ["hidden", "size", "estimates", "epochs", "lr"]  # what it is, and its phase's one-cycle plan
    changed = [k for k in fixed if saved[k] != getattr(given, k)]
    if not (state and state.router and state.router["epoch"] >= saved["epochs"]):  # the phase is not done yet
        changed += ["optim.batch_size"] if resumed["config"]["optim"]["batch_size"] != cfg.optim.batch_size else []
    if changed:
        names = ", ".join(k if "." in k else f"model.router.{k}" for k in changed)
        raise UserError(
            f"{names} cannot change on resume: the router was trained with the run's own; resume without it"
        )


def run_phase(r, state, board, should_stop) -> bool:
    """A run's router phase, unless done (True); False when stopped in it, saved.  Then the router is frozen and
    un-warps every picture the classifier learns from."""
    board.watch_router(r.ds.val, r.loader, r.cfg.log.images_every_epochs)
    if r.phase.epoch == 0:  # a run killed in its first router epoch resumes from its start
        r.files.save_last(r, state, {})
    if not train(r.phase, r.loader, board, should_stop, lambda: r.files.save_last(r, state, {})):
        return False
    r.loader.router = r.phase.net.eval().requires_grad_(False)
    return True


def routed(phase: Phase | None, model: torch.nn.Module) -> torch.nn.Module:
    """What judges a picture: the classifier alone, or the router then the classifier."""
    return model if phase is None else router.Routed(phase.net, model)
