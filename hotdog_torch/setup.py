"""A run, set up: its data on the device, its loader, its network and step, its schedule, its folder, and the state
to go on from.  Training (train.py) runs it; lr_find and random search (search.py) build theirs from the same
functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, config, data, dist, files, loop, run_files, runtime, schedule
from .checkpoint import RunState
from .config import Config
from .cost import COSTS, class_weights
from .data import Loader
from .model import build_model, input_side
from .router_training import Phase, phase_of, routed
from .run_files import RunFiles
from .step import Step, make_step


@dataclass
class Run:  # what one training run is made of, once set up
    cfg: Config
    ds: data.Dataset
    files: RunFiles  # the run folder's one owner: it alone writes and removes the run's files
    model: torch.nn.Sequential  # the classifier the steps train
    step: Step  # forward, cost, backward and update of one batch; step.optimizer holds the numbers
    schedule: schedule.Schedule  # the lr, written into the optimiser's param_groups step by step
    generator: torch.Generator  # the batch order
    loader: Loader  # the training split's batches
    meta: dict  # what a checkpoint needs besides the weights (checkpoint.meta)
    world: dist.World = dist.SINGLE  # under torchrun, rank 0 alone writes
    phase: Phase | None = None  # model.router: the router and its phase (before the epochs)

    @property
    def dir(self) -> Path:
        return self.files.dir

    @property
    def network(self) -> torch.nn.Module:  # what judges a picture: the classifier, or the router then the classifier
        return routed(self.phase, self.model)

    def end(self) -> Path:
        """The run is over (finished, or nothing left to train): torchrun's note of it removed, the group left."""
        self.files.end(self.cfg.log.dir)
        dist.finish(self.world)
        return self.dir

    def evaluate(self, split: data.Split, model=None, world=dist.SINGLE) -> dict:  # the cost training minimises
        f, how = self.loader, {"world": world, "cost": COSTS[self.cfg.optim.cost], "weights": self.loader.class_weights}
        return loop.evaluate(model or self.network, split, f.mean, f.std, f.n_classes, **how)


def set_up(cfg: Config, config_name: str, progress: bool, resume_dir) -> tuple[Run, RunState, bool]:
    """Data, network and its step, schedule and batch order, the state to go on from (stopped_because set: a
    finished run, nothing left to train); every check first, then the run folder: a refused config or resume changes
    nothing on disk."""
    world = dist.from_env()  # one process, or one of torchrun's
    device = dist.start(world, runtime.resolve_device(cfg.device))
    runtime.use_tf32(device)
    resume_dir = resume_dir or dist.restarted_run(world, cfg.log.dir)  # a worker died: go on where the run was
    resumed = last_checkpoint(resume_dir)
    ds = load_data(cfg, device, world, progress)
    loader = make_loader(cfg, ds, device, world)
    total_steps = cfg.train.epochs * loader.batches_per_epoch()
    schedule.check(cfg.optim, total_steps)  # the schedule built once, before anything is written
    fingerprint = run_files.fingerprint(cfg, ds, loader.batches_per_epoch())
    if resumed is not None:
        check_resume(resumed, fingerprint, resume_dir, cfg, ds)
    model = network(cfg, loader, device, world)
    step = make_step(model, cfg, device, world)  # with its optimiser
    generator = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same order on any device, and resumable
    meta = checkpoint.meta(config.to_dict(cfg), ds.classes, loader.mean.tolist(), loader.std.tolist())
    state = RunState()
    if resumed is not None:  # the config given trains, not the checkpoint's numbers
        state = checkpoint.restore(resumed, model, step.optimizer, generator, resume_dir, cfg.train, cfg.optim)
    steps = 0 if state.stopped_because else state.global_step  # a finished run's schedule is not stepped again
    lr = schedule.Schedule(step.optimizer, cfg.optim, total_steps, state.schedule, steps)
    phase = phase_of(cfg, device, loader.batches_per_epoch(), resumed, state)
    if resume_dir is None:  # only now, every check passed: the run folder
        owner = RunFiles.new(cfg, config_name, world, fingerprint, ds, device)
    else:
        owner = RunFiles(resume_dir, world, resumed, fingerprint)
        if world.main:
            files.announce(owner.dir, ds, device)
    owner.begin(None if state.stopped_because else cfg, resumed)  # a finished run's config.yaml stays as it is
    run = Run(cfg, ds, owner, model, step, lr, generator, loader, meta, world, phase)
    return run, state, resumed is not None


def last_checkpoint(resume_dir) -> dict | None:
    """The resumed run's last.pt; None for a new run, and for a run folder a crash left before its first save (its
    config.yaml, no checkpoint: nothing to lose, so it starts afresh in that folder)."""
    if resume_dir is None:
        return None
    folder = Path(resume_dir) / "checkpoints"
    if (Path(resume_dir) / "config.yaml").is_file() and folder.is_dir() and not any(folder.glob("*.pt")):
        print(f"{resume_dir} holds no checkpoint yet: its run starts afresh there", flush=True)
        return None
    return checkpoint.load(folder / "last.pt")


def check_resume(resumed: dict, fingerprint: dict, run_dir, cfg: Config, ds: data.Dataset) -> None:
    """What a resume would restore checked against the config and data given, before anything is written."""
    if resumed["classes"] != ds.classes:
        raise config.UserError(
            f"{run_dir} was trained on classes {resumed['classes']}, but {cfg.data.root} has {ds.classes}"
        )
    run_files.check(resumed, fingerprint, run_dir, cfg)


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
