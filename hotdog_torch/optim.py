"""The optimisers: each owns its hyper-parameters in param_groups and reads them at every step.

- FusedSGD: torch.optim.SGD's update (momentum, Nesterov, weight decay as SGD defines it), applied from each
  layer's gradient kept as its factors δᵀa (step.backward), so the first layer's 16384-wide gradient is never
  materialised: the update is one GEMM into the weights (into the velocity with momentum).  Its state_dict has
  torch.optim.SGD's form, so a checkpoint resumes on either path.
- torch.optim.AdamW / Adam, as they are: the fused path writes each layer's gradient into .grad (one GEMM a layer)
  and calls their step(); the autograd path lets backward() fill .grad.

Whatever drives the numbers (a torch.optim.lr_scheduler, a resumed run's override, lr_find) writes them into
param_groups; nothing else holds a copy.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .config import Config, Optim

NAMES = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}


class FusedSGD(torch.optim.Optimizer):
    """torch.optim.SGD (dampening 0) applied from gradient factors.

    A torch.optim.Optimizer, so that torch.optim.lr_scheduler drives it, but built without Optimizer.__init__,
    whose first run imports torch._dynamo (2-3 s of start-up here) for what this class does not use."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        hyper = {"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay, "nesterov": nesterov}
        self.defaults = {**hyper, "maximize": False}
        self.param_groups = [{**self.defaults, "params": list(params)}]
        self.state: dict = {p: {} for p in self.params}
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post"):  # what Optimizer's methods read
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = (
            OrderedDict(),
            OrderedDict(),
        )

    @property
    def params(self) -> list:
        return self.param_groups[0]["params"]

    def add_param_group(self, group: dict) -> None:
        raise NotImplementedError("FusedSGD steps one group: the MLP's parameters")

    @torch.no_grad()
    def step(self, layers, grads, scale=None) -> None:
        """One step: for each layer (first to last) its gradient of the whole batch, as dist.Product or dist.Summed,
        optionally scaled by `scale` (gradient clipping).  With g = ∂C/∂p (+ wd·p), the numbers read now:
            plain:     p <- p − lr·g
            momentum:  v <- μ·v + g;  p <- p − lr·v   (Nesterov: p <- p − lr·(g + μ·v))
        """
        group = self.param_groups[0]
        lr, mu, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        for layer, g in zip(layers, grads, strict=True):
            if scale is not None:
                g.scale_(scale)
            self._move(layer.weight, g.into, lr, mu, wd, nesterov)
            self._move(layer.bias, g.bias_into, lr, mu, wd, nesterov)

    def _move(self, p, add, lr, mu, wd, nesterov) -> None:  # add(t, alpha): t <- t + alpha · ∂C/∂p
        if mu:
            v = self.velocity(p)
            v.mul_(mu)
            if wd:
                v.add_(p, alpha=wd)
            add(v, 1.0)  # v <- μ·v + ∂C/∂p + wd·p
            if not nesterov:
                p.add_(v, alpha=-lr)
                return
        if wd:
            p.mul_(1 - lr * wd)  # p − lr·wd·p, read before the gradient moves p
        add(p, -lr)  # p <- p − lr·(∂C/∂p + wd·p)
        if mu:
            p.add_(self.velocity(p), alpha=-lr * mu)  # Nesterov: ... − lr·μ·v

    def velocity(self, p) -> torch.Tensor:
        """torch.optim.SGD's momentum_buffer; zeros before the first step give its first step exactly."""
        if self.state[p].get("momentum_buffer") is None:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return self.state[p]["momentum_buffer"]

    def zero_grad(self, set_to_none: bool = True) -> None:  # nothing to zero: no .grad is ever made
        pass

    def state_dict(self) -> dict:
        buffers = [self.state[p].get("momentum_buffer") for p in self.params]
        state = {i: {"momentum_buffer": b} for i, b in enumerate(buffers) if b is not None}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, saved: dict) -> None:
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the saved optimiser has other parameters")
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        for i, p in enumerate(self.params):
            buffer = saved["state"].get(i, {}).get("momentum_buffer")
            if buffer is not None:
                if buffer.shape != p.shape:
                    raise ValueError(f"a saved momentum buffer has shape {tuple(buffer.shape)}, not {tuple(p.shape)}")
                self.state[p]["momentum_buffer"] = buffer.to(p.device, p.dtype).clone()


def hyper(o: Optim) -> dict:
    """The param_groups numbers of the configured optimiser, as torch.optim names them."""
    if o.name in ("adamw", "adam"):
        return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    return {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay}


def make_optimizer(model, cfg: Config, fused: bool):
    """FusedSGD for the fused SGD step; torch.optim.SGD, AdamW or Adam otherwise (random search: SGD, unused)."""
    o, params = cfg.optim, list(model.parameters())
    if o.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(params, foreach=True, **hyper(o))
    if fused:
        return FusedSGD(params, **hyper(o))
    return torch.optim.SGD(params, **hyper(o))


def set_hyper(optimizer, o: Optim) -> None:
    """Write the config's numbers into every param group: a resumed run trains with the config it is given, not the
    checkpoint's (its schedule, built afresh from lr, then steps to where the run was)."""
    for group in optimizer.param_groups:
        group.update(hyper(o))
        group.pop("initial_lr", None)


def materialise(layers, grads) -> None:
    """Each layer's gradient of the whole batch into .grad (for an optimiser that needs the whole gradient)."""
    for layer, g in zip(layers, grads, strict=True):
        for p, into in ((layer.weight, g.into), (layer.bias, g.bias_into)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
            into(p.grad, 1.0)


def clip_scale(grads, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (‖g‖ + 1e-6)) over every layer's gradient, ‖g‖
    the global 2-norm, from the factors (dist.Product.sq_norm: no gradient materialised); a tensor, no host sync."""
    total = torch.stack([g.sq_norm() for g in grads]).sum().sqrt()
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def describe(optimizer) -> str:
    """The optimiser and its numbers, as the step line shows them."""
    g = optimizer.param_groups[0]
    parts = []
    if "betas" in g:
        parts.append(f"betas ({g['betas'][0]:g}, {g['betas'][1]:g})")
    elif g["momentum"]:
        parts.append(f"{'Nesterov momentum' if g['nesterov'] else 'momentum'} {g['momentum']:g}")
    if g["weight_decay"]:
        parts.append(f"weight decay {g['weight_decay']:g}")
    return ", ".join(parts)
