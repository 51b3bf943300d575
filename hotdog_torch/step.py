"""Every way of taking a gradient-descent step, behind one interface.

A Step is called as step(x, targets, sizes, totals, weights) with `step.window` consecutive batches stacked in x
(their lengths in sizes) and returns one (cost, outputs) pair per batch, left on the device.  make_step picks the
way for a config:

- autograd: the network forward, C = ½·MSE (or the configured cost), C.backward(), optimizer.step();
- fused: `backward` below, the backpropagation written out once, gives each layer's gradient as its two factors
  (δ, a); the optimiser applies them: FusedSGD as one GEMM into the weights (or the velocity), torch's AdamW/Adam
  after one GEMM into .grad;
- windowed fused: plain SGD, the first layer's updates of `window` steps in one GEMM, the rest through `backward`.

Every step reads its numbers (lr, momentum, weight decay, betas) from the optimiser's param_groups when it runs,
so a schedule or a resumed run's override drives every path alike.
A new way to step is a new function here and a branch in make_step, never a branch in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import dist
from .config import Config, UserError
from .cost import COSTS
from .model import FUNCTIONS, linear_layers
from .optim import NAMES, FusedSGD, clip_scale, describe, materialise

DERIVATIVE = {  # the activation's slope, written in terms of its output h
    "sigmoid": lambda h: h * (1 - h),
    "tanh": lambda h: 1 - h * h,
    "relu": lambda h: (h > 0).to(h.dtype),
}


class Step(Protocol):
    """step(x, targets, sizes, totals, weights) -> [(cost, outputs), ...]: `window` batches a call, one pair each.

    sizes are this process's rows of each batch, totals the whole batches' (they differ under torchrun, where each
    rank holds its share); weights, when not None, each row's weight in the cost (optim.class_weights).  A batch's
    cost is this process's part of the whole batch's mean cost."""

    window: int
    name: str

    def __call__(self, x, targets, sizes, totals=None, weights=None) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class Stepper:
    """A Step made of a function take(x, targets, sizes, totals, weights)."""

    take: Callable
    window: int
    name: str

    def __call__(self, x, targets, sizes, totals=None, weights=None):
        return self.take(x, targets, sizes, totals or sizes, weights)


@dataclass
class Backward:
    """What one forward and backward pass gives: the cost, the outputs, and each layer's gradient of the whole batch
    (first layer first) as dist.Product (δᵀa kept as its factors) or dist.Summed."""

    cost: torch.Tensor
    outputs: torch.Tensor
    grads: list


def _output_delta(out, targets, total, weights=None):
    """C = ½ · mean_batch Σ_outputs w·(a − y)², and ∂C/∂z of the sigmoid output layer: w·(a − y)·a·(1 − a) / batch.

    The batch has `total` rows, of which out holds this process's (all of them, outside torchrun); w, each row's
    class weight, is 1 without optim.class_weights."""
    diff = out - targets
    if weights is None:
        return (diff * diff).sum() * (0.5 / total), diff * out * (1 - out) / total
    w = weights.view(-1, 1)
    return (diff * diff * w).sum() * (0.5 / total), diff * out * (1 - out) * (w / total)


@torch.no_grad()
def backward(layers, x, targets, activation, total, gradient=dist.Product, weights=None, keep=None, z1=None):
    """Forward, C = ½·MSE, and backpropagation from the top: for each layer l, δ_l = ∂C/∂z_l and its input a_l.

        δ_L     = w·(a_L − y)·σ'(z_L) / batch
        δ_(l−1) = (δ_l W_l) ⊙ f'(z_(l−1)) ⊙ m_(l−1)     (m: dropout's kept units ÷ (1 − p), or 1)
        ∂C/∂W_l = δ_lᵀ a_l,  ∂C/∂b_l = Σ δ_l

    Nothing moves: every δ is computed from the weights as they are, and the optimiser applies the result.
    gradient(δ, a, total) is the layer's gradient of the whole batch (dist.Product in one process); keep(h) draws
    dropout's mask for a hidden layer's output h; z1, when given, is the first layer's pre-activation, already
    computed (the windowed step)."""
    act, slope = FUNCTIONS[activation], DERIVATIVE[activation]
    a, hs, masks, inputs = x, [], [], [x]
    for i, layer in enumerate(layers[:-1]):
        h = act(z1 if i == 0 and z1 is not None else torch.addmm(layer.bias, a, layer.weight.t()))
        m = keep(h) if keep else None
        a = h if m is None else h * m
        hs.append(h)
        masks.append(m)
        inputs.append(a)
    last = layers[-1]
    z = z1 if len(layers) == 1 and z1 is not None else torch.addmm(last.bias, a, last.weight.t())
    out = torch.sigmoid(z)
    cost, delta = _output_delta(out, targets, total, weights)
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        below = None
        if i > 0:
            below = (delta @ layers[i].weight) * slope(hs[i - 1])
            below = below if masks[i - 1] is None else below * masks[i - 1]
        grads[i] = gradient(delta, inputs[i], total)
        delta = below
    return Backward(cost, out, grads)


@torch.no_grad()
def apply(optimizer, layers, grads, clip: float | None) -> None:
    """The optimiser's update from a backward's gradients, clipped to a global norm of `clip` when set."""
    scale = clip_scale(grads, clip) if clip else None
    if isinstance(optimizer, FusedSGD):
        optimizer.step(layers, grads, scale)
        return
    if scale is not None:
        for g in grads:
            g.scale_(scale)
    materialise(layers, grads)
    optimizer.step()


@torch.no_grad()
def fused_sgd_window(layers, X, T, sizes, optimizer: FusedSGD, activation, weights=None):
    """Plain gradient descent over k consecutive batches, with the first layer's k updates deferred to one GEMM.

    X and T hold the k batches one after another, sizes their lengths.
    The math is the same k steps of SGD.  Let W be the first layer's weights at the
    window's start and δ_s the gradient of step s's cost with respect to its
    pre-activations.  Step j's first-layer input is then
        z_j = x_j W_jᵀ + b_j = x_j Wᵀ − lr Σ_{s<j} (x_j x_sᵀ) δ_s + b_j,
    so every batch's x_j Wᵀ is one (k·B)-row GEMM, the pending updates enter through
    small Gram blocks x_j x_sᵀ, and after the window W ← W − lr Dᵀ X is one GEMM with
    an inner dimension of k·B.  Those tall products run nearer the CPU's peak than k
    separate 64-row ones (docs/BENCHMARKS.md).  The upper layers and every bias update every step.
    """
    lr, first = optimizer.param_groups[0]["lr"], layers[0]
    X = X.flatten(1)
    Z0 = X @ first.weight.t()  # every batch of the window against the window's starting weights
    D = torch.empty(len(X), first.out_features, dtype=X.dtype, device=X.device)  # the δ_s, row-aligned with X
    results, o = [], 0
    for n in sizes:
        z = Z0[o : o + n] + first.bias
        if o:  # the updates of this window's earlier steps, not yet applied to W
            z.addmm_(X[o : o + n] @ X[:o].t(), D[:o], alpha=-lr)
        w = None if weights is None else weights[o : o + n]
        b = backward(layers, X[o : o + n], T[o : o + n], activation, n, weights=w, z1=z)
        optimizer.step(layers[1:], b.grads[1:])
        b.grads[0].bias_into(first.bias, -lr)
        D[o : o + n] = b.grads[0].delta
        results.append((b.cost, b.outputs))
        o += n
    first.weight.addmm_(D.t(), X, alpha=-lr)  # the window's first-layer updates in one GEMM: W <- W − lr Σ_s δ_sᵀ x_s
    return results


def autograd_step(model, optimizer, cfg: Config, precision: str, device: torch.device, world: dist.World) -> Callable:
    """The textbook step: forward, cost, backward, the optimiser's step; under torchrun, DistributedDataParallel.

    DDP averages the ranks' gradients; each rank's cost is weighted by its share of the batch (world size ×
    its rows ÷ the batch's rows), so that the average is the gradient of the whole batch's mean cost.
    """
    forward = torch.compile(model) if cfg.train.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    cost_fn, clip = COSTS[cfg.optim.cost], cfg.optim.clip_grad_norm

    def take(x, targets, sizes, totals, weights):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = forward(x)
        cost = cost_fn(outputs.to(targets.dtype), targets, weights)  # C = ½ · mean_batch Σ_outputs (a − y)², in fp32
        share = sizes[0] / totals[0]  # 1 in one process
        if not sizes[0]:  # a torchrun share of no rows (a batch smaller than the ranks): its mean is NaN, its part 0
            cost = outputs.sum() * 0.0
        optimizer.zero_grad()  # set_to_none: measured faster here than zeroing and accumulating into old buffers
        (cost * (share * world.size) if world.distributed else cost).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()  # w <- w − lr · ∂C/∂w  (or AdamW's, with the numbers of its param_groups)
        return [((cost * share).detach() if world.distributed else cost.detach(), outputs.detach())]

    return take


def matmuls(precision: str, device: torch.device) -> str:
    """What the matmuls really run in, for the step line: bf16 under autocast; TF32 for fp32 on a CUDA GPU that
    allows it (runtime.use_tf32 does); fp32 otherwise."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def resolve_precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def fuses(cfg: Config, device: torch.device, world: dist.World = dist.SINGLE) -> bool:
    """Does this config take the fused path (fp32 on ½·MSE, not compiled; dropout in one process only)?"""
    o = cfg.optim
    plain = resolve_precision(cfg, device) == "fp32" and not cfg.train.compile and o.cost == "half_mse"
    return o.fused and plain and o.name != "random_search" and not (cfg.model.dropout and world.distributed)


def windowed(cfg: Config, world: dist.World = dist.SINGLE) -> bool:
    """Plain SGD at a constant lr in one process, no decay, clipping or dropout: the first layer may go in windows."""
    o = cfg.optim
    plain = o.name == "sgd" and not (o.momentum or o.weight_decay or o.clip_grad_norm or cfg.model.dropout)
    constant = o.schedule == "constant" and not o.warmup_steps
    return plain and constant and o.fused_window > 1 and not world.distributed


def check_step(cfg: Config, device: torch.device, world: dist.World = dist.SINGLE) -> None:
    """Refuse, in one sentence, a config no step can take here (train.py asks before anything is written):
    random search under torchrun, and train.cuda_graphs wherever the graph could not be what runs."""
    if world.distributed and cfg.optim.name == "random_search":
        raise UserError("random search runs in one process: start it without torchrun")
    o, why = cfg.optim, "train.cuda_graphs replays the fused fp32 SGD step"
    refusals = [
        (device.type != "cuda", f"train.cuda_graphs needs a CUDA device, but this run trains on {device}"),
        (o.name == "random_search", "train.cuda_graphs has no step to replay in a random search"),
        # a graph would capture the collectives of one step and replay them blindly
        (world.distributed, "train.cuda_graphs runs in one process: start it without torchrun"),
        (resolve_precision(cfg, device) != "fp32", f"{why}: it needs train.precision=fp32 (auto is bf16 on CUDA)"),
        (not o.fused, f"{why}: it needs optim.fused=true"),
        (o.cost != "half_mse", f"{why}: it needs optim.cost=half_mse"),
        (cfg.train.compile, f"{why}: it needs train.compile=false"),
        (o.name != "sgd", "train.cuda_graphs replays the lr it captured: it needs optim.name=sgd, a constant lr"),
        (
            o.schedule != "constant" or o.warmup_steps,
            "train.cuda_graphs replays the lr it captured: it needs a constant lr",
        ),
        # the warm-up before capture draws masks no step uses, so a resumed run (captured again) would draw others
        (cfg.model.dropout > 0, "train.cuda_graphs resumes exactly only without dropout: it needs model.dropout=0"),
    ]
    refused = next((why for wrong, why in refusals if wrong), None) if cfg.train.cuda_graphs else None
    if refused:
        raise UserError(f"{refused}; or set train.cuda_graphs=false")


def make_step(model, optimizer, cfg: Config, device: torch.device, world: dist.World = dist.SINGLE) -> Step:
    """The training step for this config (and this process's place among torchrun's)."""
    check_step(cfg, device, world)
    if fuses(cfg, device, world):
        step = fused_step(model, optimizer, cfg, world, matmuls("fp32", device))
        return cuda_graphed(step, model, optimizer) if cfg.train.cuda_graphs else step
    precision = resolve_precision(cfg, device)
    take = autograd_step(model, optimizer, cfg, precision, device, world)
    o = cfg.optim
    details = [matmuls(precision, device)] + (["compiled"] if cfg.train.compile else []) + _extras(cfg)
    details += [f"cost {o.cost}"] if o.cost != "half_mse" else []
    details += [f"DistributedDataParallel over {world.size} processes"] if world.distributed else []
    return Stepper(take, 1, f"autograd + torch.optim.{NAMES[o.name]} ({', '.join(details)})")


def _extras(cfg: Config) -> list[str]:
    o, extras = cfg.optim, []
    extras += [f"{o.schedule} schedule"] if o.schedule != "constant" else []
    extras += [f"{o.warmup_steps} warm-up steps"] if o.warmup_steps else []
    extras += [f"clip {o.clip_grad_norm:g}"] if o.clip_grad_norm else []
    extras += [f"dropout {cfg.model.dropout:g}"] if cfg.model.dropout else []
    extras += [f"class weights {o.class_weights}"] if o.class_weights is not None else []
    return extras


def fused_step(model, optimizer, cfg: Config, world: dist.World = dist.SINGLE, precision: str = "fp32") -> Step:
    """Backpropagation written out (`backward`) and the optimiser's update from its factors; plain SGD at a
    constant lr takes the first layer's updates in windows of optim.fused_window steps.

    Under torchrun each layer's gradient of the whole batch comes from every rank's rows (dist.gradient), and
    the step goes one batch at a time: a window would need every rank's inputs for its Gram blocks.
    """
    o, activation, layers, p = cfg.optim, cfg.model.activation, linear_layers(model), cfg.model.dropout
    dist.broadcast_weights(world, model)  # every rank from rank 0's start, as DistributedDataParallel does

    def gradient(delta, a, total):
        return dist.gradient(world, cfg.train.ddp_sync, delta, a, total)

    def keep(h):  # dropout: each hidden unit kept with probability 1 − p, scaled by 1/(1 − p) as nn.Dropout does
        return torch.empty_like(h).bernoulli_(1 - p).div_(1 - p)

    def take(x, targets, sizes, totals, weights):
        b = backward(layers, x.flatten(1), targets, activation, totals[0], gradient, weights, keep if p else None)
        apply(optimizer, layers, b.grads, o.clip_grad_norm)
        return [(b.cost, b.outputs)]

    def window_step(x, targets, sizes, totals, weights):
        return fused_sgd_window(layers, x, targets, sizes, optimizer, activation, weights)

    window = o.fused_window if windowed(cfg, world) else 1
    details = [f"first-layer updates in windows of {window} steps"] if window > 1 else []
    details += _extras(cfg) + ([f"{world.size} processes"] if world.distributed else [])
    details, how = ", ".join([precision, *details]), describe(optimizer)  # precision: what make_step's matmuls says
    if isinstance(optimizer, FusedSGD):
        name = f"fused SGD{' with ' + how if how else ''} ({details})"
    else:
        name = f"fused backward + torch.optim.{NAMES[o.name]}{', ' + how if how else ''} ({details})"
    return Stepper(take, 1, name) if window == 1 else Stepper(window_step, window, name)


def cuda_graphed(step: Step, model, optimizer) -> Step:
    """The step captured as a CUDA graph once for each sizes of window it meets (the whole batches, the epoch's
    last, short one), then replayed for every window of those sizes: one launch instead of one per operation.
    Every window replays a graph, whichever size a run (or a resumed run) meets first.  The graph holds the lr it
    was captured with: check_step lets it run only at a constant lr, for FusedSGD, without dropout.

    Capture needs warm-up runs of the step first; they move the weights, so the weights and momentum buffers
    are put back before capture, and the run goes on as if they had never happened.  The results are the
    graph's own tensors, overwritten by the next replay: the loop copies them at once, on the same stream.
    """
    graphs = {}  # the sizes of a window -> (its graph, the graph's inputs and results)

    def take(x, targets, sizes, totals, weights):
        key = tuple(sizes)
        if key not in graphs:
            static = {}
            graphs[key] = _capture(step, static, (x, targets, sizes, totals, weights), model, optimizer), static
        graph, static = graphs[key]
        static["x"].copy_(x)
        static["t"].copy_(targets)
        if weights is not None:
            static["w"].copy_(weights)
        graph.replay()
        return static["results"]

    return Stepper(take, step.window, step.name + ", replayed as a CUDA graph")


def _capture(step: Step, static: dict, args, model, optimizer):
    x, targets, sizes, totals, weights = args
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = lambda: [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]  # noqa: E731
    saved += [(b, b.clone()) for b in buffers()]
    static["x"], static["t"] = x.clone(), targets.clone()
    static["w"] = None if weights is None else weights.clone()
    call = lambda: step(static["x"], static["t"], sizes, totals, static["w"])  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuBLAS and the caching allocator settle before capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for tensor, before in saved:
            tensor.copy_(before)
        for b in buffers():  # buffers the warm-up created start from zero, as they would have
            if all(b is not t for t, _ in saved):
                b.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static["results"] = call()
    return graph
