"""The learning rate along a run: torch.optim.lr_scheduler's classes, stepped after every optimiser step.

They write the lr into the optimiser's param_groups, where every step reads it.  optim.schedule picks one:

    constant   lr
    step       lr · gamma^⌊s / step_every⌋                                   (StepLR)
    cosine     min_lr + (lr − min_lr)·(1 + cos(π·s / S))/2, min_lr at the last step   (CosineAnnealingLR)
    one_cycle  lr/div_factor up to lr over pct_start of the run, then down to lr/div_factor/final_div_factor
               (OneCycleLR with fastai's fit_one_cycle defaults; betas and momentum are left as configured)
    plateau    × factor when the validation cost has not improved for `patience` epochs   (ReduceLROnPlateau)

optim.warmup_steps puts a linear warm-up in front of any of them but one_cycle: lr·(s + 1)/warmup_steps for the
first steps (LinearLR, joined by SequentialLR).  A resumed run builds its schedule from the config it is given and
steps it to where the run was (plateau's cuts made again with the numbers they were made with): with the run's own
config, the same float operations as an uninterrupted run, so the same lr, bit for bit; with overrides, the schedule
the new config gives from that step on.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim import lr_scheduler as ls

from .config import Optim, UserError


class Schedule:
    """The run's schedule of `total_steps` steps; a resumed run's from its saved state, `steps` steps in."""

    def __init__(self, optimizer, o: Optim, total_steps: int, saved: dict | None = None, steps: int = 0):
        self.optimizer, self.o, self.total, self.steps = optimizer, o, total_steps, 0
        self.cuts: list = []  # plateau's cuts so far: (factor, min_lr) of each
        self.per_step = per_step(optimizer, o, total_steps)
        self.plateau = None
        if o.schedule == "plateau":
            self.plateau = ls.ReduceLROnPlateau(optimizer, factor=o.factor, patience=o.patience, min_lr=o.min_lr)
        if steps:
            self.restore(saved, steps)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, n: int = 1) -> None:
        """After n optimiser steps."""
        if self.per_step is not None:
            for _ in range(n):
                self.per_step.step()
        self.steps += n

    def end_epoch(self, val_cost: float) -> None:
        """plateau: one epoch's validation cost (heard once the warm-up is over)."""
        if self.plateau is not None and self.steps >= self.o.warmup_steps:
            before = self.lr
            self.plateau.step(val_cost)
            if self.lr < before:
                self.cuts.append((self.o.factor, self.o.min_lr))

    def state_dict(self) -> dict:
        plateau = self.plateau and self.plateau.state_dict()
        return {"steps": self.steps, "total": self.total, "cuts": self.cuts, "plateau": plateau}

    def restore(self, state: dict | None, steps: int) -> None:
        """Where a resumed run was: `steps` optimiser steps taken, plateau's counters and cuts as saved.  The cuts are
        made again with the numbers they were made with; what comes next follows the config given."""
        if steps > self.total:
            raise UserError(f"this run has taken {steps} steps, more than train.epochs gives in all ({self.total})")
        if state and state.get("total", self.total) != self.total:
            print(f"the schedule now spans {self.total} steps (it spanned {state['total']})", flush=True)
        with warnings.catch_warnings():  # stepped to where the run was, before this process's first optimiser step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.step(steps)
        if not state or self.plateau is None or not state.get("plateau"):
            return
        self.plateau.load_state_dict(state["plateau"])
        self.plateau.factor, self.plateau.patience = self.o.factor, self.o.patience  # the config's, from now on
        self.plateau.min_lrs = [self.o.min_lr] * len(self.optimizer.param_groups)
        for factor, min_lr in state["cuts"]:  # ReduceLROnPlateau's own cut, again
            for group in self.optimizer.param_groups:
                group["lr"] = max(group["lr"] * factor, min_lr)
        self.cuts = [tuple(c) for c in state["cuts"]]


def check(o: Optim, total_steps: int) -> None:
    """What the config's checks cannot know before the data: the run's length, and the schedule built for it (on a
    parameter of its own), so that a schedule torch refuses is refused before anything is written."""
    if o.warmup_steps >= total_steps:
        raise UserError(f"optim.warmup_steps {o.warmup_steps} is not shorter than the run ({total_steps} steps)")
    trial = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
    try:
        per_step(trial, o, total_steps)
    except (ZeroDivisionError, ValueError) as e:
        rising = o.pct_start * total_steps if o.schedule == "one_cycle" else None
        why = f"{rising:g} of its {total_steps} steps rise" if rising is not None else str(e).splitlines()[0]
        raise UserError(
            f"optim.schedule={o.schedule} cannot be built for this run ({why}): raise train.epochs or "
            "optim.pct_start, or lower optim.batch_size"
        ) from None


def per_step(optimizer, o: Optim, total: int):
    """The torch scheduler stepped every optimiser step (None: the lr stays where the optimiser has it)."""
    w = o.warmup_steps
    if o.schedule == "one_cycle":
        return ls.OneCycleLR(
            optimizer,
            max_lr=o.lr,
            total_steps=total,
            pct_start=o.pct_start,
            div_factor=o.div_factor,
            final_div_factor=o.final_div_factor,
            cycle_momentum=False,
        )
    main = None
    if o.schedule == "step":
        main = ls.StepLR(optimizer, step_size=o.step_every, gamma=o.gamma)
    elif o.schedule == "cosine":
        main = ls.CosineAnnealingLR(optimizer, T_max=max(total - w - 1, 1), eta_min=o.min_lr)
    if not w:
        return main
    warm = ls.LinearLR(optimizer, start_factor=1 / w, end_factor=1.0, total_iters=w - 1)
    return warm if main is None else ls.SequentialLR(optimizer, [warm, main], milestones=[w])
