"""A run, set up: its data on the device, its loader, its network and step, its schedule, its folder, and the state
to go on from.  Training (train.py) runs it; lr_find and random search (search.py) build theirs from the same
functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, config, data, dist, files, loop, runtime, schedule
from .checkpoint import RunState
from .config import Config
from .cost import COSTS, class_weights
from .data import Loader
from .model import build_model, input_side
from .router_training import Phase, phase_of, routed
from .step import Step, make_step


@dataclass
class Run:  # what one training run is made of, once set up
    cfg: Config
    ds: data.Dataset
    dir: Path
    model: torch.nn.Sequential  # the classifier the steps train
    step: Step  # forward, cost, backward and update of one batch; step.optimizer holds the numbers
    schedule: schedule.Schedule  # the lr, written into the optimiser's param_groups step by step
    generator: torch.Generator  # the batch order
    loader: Loader  # the training split's batches
    meta: dict  # what a checkpoint needs besides the weights (checkpoint.meta)
    world: dist.World = dist.SINGLE  # under torchrun, rank 0 alone writes
    phase: Phase | None = None  # model.router: the router and its phase (before the epochs)

    @property
    def network(self) -> torch.nn.Module:  # what judges a picture: the classifier, or the router then the classifier
        return routed(self.phase, self.model)

    def save(self, name: str, state: RunState, metrics: dict, progress=None) -> None:
        """checkpoints/<name>.pt; progress, when an epoch stopped part-way, is where (for --resume)."""
        rng = checkpoint.rng_state(self.generator, self.world) if name == "last" else None  # every rank's: all call
        if not self.world.main:
            return
        state.epoch_progress, state.rng = checkpoint.on_cpu(progress), rng  # rng: for --resume, in last.pt alone
        state.schedule, path = self.schedule.state_dict(), self.dir / "checkpoints" / f"{name}.pt"
        state.router, router = None if self.phase is None else self.phase.state(), self.phase and self.phase.net
        checkpoint.save(path, self.model, self.step.optimizer, self.meta, metrics, state, name == "last", router)

    def drop(self, epoch: int) -> None:  # a best-<epoch>.pt train.keep_top_k no longer keeps
        if self.world.main:
            (self.dir / "checkpoints" / f"best-{epoch}.pt").unlink(missing_ok=True)

    def evaluate(self, split: data.Split, model=None, world=dist.SINGLE) -> dict:  # the cost training minimises
        f, how = self.loader, {"world": world, "cost": COSTS[self.cfg.optim.cost], "weights": self.loader.class_weights}
        return loop.evaluate(model or self.network, split, f.mean, f.std, f.n_classes, **how)


def set_up(cfg: Config, config_name: str, progress: bool, resume_dir) -> tuple[Run, RunState | None, bool]:
    """Data, run folder, network and its step, schedule and batch order; the state to go on from (None: nothing
    left to do).  A refused config or resume changes nothing on disk."""
    world = dist.from_env()  # one process, or one of torchrun's
    device = dist.start(world, runtime.resolve_device(cfg.device))
    runtime.use_tf32(device)
    resume_dir = resume_dir or dist.restarted_run(world, cfg.log.dir)  # a worker died: go on where the run was
    resumed = checkpoint.load(Path(resume_dir) / "checkpoints" / "last.pt") if resume_dir else None
    ds = load_data(cfg, device, world, progress)
    loader = make_loader(cfg, ds, device, world)
    total_steps = cfg.train.epochs * loader.batches_per_epoch()
    schedule.check(cfg.optim, total_steps)  # before anything is written
    if world.main:
        run_dir = files.open_run_dir(cfg, config_name, resume_dir, resumed, ds, device)
        dist.note_run(world, cfg.log.dir, run_dir)
    run_dir = dist.broadcast(world, run_dir if world.main else None)
    model = network(cfg, loader, device, world)
    step = make_step(model, cfg, device, world)  # with its optimiser
    generator = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same order on any device, and resumable
    meta = checkpoint.meta(config.to_dict(cfg), ds.classes, loader.mean.tolist(), loader.std.tolist())
    state = RunState()
    if resumed is not None:  # the config given trains, not the checkpoint's numbers
        state = checkpoint.restore(resumed, model, step.optimizer, generator, run_dir, cfg.train, cfg.optim)
    steps = state.global_step if state else 0
    lr = schedule.Schedule(step.optimizer, cfg.optim, total_steps, state and state.schedule, steps)
    phase = phase_of(cfg, device, loader.batches_per_epoch(), resumed, state)
    if world.main and state is not None:  # only now: a refused resume changes nothing on disk
        checkpoint.settle(run_dir, cfg, resumed)
    elif world.main and resumed is not None:  # finished: only a best.pt a kill left behind last.pt, mended
        checkpoint.mend(run_dir, resumed)
    return Run(cfg, ds, run_dir, model, step, lr, generator, loader, meta, world, phase), state, resumed is not None


def load_data(cfg: Config, device: torch.device, world: dist.World, progress: bool) -> data.Dataset:
    """The data set, decoded once (by rank 0 first under torchrun), its pools on the device."""
    budget = cfg.data.memory_budget if cfg.data.memory_budget is not None else data.default_memory_budget(device)
    return dist.main_first(world, lambda: data.prepare(cfg.data, cfg.seed, progress, budget)).to(device)


def make_loader(cfg: Config, ds: data.Dataset, device: torch.device, world: dist.World = dist.SINGLE) -> Loader:
    """The training split's batches: batch size, normalisation, class weights, framing."""
    weights = class_weights(cfg.optim.class_weights, ds.train.labels, ds.classes)  # a tensor, or None
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    batch_size = data.clamp_batch_size(cfg.optim.batch_size, len(ds.train))
    weights = None if weights is None else weights.to(device)
    return Loader(ds.train, mean, std, batch_size, len(ds.classes), device, world, weights, cfg.data.augment)


def network(cfg: Config, loader: Loader, device, world=dist.SINGLE, seed=None) -> torch.nn.Sequential:
    """The classifier, its weights drawn from cfg.seed (every run's start), and the CPU's threads set for it."""
    width = cfg.data.channels * input_side(cfg.data.image_size, cfg.model.router and cfg.model.router.size) ** 2
    (seed or torch.manual_seed)(cfg.seed)  # lr_find: torch.default_generator's alone (manual_seed queues CUDA's)
    model = build_model(width, cfg.model.hidden, loader.n_classes, cfg.model.activation, cfg.model.dropout).to(device)
    runtime.set_up_cpu(
        device, cfg.train.flush_denormal, [width, *cfg.model.hidden, loader.n_classes], loader.batch_size
    )
    if world.distributed and cfg.model.dropout:  # each rank's rows their own dropout masks
        torch.manual_seed(cfg.seed + world.rank)
    return model
