"""Every way of taking a gradient-descent step, behind one interface.

A Step is called as step(x, targets, sizes) with `step.window` consecutive batches
stacked in x (their lengths in sizes) and returns one (cost, outputs) pair per
batch, left on the device.  make_step picks the way for a config:

- autograd: the network forward, C = ½·MSE (or the configured cost), C.backward(),
  torch.optim.SGD's w <- w - lr·∂C/∂w (with momentum when optim.momentum > 0);
- fused: backpropagation written out, the update folded into the weight-gradient
  product (plain SGD in fp32);
- windowed fused: the same SGD, the first layer's updates of `window` steps in one GEMM.

A new way to step is a new function here and a branch in make_step, never a branch in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import dist
from .config import Config
from .cost import COSTS
from .model import FUNCTIONS, linear_layers

DERIVATIVE = {  # the activation's slope, written in terms of its output h
    "sigmoid": lambda h: h * (1 - h),
    "tanh": lambda h: 1 - h * h,
    "relu": lambda h: (h > 0).to(h.dtype),
}


@dataclass
class Step:
    """take(x, targets, sizes, totals) -> [(cost, outputs), ...]: `window` batches per call, one pair per batch.

    sizes are this process's rows of each batch, totals the whole batches' (they differ under torchrun, where
    each rank holds its share); a batch's cost is this process's part of the whole batch's mean cost.
    """

    take: Callable
    window: int
    name: str

    def __call__(self, x, targets, sizes, totals=None):
        return self.take(x, targets, sizes, totals or sizes)


@torch.no_grad()
def fused_sgd_step(model, x, targets, lr, activation, total=None, gradient=dist.Product):
    """One step of plain gradient descent with backpropagation written out, for the MLP.

    Instead of materialising each weight gradient dC/dW = deltaᵀ·a (for the first
    layer a 512 x 49152 matrix, 100 MB, every step) and then subtracting lr times
    it, the update is one GEMM that accumulates into the weights:
    W.addmm_(deltaᵀ, a, alpha=-lr), i.e. W <- W - lr * deltaᵀ·a.  Same maths as
    autograd + torch.optim.SGD(momentum=0); tests check the two give the same weights.
    """

    def update(layer, g):
        g.into(layer.weight, -lr)  # W <- W − lr · δᵀ a
        g.bias_into(layer.bias, -lr)  # b <- b − lr · Σ δ

    return _backprop(model, x, targets, activation, update, total or len(x), gradient)


@torch.no_grad()
def fused_momentum_step(
    model, x, targets, lr, activation, momentum, nesterov, velocity, total=None, gradient=dist.Product
):
    """One step of SGD with momentum, torch.optim.SGD's (dampening 0), with backpropagation written out.

    The gradient product is accumulated straight into the velocity buffer, no fresh gradient tensor:
        v <- μ·v + δᵀa        (v.mul_(μ).addmm_(δᵀ, a))
        W <- W − lr·v         (heavy ball), or W <- W − lr·(δᵀa + μ·v)  (Nesterov)
    velocity maps each parameter to its buffer (torch.optim.SGD's momentum_buffer, so checkpoints and the
    autograd path share it).  Tests check it against autograd + torch.optim.SGD step by step.
    """

    def move(p, add):  # add(t, alpha): t <- t + alpha · ∂C/∂p
        v = velocity(p)
        v.mul_(momentum)
        add(v, 1.0)  # v <- μ·v + ∂C/∂p
        if nesterov:
            add(p, -lr)  # p <- p − lr·∂C/∂p ...
            p.add_(v, alpha=-lr * momentum)  # ... − lr·μ·v
        else:
            p.add_(v, alpha=-lr)

    def update(layer, g):
        move(layer.weight, g.into)
        move(layer.bias, g.bias_into)

    return _backprop(model, x, targets, activation, update, total or len(x), gradient)


def _output_delta(out, targets, total=None):
    """C = ½ · mean_batch Σ_outputs (a − y)², and ∂C/∂z of the sigmoid output layer: (a − y)·a·(1 − a) / batch.

    The batch has `total` rows, of which out holds this process's (all of them, outside torchrun).
    """
    diff, total = out - targets, total or len(out)
    return (diff * diff).sum() * (0.5 / total), diff * out * (1 - out) / total


def _backprop(model, x, targets, activation, update, total, gradient):
    """Forward, C = ½·MSE, and backpropagation layer by layer from the top, calling update(layer, gradient) once
    the layer below has its δ (so each weight is read before it moves); returns (cost, outputs).

    gradient(δ, a, total) is the layer's gradient of the whole batch: dist.Product in one process."""
    layers = linear_layers(model)
    act = FUNCTIONS[activation]
    a = x.flatten(1)
    inputs = []  # each layer's input activation a_l
    for layer in layers[:-1]:
        inputs.append(a)
        a = act(torch.addmm(layer.bias, a, layer.weight.t()))
    inputs.append(a)
    out = torch.sigmoid(torch.addmm(layers[-1].bias, a, layers[-1].weight.t()))
    cost, delta = _output_delta(out, targets, total)
    for i in range(len(layers) - 1, -1, -1):
        below = (delta @ layers[i].weight) * DERIVATIVE[activation](inputs[i]) if i > 0 else None  # before W moves
        update(layers[i], gradient(delta, inputs[i], total))
        delta = below
    return cost, out


@torch.no_grad()
def fused_sgd_window(model, X, T, sizes, lr, activation):
    """Plain gradient descent over k consecutive batches, with the first layer's k updates deferred to one GEMM.

    X and T hold the k batches one after another, sizes their lengths.
    The math is the same k steps of SGD.  Let W be the first layer's weights at the
    window's start and δ_s the gradient of step s's cost with respect to its
    pre-activations.  Step j's first-layer input is then
        z_j = x_j W_jᵀ + b_j = x_j Wᵀ − lr Σ_{s<j} (x_j x_sᵀ) δ_s + b_j,
    so every batch's x_j Wᵀ is one (k·B)-row GEMM, the pending updates enter through
    small Gram blocks x_j x_sᵀ, and after the window W ← W − lr Dᵀ X is one GEMM with
    an inner dimension of k·B.  Those tall products run nearer the CPU's peak than k
    separate 64-row ones (docs/BENCHMARKS.md).  The upper layers update every step.
    """
    layers = linear_layers(model)
    first, upper = layers[0], layers[1:]
    act = FUNCTIONS[activation] if upper else torch.sigmoid
    X = X.flatten(1)
    Z0 = X @ first.weight.t()  # every batch of the window against the window's starting weights
    D = torch.empty(len(X), first.out_features, dtype=X.dtype, device=X.device)  # the δ_s, row-aligned with X
    results, o = [], 0
    for n in sizes:
        t = T[o : o + n]
        z = Z0[o : o + n] + first.bias
        if o:  # the updates of this window's earlier steps, not yet applied to W
            z.addmm_(X[o : o + n] @ X[:o].t(), D[:o], alpha=-lr)
        cost, out, delta = _upper_step(upper, act(z), t, lr, activation)
        first.bias.add_(delta.sum(0), alpha=-lr)
        D[o : o + n] = delta
        results.append((cost, out))
        o += n
    first.weight.addmm_(D.t(), X, alpha=-lr)  # the window's first-layer updates in one GEMM: W <- W − lr Σ_s δ_sᵀ x_s
    return results


def _upper_step(upper, a, t, lr, activation):
    """Forward and backward through the layers above the first, updating them; returns (cost, outputs, δ of layer 1)."""
    inputs = [a]  # inputs[k]: what upper[k] reads
    for k, layer in enumerate(upper, start=1):
        act = torch.sigmoid if k == len(upper) else FUNCTIONS[activation]
        a = act(torch.addmm(layer.bias, a, layer.weight.t()))
        inputs.append(a)
    out = a
    cost, delta = _output_delta(out, t)
    for k in range(len(upper) - 1, -1, -1):
        layer = upper[k]
        below = (delta @ layer.weight) * DERIVATIVE[activation](inputs[k])  # before W moves
        layer.weight.addmm_(delta.t(), inputs[k], alpha=-lr)  # W <- W − lr · δᵀ a
        layer.bias.add_(delta.sum(0), alpha=-lr)
        delta = below
    return cost, out, delta


def autograd_step(model, optimizer, cfg: Config, precision: str, device: torch.device, world: dist.World) -> Callable:
    """The textbook step: forward, cost, backward, torch.optim.SGD; under torchrun, DistributedDataParallel.

    DDP averages the ranks' gradients; each rank's cost is weighted by its share of the batch (world size ×
    its rows ÷ the batch's rows), so that the average is the gradient of the whole batch's mean cost.
    """
    forward = torch.compile(model) if cfg.train.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    cost_fn = COSTS[cfg.optim.cost]

    def take(x, targets, sizes, totals):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = forward(x)
        cost = cost_fn(outputs.to(targets.dtype), targets)  # C = ½ · mean_batch Σ_outputs (a − y)², in fp32 under bf16
        share = sizes[0] / totals[0]  # 1 in one process
        optimizer.zero_grad()  # set_to_none: measured faster here than zeroing and accumulating into old buffers
        (cost * (share * world.size) if world.distributed else cost).backward()
        optimizer.step()  # w <- w − lr · ∂C/∂w  (plus momentum when optim.momentum > 0)
        return [((cost * share).detach() if world.distributed else cost.detach(), outputs.detach())]

    return take


def resolve_precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def fuses(cfg: Config, device: torch.device) -> bool:
    """Does this config take the fused path (SGD in fp32 on ½·MSE, not compiled)?"""
    o = cfg.optim
    return o.fused and resolve_precision(cfg, device) == "fp32" and not cfg.train.compile and o.cost == "half_mse"


class FusedSGD:
    """The optimiser of the fused steps: torch.optim.SGD's hyper-parameters and momentum buffers, without building
    torch.optim.SGD, whose first construction imports torch._dynamo (1.5 s of start-up here).  Its state_dict has
    SGD's form, so a checkpoint resumes on either path."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool):
        self.params = list(params)
        hyper = {"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": 0, "nesterov": nesterov}
        self.param_groups = [{**hyper, "maximize": False}]
        self.state: dict = {p: {} for p in self.params}

    def state_dict(self) -> dict:
        buffers = [self.state[p].get("momentum_buffer") for p in self.params]
        state = {i: {"momentum_buffer": b} for i, b in enumerate(buffers) if b is not None}
        return {"state": state, "param_groups": [{**self.param_groups[0], "params": list(range(len(self.params)))}]}

    def load_state_dict(self, saved: dict) -> None:
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the saved optimiser has other parameters")
        for i, p in enumerate(self.params):
            buffer = saved["state"].get(i, {}).get("momentum_buffer")
            if buffer is not None:
                if buffer.shape != p.shape:
                    raise ValueError(f"a saved momentum buffer has shape {tuple(buffer.shape)}, not {tuple(p.shape)}")
                self.state[p]["momentum_buffer"] = buffer.to(p.device, p.dtype).clone()


def make_optimizer(model, cfg: Config, device: torch.device):
    """torch.optim.SGD for the autograd step; for the fused steps, FusedSGD (the same state, built in no time)."""
    o = cfg.optim
    if fuses(cfg, device):
        return FusedSGD(model.parameters(), o.lr, o.momentum, o.nesterov)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def make_step(model, optimizer, cfg: Config, device: torch.device, world: dist.World = dist.SINGLE) -> Step:
    """The training step for this config (and this process's place among torchrun's)."""
    precision = resolve_precision(cfg, device)
    o = cfg.optim
    if fuses(cfg, device):
        step = fused_step(model, optimizer, cfg, world)
        if cfg.train.cuda_graphs and device.type == "cuda":
            step = cuda_graphed(step, model, optimizer)
        return step
    take = autograd_step(model, optimizer, cfg, precision, device, world)
    cost_name = "" if o.cost == "half_mse" else f", cost {o.cost}"
    compiled = ", compiled" if cfg.train.compile else ""
    ddp = f", DistributedDataParallel over {world.size} processes" if world.distributed else ""
    return Step(take, 1, f"autograd + torch.optim.SGD ({precision}{compiled}{cost_name}{ddp})")


def fused_step(model, optimizer, cfg: Config, world: dist.World = dist.SINGLE) -> Step:
    """Backpropagation written out: plain SGD (windowed when optim.fused_window > 1), or SGD with momentum.

    Under torchrun each layer's gradient of the whole batch comes from every rank's rows (dist.gradient), and
    the step goes one batch at a time: a window would need every rank's inputs for its Gram blocks.
    """
    o, activation = cfg.optim, cfg.model.activation

    def gradient(delta, a, total):
        return dist.gradient(world, cfg.train.ddp_sync, delta, a, total)

    shared = f", {world.size} processes" if world.distributed else ""
    if o.momentum:
        state = optimizer.state

        def velocity(p):  # torch.optim.SGD's own buffer; zeros before the first step give its first step exactly
            if state[p].get("momentum_buffer") is None:
                state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state[p]["momentum_buffer"]

        def momentum_step(X, T, sizes, totals):
            return [
                fused_momentum_step(
                    model, X, T, o.lr, activation, o.momentum, o.nesterov, velocity, totals[0], gradient
                )
            ]

        kind = "Nesterov momentum" if o.nesterov else "momentum"
        return Step(momentum_step, 1, f"fused SGD with {kind} {o.momentum:g} (fp32{shared})")

    def plain_step(X, T, sizes, totals):
        return [fused_sgd_step(model, X, T, o.lr, activation, totals[0], gradient)]

    def window_step(X, T, sizes, totals):
        return fused_sgd_window(model, X, T, sizes, o.lr, activation)

    if o.fused_window == 1 or world.distributed:
        return Step(plain_step, 1, f"fused SGD (fp32{shared})")
    name = f"fused SGD (fp32, first-layer updates in windows of {o.fused_window} steps)"
    return Step(window_step, o.fused_window, name)


def cuda_graphed(step: Step, model, optimizer) -> Step:
    """The step captured once as a CUDA graph for the batch sizes of its first window, then replayed for every
    window of those sizes: one launch instead of one per operation.  Other windows (the epoch's last, short
    batch) run the step as it is.

    Capture needs warm-up runs of the step first; they move the weights, so the weights and momentum buffers
    are put back before capture, and the run goes on as if they had never happened.  The results are the
    graph's own tensors, overwritten by the next replay: the loop copies them at once, on the same stream.
    """
    graph, static = None, {}

    def take(x, targets, sizes):
        nonlocal graph
        if graph is None:
            static["sizes"] = sizes
            graph = _capture(step, static, x, targets, sizes, model, optimizer)
        if sizes != static["sizes"]:
            return step(x, targets, sizes)
        static["x"].copy_(x)
        static["t"].copy_(targets)
        graph.replay()
        return static["results"]

    return Step(take, step.window, step.name + ", replayed as a CUDA graph")


def _capture(step: Step, static: dict, x, targets, sizes, model, optimizer):
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = lambda: [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]  # noqa: E731
    saved += [(b, b.clone()) for b in buffers()]
    static["x"], static["t"] = x.clone(), targets.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuBLAS and the caching allocator settle before capture
            step(static["x"], static["t"], sizes)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for tensor, before in saved:
            tensor.copy_(before)
        for b in buffers():  # buffers the warm-up created start from zero, as they would have
            if all(b is not t for t, _ in saved):
                b.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static["results"] = step(static["x"], static["t"], sizes)
    return graph
