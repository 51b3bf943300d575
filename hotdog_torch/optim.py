"""The optimisers' numbers: each optimiser owns its hyper-parameters in param_groups and reads them at every step.

Whatever drives the numbers (a torch.optim.lr_scheduler, a resumed run's override, lr_find) writes them into
param_groups; nothing else holds a copy.  The update itself is in step.py (FusedSGD, or torch's optimiser's).
"""

from __future__ import annotations

import torch

from .config import Config, Optim

NAMES = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}


def hyper(o: Optim) -> dict:
    """The param_groups numbers of the configured optimiser, as torch.optim names them."""
    if o.name in ("adamw", "adam"):
        return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    return {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay}


def make_optimizer(model, cfg: Config, sgd=None):
    """torch.optim.AdamW or Adam; for SGD, `sgd` (step.FusedSGD for the fused step) or torch.optim.SGD."""
    o, params = cfg.optim, list(model.parameters())
    if o.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(params, foreach=True, **hyper(o))
    return (sgd or torch.optim.SGD)(params, **hyper(o))


def set_hyper(optimizer, o: Optim) -> None:
    """Write the config's numbers into every param group: a resumed run trains with the config it is given, not the
    checkpoint's (its schedule, built afresh from lr, then steps to where the run was)."""
    for group in optimizer.param_groups:
        group.update(hyper(o))
        group.pop("initial_lr", None)


def describe(cfg: Config, optimizer, fused: bool, window: int, matmuls: str, processes: int) -> str:
    """The step line: how a step is taken, with the optimiser's numbers and what the config adds."""
    o, g = cfg.optim, optimizer.param_groups[0]
    how = [f"betas ({g['betas'][0]:g}, {g['betas'][1]:g})"] if "betas" in g else []
    how += [f"{'Nesterov momentum' if g['nesterov'] else 'momentum'} {g['momentum']:g}"] if g.get("momentum") else []
    how += [f"weight decay {g['weight_decay']:g}"] if g["weight_decay"] else []
    extras = [f"{o.schedule} schedule"] if o.schedule != "constant" else []
    extras += [f"{o.warmup_steps} warm-up steps"] if o.warmup_steps else []
    extras += [f"clip {o.clip_grad_norm:g}"] if o.clip_grad_norm else []
    extras += [f"dropout {cfg.model.dropout:g}"] if cfg.model.dropout else []
    extras += [f"class weights {o.class_weights}"] if o.class_weights is not None else []
    if not fused:
        details = [matmuls] + (["compiled"] if cfg.train.compile else []) + extras
        details += [f"cost {o.cost}"] if o.cost != "half_mse" else []
        details += [f"DistributedDataParallel over {processes} processes"] if processes > 1 else []
        return f"autograd + torch.optim.{NAMES[o.name]} ({', '.join(details)})"
    details = [f"first-layer updates in windows of {window} steps"] if window > 1 else []
    details = ", ".join([matmuls, *details, *extras] + ([f"{processes} processes"] if processes > 1 else []))
    if type(optimizer).__name__ == "FusedSGD":
        return f"fused SGD{' with ' + ', '.join(how) if how else ''} ({details})"
    return f"fused backward + torch.optim.{NAMES[o.name]}{', ' + ', '.join(how) if how else ''} ({details})"
