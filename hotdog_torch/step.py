"""One step of gradient descent, every way this project takes it: forward, cost, backward, the optimiser's update.

`step(batch)` gives one (cost, outputs) pair per batch, on the device.  make_step picks the way for a config:
fused (fp32, ½·MSE: `backward` written out once gives each layer's gradient as its factors (δ, a), FusedSGD adds
−lr·δᵀa in one GEMM, AdamW/Adam step from .grad); windowed (plain SGD, constant lr: the first layer's updates of
`window` batches in one GEMM); autograd (C.backward(), optimizer.step(); DDP under torchrun).  Every step reads
lr, momentum, weight decay and betas from the optimiser's param_groups when it runs.  A new way to step is a new
function here and a branch in make_step, never a branch in the loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import dist, runtime
from .config import Config
from .cost import COSTS
from .model import FUNCTIONS, linear_layers
from .optim import describe, make_optimizer
from .products import FULL, Product, products

DERIVATIVE = {  # the activation's slope, written in terms of its output h
    "sigmoid": lambda h: h * (1 - h),
    "tanh": lambda h: 1 - h * h,
    "relu": lambda h: (h > 0).to(h.dtype),
}


@dataclass
class Batch:
    """What a step takes: this process's rows of one batch, or of `len(rows)` consecutive batches stacked (the
    windowed step's), with their one-hot targets and class weights."""

    x: torch.Tensor  # normalised images
    targets: torch.Tensor
    weights: torch.Tensor | None = None  # each row's weight in the cost (optim.class_weights); None: 1 each
    rows: list[int] | None = None  # this process's rows of each batch (None: one batch, all of x)
    sizes: list[int] | None = None  # each whole batch's size, every process's rows (they differ under torchrun)

    def __post_init__(self):
        self.rows = self.rows or [len(self.x)]
        self.sizes = self.sizes or self.rows


@dataclass
class Step:
    """step(batch) -> [(cost, outputs), ...], one pair per batch; a batch's cost is this process's part of the
    whole batch's mean cost.  window: the batches one call takes (the windowed step's; 1 otherwise)."""

    take: Callable[[Batch], list]
    window: int
    name: str
    optimizer: torch.optim.Optimizer
    precision: str = "fp32"  # what its matrix products run in: fp32, tf32 or bf16 (the step line, metrics.json)

    def __call__(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.take(batch)


# ---------------------------------------------------------------- a layer's gradient, kept as its factors


class Summed:
    """A layer's gradient materialised on each rank and summed over the ranks (all-reduce)."""

    def __init__(self, world: dist.World, delta: torch.Tensor, a: torch.Tensor):
        self.gradient, self.bias = dist.all_sum(world, delta.t() @ a), dist.all_sum(world, delta.sum(0))

    def into(self, t: torch.Tensor, alpha: float) -> None:
        t.add_(self.gradient, alpha=alpha)

    def bias_into(self, t: torch.Tensor, alpha: float) -> None:
        t.add_(self.bias, alpha=alpha)

    def scale_(self, c: torch.Tensor) -> None:
        self.gradient, self.bias = self.gradient * c, self.bias * c

    def sq_norm(self) -> torch.Tensor:
        return self.gradient.square().sum() + self.bias.square().sum()


def sync_bytes(world: dist.World, n: int, n_out: int, n_in: int, itemsize: int = 4) -> dict[str, int]:
    """The bytes each rank receives a step to share an n_in -> n_out layer's gradient of n rows: every other rank's
    δ and input rows (padded to the largest share), or a ring all-reduce's, which moves each number twice."""
    factors = (world.size - 1) * -(-n // world.size) * (n_out + n_in) * itemsize
    gradients = 2 * (world.size - 1) * (n_out * n_in + n_out) * itemsize // world.size
    return {"factors": factors, "gradients": gradients}


def shares_factors(world: dist.World, sync: str, n: int, n_out: int, n_in: int) -> bool:
    """train.ddp_sync: "factors", "gradients", or "auto", whichever makes each rank receive fewer bytes."""
    sent = sync_bytes(world, n, n_out, n_in)
    return sync == "factors" or (sync == "auto" and sent["factors"] < sent["gradients"])


def layer_gradient(world: dist.World, sync: str, delta, a, n: int, arithmetic=FULL) -> Product | Summed:
    """The whole batch's gradient of a layer (n rows) from this process's rows: its factors in one process; under
    torchrun every rank's factors, all-gathered, or the gradients, all-reduced (in fp32): the same update on every
    rank.  arithmetic: what the factors' product runs in (products.py)."""
    if not world.distributed:
        return arithmetic.product(delta, a)
    if shares_factors(world, sync, n, delta.shape[1], a.shape[1]):
        return arithmetic.product(dist.all_rows(world, delta, n), dist.all_rows(world, a, n))
    return Summed(world, delta, a)


# ---------------------------------------------------------------- backpropagation, written out once


@dataclass
class Backward:
    """What one forward and backward pass gives: the cost, the outputs, each layer's gradient (first layer first)."""

    cost: torch.Tensor
    outputs: torch.Tensor
    grads: list  # Product or Summed


@torch.no_grad()
def backward(layers, x, targets, activation, total, gradient=None, weights=None, keep=None, z1=None, mm=FULL):
    """Forward, C = ½·MSE, and backpropagation from the top: for each layer l, δ_l = ∂C/∂z_l and its input a_l.

        C       = ½ · Σ_rows Σ_outputs w·(a_L − y)² / batch       (w: the row's class weight, or 1)
        δ_L     = w·(a_L − y)·σ'(z_L) / batch
        δ_(l−1) = (δ_l W_l) ⊙ f'(z_(l−1)) ⊙ m_(l−1)     (m: dropout's kept units ÷ (1 − p), or 1)
        ∂C/∂W_l = δ_lᵀ a_l,  ∂C/∂b_l = Σ δ_l

    The batch has `total` rows, x this process's.  gradient(δ, a, total): the layer's gradient of the whole batch;
    keep(h): dropout's mask for a hidden output h; z1: the first layer's pre-activation, when already computed;
    mm: what the products run in (products.py: FP32 or BF16Products), everything else is in x's dtype."""
    act, slope = FUNCTIONS[activation], DERIVATIVE[activation]
    gradient = gradient or (lambda delta, a, total: mm.product(delta, a))
    a, hs, masks, inputs = x, [], [], [x]
    for i, layer in enumerate(layers[:-1]):
        h = act(z1 if i == 0 and z1 is not None else mm.linear(a, layer))
        m = keep(h) if keep else None
        a = h if m is None else h * m
        hs.append(h)
        masks.append(m)
        inputs.append(a)
    z = z1 if len(layers) == 1 and z1 is not None else mm.linear(a, layers[-1])
    out = torch.sigmoid(z)  # in fp32 whatever the products ran in
    diff = out - targets
    if weights is None:
        cost, delta = (diff * diff).sum() * (0.5 / total), diff * out * (1 - out) / total
    else:
        w = weights.view(-1, 1)
        cost, delta = (diff * diff * w).sum() * (0.5 / total), diff * out * (1 - out) * (w / total)
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        below = None
        if i > 0:
            below = mm.mm(delta, layers[i].weight) * slope(hs[i - 1])
            below = below if masks[i - 1] is None else below * masks[i - 1]
        grads[i], delta = gradient(delta, inputs[i], total), below
    return Backward(cost, out, grads)


# ---------------------------------------------------------------- the update


class FusedSGD(torch.optim.Optimizer):
    """torch.optim.SGD's update (dampening 0) from each layer's gradient factors: the first layer's 16384-wide
    gradient is never made.  An Optimizer that lr_scheduler drives, with SGD's state_dict (a checkpoint resumes on
    either path), built without Optimizer.__init__, which imports torch._dynamo (2 s of start-up) on first use."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        hyper = {"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay, "nesterov": nesterov}
        self.defaults = {**hyper, "maximize": False}
        self.param_groups = [{**self.defaults, "params": list(params)}]
        self.state: dict = {p: {} for p in self.params}
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post"):  # what Optimizer's methods read
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def params(self) -> list:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def step(self, layers, grads: list[Product]) -> None:
        """For every weight and bias p, g = ∂C/∂p (+ wd·p), the numbers read now: plain p <- p − lr·g; momentum
        v <- μ·v + g, p <- p − lr·v (Nesterov: p <- p − lr·(g + μ·v))."""
        group = self.param_groups[0]
        lr, mu, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        for layer, g in zip(layers, grads, strict=True):
            for p, add in ((layer.weight, g.into), (layer.bias, g.bias_into)):  # add(t, α): t <- t + α·∂C/∂p
                if mu:
                    v = self.velocity(p)
                    v.mul_(mu)
                    if wd:
                        v.add_(p, alpha=wd)
                    add(v, 1.0)  # v <- μ·v + ∂C/∂p + wd·p
                    if not nesterov:
                        p.add_(v, alpha=-lr)
                        continue
                if wd:
                    p.mul_(1 - lr * wd)  # p − lr·wd·p, read before the gradient moves p
                add(p, -lr)  # p <- p − lr·(∂C/∂p + wd·p)
                if mu:
                    p.add_(v, alpha=-lr * mu)  # Nesterov: ... − lr·μ·v

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


def clip_scale(grads: list[Product], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_'s factor min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ every layer's, from the factors; no host sync."""
    total = torch.stack([g.sq_norm() for g in grads]).sum().sqrt()
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def materialise(layers, grads: list[Product]) -> None:
    """Each layer's gradient of the whole batch into .grad (for an optimiser that needs the whole gradient)."""
    for layer, g in zip(layers, grads, strict=True):
        for p, into in ((layer.weight, g.into), (layer.bias, g.bias_into)):
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
            into(p.grad, 1.0)


# ---------------------------------------------------------------- the steps


def fused_step(model, optimizer, cfg: Config, world: dist.World, mm=FULL) -> Callable:
    """Backpropagation written out, the gradient clipped (optim.clip_grad_norm), the update: FusedSGD's from the
    factors, AdamW/Adam's from .grad; the products in mm's precision (products.py)."""
    layers, activation, p, clip = (
        linear_layers(model),
        cfg.model.activation,
        cfg.model.dropout,
        cfg.optim.clip_grad_norm,
    )
    dist.broadcast_weights(world, model)  # every rank from rank 0's start, as DistributedDataParallel does

    def gradient(delta, a, total):
        return layer_gradient(world, cfg.train.ddp_sync, delta, a, total, mm)

    def keep(h):  # dropout: each hidden unit kept with probability 1 − p, scaled by 1/(1 − p) as nn.Dropout does
        return torch.empty_like(h).bernoulli_(1 - p).div_(1 - p)

    def take(b: Batch):
        x, dropout = b.x.flatten(1), keep if p else None
        out = backward(layers, x, b.targets, activation, b.sizes[0], gradient, b.weights, dropout, mm=mm)
        if clip:
            scale = clip_scale(out.grads, clip)
            for g in out.grads:
                g.scale_(scale)
        if isinstance(optimizer, FusedSGD):
            optimizer.step(layers, out.grads)  # w <- w − lr · δᵀa, one GEMM a layer
        else:
            materialise(layers, out.grads)
            optimizer.step()
        return [(out.cost, out.outputs)]

    return take


@torch.no_grad()
def sgd_window(layers, optimizer: FusedSGD, activation: str, b: Batch, mm=FULL) -> list:
    """Plain SGD over k consecutive batches, the first layer's k updates deferred to one GEMM: the same k steps.
    With W the first layer's weights at the window's start and δ_s step s's ∂C/∂z, step j's first-layer input is
        z_j = x_j W_jᵀ + b_j = x_j Wᵀ − lr Σ_{s<j} (x_j x_sᵀ) δ_s + b_j,
    so every x_j Wᵀ is one (k·B)-row GEMM, and after the window W <- W − lr Dᵀ X is one GEMM of inner size k·B,
    nearer the CPU's peak than k 64-row ones (docs/BENCHMARKS.md).  Upper layers and biases update every step; the
    products in mm's precision (products.py)."""
    lr, first, X = optimizer.param_groups[0]["lr"], layers[0], b.x.flatten(1)
    Z0 = mm.mm(X, first.weight.t())  # every batch of the window against the window's starting weights
    D = torch.empty(len(X), first.out_features, dtype=X.dtype, device=X.device)  # the δ_s, row-aligned with X
    results, o = [], 0
    for n in b.rows:
        z = Z0[o : o + n] + first.bias
        if o:  # the updates of this window's earlier steps, not yet applied to W
            z.addmm_(mm.mm(X[o : o + n], X[:o].t()), D[:o], alpha=-lr)
        w = None if b.weights is None else b.weights[o : o + n]
        out = backward(layers, X[o : o + n], b.targets[o : o + n], activation, n, weights=w, z1=z, mm=mm)
        optimizer.step(layers[1:], out.grads[1:])
        out.grads[0].bias_into(first.bias, -lr)
        D[o : o + n] = out.grads[0].delta
        results.append((out.cost, out.outputs))
        o += n
    mm.product(D, X).into(first.weight, -lr)  # the window's first-layer updates in one GEMM: W <- W − lr Σ_s δ_sᵀ x_s
    return results


def autograd_step(model, optimizer, cfg: Config, device: torch.device, world: dist.World) -> Callable:
    """The textbook step: forward, cost, backward, the optimiser's step.  Under torchrun DistributedDataParallel
    averages the ranks' gradients: each rank's cost weighed by world size × its rows ÷ the batch's rows."""
    forward = torch.compile(model) if cfg.train.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    cost_fn, clip, bf16 = (
        COSTS[cfg.optim.cost],
        cfg.optim.clip_grad_norm,
        runtime.precision(cfg.train.precision, device, fused=False) == "bf16",
    )

    def take(b: Batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(b.x)
        cost = cost_fn(outputs.to(b.targets.dtype), b.targets, b.weights)  # C = ½ · mean Σ (a − y)², in fp32
        share = b.rows[0] / b.sizes[0]  # 1 in one process
        if not b.rows[0]:  # a torchrun share of no rows (a batch smaller than the ranks): its mean is NaN, its part 0
            cost = outputs.sum() * 0.0
        optimizer.zero_grad()  # set_to_none: faster than zeroing and accumulating into old buffers
        (cost * (share * world.size) if world.distributed else cost).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()  # w <- w − lr · ∂C/∂w  (or AdamW's, with the numbers of its param_groups)
        return [((cost * share).detach() if world.distributed else cost.detach(), outputs.detach())]

    return take


def fuses(cfg: Config, device: torch.device, world: dist.World = dist.SINGLE) -> bool:
    """The fused path (fp32 or bf16): ½·MSE, not compiled; dropout in one process only."""
    o = cfg.optim
    return o.fused and o.cost == "half_mse" and not cfg.train.compile and not (cfg.model.dropout and world.distributed)


def windowed(cfg: Config, world: dist.World = dist.SINGLE) -> bool:
    """Plain SGD at a constant lr in one process, no decay, clipping or dropout: windows for the first layer."""
    o = cfg.optim
    plain = o.name == "sgd" and not (o.momentum or o.weight_decay or o.clip_grad_norm or cfg.model.dropout)
    constant = o.schedule == "constant" and not o.warmup_steps
    return plain and constant and o.fused_window > 1 and not world.distributed


def make_step(model, cfg: Config, device: torch.device, world: dist.World = dist.SINGLE, optimizer=None) -> Step:
    """The training step for this config, with its optimiser (cfg.optim's unless given: FusedSGD when fused)."""
    fused = fuses(cfg, device, world)
    optimizer = optimizer or make_optimizer(model, cfg, FusedSGD if fused else None)
    window = cfg.optim.fused_window if fused and windowed(cfg, world) else 1
    how = (cfg.train.precision, device, fused)
    matmuls = runtime.matmuls(*how)
    name, mm = describe(cfg, optimizer, fused, window, matmuls, world.size), products(runtime.precision(*how))
    if window > 1:
        layers, activation = linear_layers(model), cfg.model.activation
        return Step(lambda b: sgd_window(layers, optimizer, activation, b, mm), window, name, optimizer, matmuls)
    if fused:
        return Step(fused_step(model, optimizer, cfg, world, mm), 1, name, optimizer, matmuls)
    return Step(autograd_step(model, optimizer, cfg, device, world), 1, name, optimizer, matmuls)
