"""Train the hot-dog network: python -m hotdog_torch.train --config configs/hotdog.yaml [section.key=value ...]

The loop, top to bottom: decode the image folder once into a uint8 tensor on
the training device; each epoch, shuffle the training indices, and for each
batch of them normalise the images, run the network forward, compute the cost
C = ½·MSE, backpropagate its gradient and take one gradient-descent step
w <- w - lr * dC/dw.  After each epoch, evaluate on validation, print one line,
log to TensorBoard, save checkpoints; stop at the target accuracy or after the
last epoch.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from . import board, checkpoint, config, data, synth
from .config import Config, UserError
from .cost import COSTS, confusion_matrix, error_rate, half_mse, one_hot, per_class, wrong
from .files import atomic_write_text
from .model import ACTIVATIONS, build_model, linear_layers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name} was asked for, but this machine has no usable CUDA GPU; use device=cpu or device=auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def make_run_dir(log_dir: str, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ...: an existing run is never overwritten."""
    base = Path(log_dir)
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = base / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{base} already holds 10,000 runs named {name}")


DERIVATIVE = {  # the activation's slope, written in terms of its output h
    "sigmoid": lambda h: h * (1 - h),
    "tanh": lambda h: 1 - h * h,
    "relu": lambda h: (h > 0).to(h.dtype),
}


@torch.no_grad()
def fused_sgd_step(model, x, targets, lr, activation):
    """One step of plain gradient descent with backpropagation written out, for the MLP.

    Instead of materialising each weight gradient dC/dW = deltaᵀ·a (for the first
    layer a 512 x 49152 matrix, 100 MB, every step) and then subtracting lr times
    it, the update is one GEMM that accumulates into the weights:
    W.addmm_(deltaᵀ, a, alpha=-lr), i.e. W <- W - lr * deltaᵀ·a.  Same maths as
    autograd + torch.optim.SGD(momentum=0); tests check the two give the same weights.
    """
    layers = linear_layers(model)
    act = ACTIVATIONS[activation]()
    a = x.flatten(1)
    inputs = []  # each layer's input activation a_l
    for layer in layers[:-1]:
        inputs.append(a)
        a = act(torch.addmm(layer.bias, a, layer.weight.t()))
    inputs.append(a)
    out = torch.sigmoid(torch.addmm(layers[-1].bias, a, layers[-1].weight.t()))
    cost = half_mse(out, targets)  # C = ½ · mean_batch Σ_outputs (a − y)²
    delta = (out - targets) * out * (1 - out) / len(x)  # ∂C/∂z of the output layer
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        below = (delta @ layer.weight) * DERIVATIVE[activation](inputs[i]) if i > 0 else None  # before W moves
        layer.weight.addmm_(delta.t(), inputs[i], alpha=-lr)  # W <- W − lr · δᵀ a
        layer.bias.add_(delta.sum(0), alpha=-lr)  # b <- b − lr · Σ δ
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
    act = ACTIVATIONS[activation]() if upper else torch.sigmoid
    X = X.flatten(1)
    Z0 = X @ first.weight.t()  # every batch of the window against the window's starting weights
    D = torch.empty(len(X), first.out_features, dtype=X.dtype, device=X.device)  # the δ_s, row-aligned with X
    results, o = [], 0
    for n in sizes:
        t = T[o : o + n]
        z = Z0[o : o + n] + first.bias
        if o:  # the updates of this window's earlier steps, not yet applied to W
            z.addmm_(X[o : o + n] @ X[:o].t(), D[:o], alpha=-lr)
        a = act(z)
        inputs = [None, a]  # inputs[i]: what layer i reads (layer 0 reads x)
        for k, layer in enumerate(upper, start=1):
            a = (torch.sigmoid if k == len(upper) else ACTIVATIONS[activation]())(torch.addmm(layer.bias, a, layer.weight.t()))
            inputs.append(a)
        out = a
        cost = half_mse(out, t)  # C = ½ · mean_batch Σ_outputs (a − y)²
        delta = (out - t) * out * (1 - out) / n  # ∂C/∂z of the output layer
        for i in range(len(layers) - 1, 0, -1):
            layer = layers[i]
            below = (delta @ layer.weight) * DERIVATIVE[activation](inputs[i])  # before W moves
            layer.weight.addmm_(delta.t(), inputs[i], alpha=-lr)  # W <- W − lr · δᵀ a
            layer.bias.add_(delta.sum(0), alpha=-lr)
            delta = below
        first.bias.add_(delta.sum(0), alpha=-lr)
        D[o : o + n] = delta
        results.append((cost, out))
        o += n
    first.weight.addmm_(D.t(), X, alpha=-lr)  # the window's updates of the first layer in one GEMM: W <- W − lr Σ_s δ_sᵀ x_s
    return results


def make_step(model, optimizer, cfg: Config, device: torch.device):
    """The training step for this config: step(x, targets, sizes) -> [(cost, outputs)...], one pair per batch, for
    step.window consecutive batches stacked in x (1 except for the windowed fused SGD), all left on the device."""
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if cfg.optim.fused and cfg.optim.momentum == 0 and precision == "fp32" and not cfg.train.compile and cfg.optim.cost == "half_mse":
        k = cfg.optim.fused_window
        if k == 1:
            step = lambda X, T, sizes: [fused_sgd_step(model, X, T, cfg.optim.lr, cfg.model.activation)]  # noqa: E731
        else:
            step = lambda X, T, sizes: fused_sgd_window(model, X, T, sizes, cfg.optim.lr, cfg.model.activation)  # noqa: E731
        step.window = k
        return step, f"fused SGD (fp32, first-layer updates in windows of {k} steps)" if k > 1 else "fused SGD (fp32)"
    forward = torch.compile(model) if cfg.train.compile else model
    cost_fn = COSTS[cfg.optim.cost]

    def step(x, targets, sizes):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = forward(x)
        cost = cost_fn(outputs.float(), targets)  # by default C = ½ · mean_batch Σ_outputs (a − y)²
        optimizer.zero_grad()  # set_to_none: measured faster here than zeroing and accumulating into old buffers
        cost.backward()
        optimizer.step()  # w <- w − lr · ∂C/∂w  (plus momentum when optim.momentum > 0)
        return [(cost.detach(), outputs.detach())]

    step.window = 1

    cost_name = "" if cfg.optim.cost == "half_mse" else f", cost {cfg.optim.cost}"
    return step, f"autograd + torch.optim.SGD ({precision}{', compiled' if cfg.train.compile else ''}{cost_name})"


def train_one_epoch(step, split: data.Split, mean, std, batch_size, n_classes, generator, device, resume=None, should_stop=lambda: False,
                    first_step=0, log_every=0, on_log=None):
    """One pass over the training split in shuffled batches.

    Returns {"order", "next", "costs", "wrongs"}: the epoch's batch order, the
    number of steps taken (all of them unless should_stop() said stop), and the
    per-step costs and wrong counts.  These stay on the device until the caller
    asks for them: no host sync inside the epoch, except on_log(global_step),
    called every log_every steps.  resume, a dict of the same form saved
    mid-epoch, continues that epoch where it stopped.
    """
    n = len(split)
    n_steps = math.ceil(n / batch_size)
    costs = torch.zeros(n_steps, device=device)
    wrongs = torch.zeros(n_steps, dtype=torch.int64, device=device)
    if resume is None:
        order, start = torch.randperm(n, generator=generator, device=split.index.device), 0
    else:
        order, start = resume["order"].to(split.index.device), resume["next"]
        costs[:start], wrongs[:start] = resume["costs"].to(device), resume["wrongs"].to(device)
    i = start
    while i < n_steps:
        if should_stop():
            return {"order": order, "next": i, "costs": costs[:i], "wrongs": wrongs[:i]}
        steps = range(i, min(i + step.window, n_steps))
        pos = order[i * batch_size : (steps[-1] + 1) * batch_size]  # the window's batches, one after another
        x = data.normalise(split.batch(pos).to(device, non_blocking=True), mean, std)
        y = split.labels[pos].to(device, non_blocking=True)
        sizes = [min(batch_size, len(pos) - k * batch_size) for k in range(len(steps))]
        for j, labels, (cost, outputs) in zip(steps, y.split(sizes), step(x, one_hot(y, n_classes), sizes)):
            costs[j] = cost
            wrongs[j] = wrong(outputs, labels)
        i = steps[-1] + 1
        if log_every and any((first_step + j + 1) % log_every == 0 for j in steps):
            on_log(first_step + i)  # at the end of the window that held the log step
    return {"order": order, "next": n_steps, "costs": costs, "wrongs": wrongs}


@torch.no_grad()
def evaluate(model, split: data.Split, mean, std, n_classes, device=None, chunk=1024) -> dict:
    """Cost, error rate and accuracy of the whole split, plus every output score."""
    model.eval()
    device = device or next(model.parameters()).device
    positions = torch.arange(len(split), device=split.index.device)
    outputs = torch.cat([model(data.normalise(split.batch(p).to(device), mean, std)).float() for p in positions.split(chunk)])
    labels = split.labels.to(device)
    cost = half_mse(outputs, one_hot(labels, n_classes)).item()
    err = error_rate(outputs, labels).item()
    model.train()
    return {"cost": cost, "error_rate": err, "accuracy": 1 - err, "outputs": outputs}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _print_epoch(epoch, epochs, m, images_per_second):
    print(
        f"epoch {epoch:3d}/{epochs}  train cost {m['train_cost']:.4f}  val cost {m['val_cost']:.4f}  "
        f"val error rate {100 * m['val_error_rate']:5.2f}%  val accuracy {100 * m['val_accuracy']:6.2f}%  "
        f"{images_per_second:,.0f} images/s",
        flush=True,
    )


def prepare_data(cfg: Config, progress: bool = True, memory_budget: int | None = None) -> data.Dataset:
    root = Path(cfg.data.root)
    if not root.exists() and cfg.data.generate:
        # always the seed's set at 128x128, whatever data.image_size this run resizes to: the folder is shared by every run
        print(f"{root} is missing: drawing the synthetic hot-dog set there (1000 hot dogs and 5000 others to train, 200 and 1000 to test, 128x128)", flush=True)
        synth.generate(root, seed=0, progress=progress)
    return data.load_dataset(cfg.data, cfg.seed, progress, memory_budget)


def probe_gradients(model, x, targets, cost_fn=half_mse):
    """dC/dW of every layer on a fixed batch, leaving the model's own .grad alone."""
    layers = linear_layers(model)
    with torch.enable_grad():
        cost = cost_fn(model(x).float(), targets)
        return torch.autograd.grad(cost, [layer.weight for layer in layers])


def norms(model, grads) -> dict[str, torch.Tensor]:
    out = {}
    for i, (layer, g) in enumerate(zip(linear_layers(model), grads), start=1):
        out[f"weight_norm/layer{i}"] = layer.weight.detach().norm()
        out[f"grad_norm/layer{i}"] = g.norm()
    return out


def misclassified(split: data.Split, outputs, classes, limit=12):
    """Up to `limit` wrongly identified images of a split, with captions: true class, predicted class and its score."""
    predicted = outputs.argmax(dim=1)
    where = torch.nonzero(predicted != split.labels.to(outputs.device)).flatten()[:limit]
    pos = where.to(split.index.device)
    captions = [f"true {classes[int(split.labels[p])]}\npred {classes[int(predicted[w])]} {float(outputs[w, predicted[w]]):.2f}" for p, w in zip(pos.tolist(), where.tolist())]
    return split.batch(pos), captions


class DivergenceWatch:
    """Diverged: a NaN or infinite cost, or the mean cost of the last n steps above k x the lowest such mean
    (and above the first such mean: back above where training started) for n steps running.

    The second condition keeps the noise of small batches near a low cost from reading as divergence.
    """

    def __init__(self, k: float, n: int, state: dict | None = None):
        self.k, self.n = k, n
        self.window, self.best, self.first, self.above = (state["window"], state["best"], state["first"], state["above"]) if state else ([], None, None, 0)

    def update(self, costs: list[float]) -> bool:
        for c in costs:
            if not math.isfinite(c):
                return True
            self.window = (self.window + [c])[-self.n :]
            if len(self.window) == self.n:
                mean = sum(self.window) / self.n
                self.first = mean if self.first is None else self.first
                self.best = mean if self.best is None else min(self.best, mean)
                self.above = self.above + 1 if mean > self.k * self.best and mean > self.first else 0
                if self.above >= self.n:
                    return True
        return False

    def state(self) -> dict:
        return {"window": self.window, "best": self.best, "first": self.first, "above": self.above}


@torch.no_grad()
def random_search_pass(model, candidate, split, mean, std, n_classes, kept):
    """One pass of the shot in the dark: draw every weight and bias afresh from the initial distribution,
    score the candidate on the whole training set, and keep it if its error rate (then cost) beats the best so far.

    Returns (the candidate's score, the kept score).  No gradient is computed.
    """
    for layer in linear_layers(candidate):
        layer.reset_parameters()
    r = evaluate(candidate, split, mean, std, n_classes)
    score = {"error_rate": r["error_rate"], "cost": r["cost"]}
    if kept is None or (score["error_rate"], score["cost"]) < (kept["error_rate"], kept["cost"]):
        model.load_state_dict(candidate.state_dict())
        kept = score
    return score, kept


def _finite(metrics: dict) -> dict:
    """NaN and inf as null, so metrics.json stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _rng_state(generator) -> dict:
    """Every random number generator's state, as plain data and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "batches": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }


def _set_rng_state(generator, state: dict) -> None:
    generator.set_state(state["batches"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    *keys, version = state["python"]
    random.setstate((version, tuple(keys), None))


def _better(m: dict, best: dict | None) -> bool:
    """Higher validation accuracy, then lower validation cost."""
    return best is None or (m["val_accuracy"], -m["val_cost"]) > (best["val_accuracy"], -best["val_cost"])


def run(cfg: Config, config_name: str = "run", progress: bool = True, resume_dir: str | Path | None = None) -> Path:
    """Train one run from a checked config, or continue the run in resume_dir; returns its folder."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    resumed = checkpoint.load(Path(resume_dir) / "checkpoints" / "last.pt") if resume_dir else None
    budget = cfg.data.memory_budget if cfg.data.memory_budget is not None else data.default_memory_budget(device)
    ds = prepare_data(cfg, progress, budget).to(device)
    n_classes = len(ds.classes)
    batch_size = cfg.optim.batch_size or len(ds.train)
    if batch_size > len(ds.train):
        warnings.warn(f"optim.batch_size {batch_size} is larger than the {len(ds.train)} training images; using full-batch gradient descent")
        batch_size = len(ds.train)

    resolved = config.to_dict(cfg)
    config_yaml = yaml.safe_dump(resolved, sort_keys=False)
    if resumed is None:
        run_dir = make_run_dir(cfg.log.dir, cfg.log.run_name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        (run_dir / "checkpoints").mkdir()
    else:
        run_dir = Path(resume_dir)
        if resumed["classes"] != ds.classes:
            raise UserError(f"{run_dir} was trained on classes {resumed['classes']}, but {cfg.data.root} has {ds.classes}")
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    print(f"run {run_dir}: {len(ds.train)} train, {len(ds.val)} val" + (f", {len(ds.test)} test" if ds.test else "") + f" images of {n_classes} classes on {device}", flush=True)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, n_classes, cfg.model.activation).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    generator = torch.Generator(device=ds.train.index.device).manual_seed(cfg.seed)
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    state = {"epoch": 0, "step": 0, "best": None, "history": [], "stopped_because": None,
             "seconds": 0.0, "train_seconds": 0.0, "train_images": 0, "epoch_progress": None}
    if resumed is not None:
        try:
            model.load_state_dict(resumed["model"])
            if resumed["optimizer"] is not None:
                optimizer.load_state_dict(resumed["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{run_dir}/checkpoints/last.pt does not fit this config's model ({str(e).splitlines()[0][:100]})") from None
        state = resumed["state"]
        _set_rng_state(generator, state["rng"])
        if state["stopped_because"] is not None and not (state["stopped_because"] == "epochs" and cfg.train.epochs > state["epoch"]):
            print(f"{run_dir} already finished ({state['stopped_because']}); nothing to resume. To train on, pass train.epochs=N above {state['epoch']}.")
            return run_dir
        state["stopped_because"] = None
        where = f"epoch {state['epoch'] + 1}, step {state['epoch_progress']['next'] + 1} of it" if state["epoch_progress"] else f"the end of epoch {state['epoch']}"
        print(f"resuming from {where} (global step {state['step']})", flush=True)
    searching = cfg.optim.name == "random_search"
    step_fn, step_name = make_step(model, optimizer, cfg, device)
    if searching:
        candidate = copy.deepcopy(model)
        step_name = "random search (a fresh draw of every weight per pass, the best kept; no gradients)"
    steps_per_pass = math.ceil(len(ds.train) / batch_size)
    cost_fn = COSTS[cfg.optim.cost]
    watch = DivergenceWatch(cfg.train.diverge_factor, cfg.train.diverge_steps, state.get("divergence"))
    state.setdefault("search_kept", None)
    print(f"step: {step_name}; data " + ("memory-mapped from the cache (larger than data.memory_budget)" if ds.train.mapped else f"resident on {device}"), flush=True)

    # purge_step: on resume, TensorBoard drops whatever was logged after the checkpoint, so no step appears twice
    writer = board.open_writer(run_dir, purge_step=state["step"] + 1 if resumed is not None else None)
    if resumed is None:
        board.log_text(writer, config_yaml, ds.summary())

    def save(path, m, progress=None):
        state["epoch_progress"] = None if progress is None else {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in progress.items()}
        state["rng"] = _rng_state(generator)
        checkpoint.save(path, model=model, optimizer=optimizer, config=resolved, classes=ds.classes, mean=mean.tolist(), std=std.tolist(),
                        epoch=state["epoch"], step=state["step"], metrics=m, state=state)

    probe_pos = torch.arange(min(len(ds.train), batch_size, 256), device=ds.train.index.device)
    probe_x = data.normalise(ds.train.batch(probe_pos).to(device), mean, std)
    probe_t = one_hot(ds.train.labels[probe_pos].to(device), n_classes)

    logging_seconds = [0.0]  # time spent in the optional summaries this epoch (norms, histograms, pictures)

    def log_norms(global_step):  # one transfer to the host per log interval
        t = time.perf_counter()
        values = {k: v.item() for k, v in norms(model, probe_gradients(model, probe_x, probe_t, cost_fn)).items()}
        board.log_scalars(writer, global_step, {"lr": optimizer.param_groups[0]["lr"], **values})
        logging_seconds[0] += time.perf_counter() - t

    session_start = time.perf_counter()
    seconds_before = state["seconds"]
    with StopRequest() as stop:
        for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            logging_seconds[0] = 0.0
            first = state["step"] - (state["epoch_progress"] or {}).get("next", 0)  # the epoch's first step, also when resumed mid-epoch
            if searching:  # one candidate per pass, charged one pass like an epoch of gradient descent
                if stop():
                    done = {"next": 0}
                else:
                    candidate_score, state["search_kept"] = random_search_pass(model, candidate, ds.train, mean, std, n_classes, state["search_kept"])
                    costs, n_wrong = [state["search_kept"]["cost"]], round(state["search_kept"]["error_rate"] * len(ds.train))
                    advance = steps_per_pass  # the same x axis as gradient descent: pass k ends at step k * steps_per_pass
            else:
                done = train_one_epoch(step_fn, ds.train, mean, std, batch_size, n_classes, generator, device, state["epoch_progress"], stop,
                                       first_step=first, log_every=cfg.log.every_steps, on_log=log_norms)
            state["seconds"] = seconds_before + time.perf_counter() - session_start
            if stop():  # save where the epoch stopped; the resumed run continues from that very step
                state["step"] = first + done["next"]
                save(run_dir / "checkpoints" / "last.pt", state["history"][-1] if state["history"] else {}, None if searching else done)
                name = "SIGTERM" if stop.signal == signal.SIGTERM else "Ctrl-C"
                print(f"\n{name}: saved {run_dir}/checkpoints/last.pt at epoch {epoch}, step {done['next']} of {steps_per_pass}. "
                      f"Resume with: python -m hotdog_torch.train --resume {run_dir}", file=sys.stderr, flush=True)
                raise Interrupted(128 + stop.signal)
            if not searching:
                costs, n_wrong = done["costs"].tolist(), int(done["wrongs"].sum())  # the epoch's one transfer to the host
                advance = len(costs)
            seconds = time.perf_counter() - t0
            if epoch > 1 or cfg.train.epochs == 1:  # steady state: the first epoch pays for warm-up
                state["train_seconds"] += seconds
                state["train_images"] += len(ds.train)
            val = evaluate(model, ds.val, mean, std, n_classes)
            m = {
                "epoch": epoch,
                "train_cost": sum(costs) / len(costs),
                "train_error_rate": n_wrong / len(ds.train),
                "val_cost": val["cost"],
                "val_error_rate": val["error_rate"],
                "val_accuracy": val["accuracy"],
            }
            board.log_steps(writer, "cost/train", costs, first + advance - len(costs) + 1)
            if searching:
                board.log_scalars(writer, first + advance, {"random_search/candidate_error_rate": candidate_score["error_rate"],
                                                            "random_search/candidate_cost": candidate_score["cost"]})
            state["step"] = first + advance
            state["epoch_progress"] = None
            state["epoch"] = epoch
            confusion = confusion_matrix(val["outputs"], ds.val.labels.to(device), n_classes)
            board.log_epoch(writer, state["step"], m, per_class(confusion, ds.classes))
            diverged = not searching and watch.update(costs)
            state["divergence"] = watch.state()
            reached = cfg.train.target_accuracy is not None and m["val_accuracy"] >= cfg.train.target_accuracy
            if diverged:
                state["stopped_because"] = "diverged"
                print(f"the cost diverged at epoch {epoch} (NaN/inf, or its {cfg.train.diverge_steps}-step mean stayed above "
                      f"{cfg.train.diverge_factor:g}x its lowest): lower optim.lr (now {cfg.optim.lr:g})", flush=True)
            elif reached:
                state["stopped_because"] = "target_accuracy"
            elif epoch == cfg.train.epochs:
                state["stopped_because"] = "epochs"
            every = cfg.log.images_every_epochs
            if state["stopped_because"] or (every and epoch % every == 0):
                t = time.perf_counter()
                layers = linear_layers(model)
                grads = None if searching else probe_gradients(model, probe_x, probe_t, cost_fn)
                board.log_histograms(writer, state["step"], layers, grads, val["outputs"], ds.val.labels, ds.classes)
                wrong_images, captions = misclassified(ds.val, val["outputs"], ds.classes)
                board.log_pictures(writer, state["step"], layers[0].weight, cfg.data.channels, cfg.data.image_size,
                                   wrong_images, captions, confusion, val["outputs"], ds.val.labels, ds.classes)
                logging_seconds[0] += time.perf_counter() - t
            writer.flush()
            m["logging_seconds"] = logging_seconds[0]
            m["seconds"] = time.perf_counter() - t0  # the whole epoch: training, evaluation and logging
            _print_epoch(epoch, cfg.train.epochs, m, len(ds.train) / seconds)
            state["history"].append(m)
            if state["best"] is None or (math.isfinite(m["train_cost"]) and _better(m, state["best"])):
                state["best"] = m
                save(run_dir / "checkpoints" / "best.pt", m)
            if epoch % cfg.train.checkpoint_every_epochs == 0 or state["stopped_because"]:
                save(run_dir / "checkpoints" / "last.pt", m)
            if reached or diverged:
                break
    best, history = state["best"], state["history"]
    metrics = {
        "val_accuracy": best["val_accuracy"],
        "val_error_rate": best["val_error_rate"],
        "val_cost": best["val_cost"],
        "train_cost": best["train_cost"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "steps": state["step"],
        "seconds": state["seconds"],
        "train_images_per_second": state["train_images"] / state["train_seconds"] if state["train_seconds"] else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "step": step_name,
        "stopped_because": state["stopped_because"],
        "device": str(device),
        "classes": ds.classes,
        "skipped_files": len(ds.skipped),
    }
    if ds.test is not None:
        best_model = checkpoint.model_from(checkpoint.load(run_dir / "checkpoints" / "best.pt")).to(device)
        test = evaluate(best_model, ds.test, mean, std, n_classes)
        metrics.update(test_accuracy=test["accuracy"], test_error_rate=test["error_rate"], test_cost=test["cost"])
    board.log_hparams(writer, hparams(cfg), {k: metrics.get(k) for k in ("val_accuracy", "val_cost", "test_accuracy", "epochs")})
    writer.close()
    atomic_write_text(run_dir / "metrics.json", json.dumps(_finite(metrics), indent=2) + "\n")

    why = {"target_accuracy": f"reached the target validation accuracy {cfg.train.target_accuracy or 0:.2%} at epoch {len(history)}",
           "diverged": f"diverged at epoch {len(history)}"}.get(state["stopped_because"], f"ran all {cfg.train.epochs} epochs")
    test_text = f", test accuracy {metrics['test_accuracy']:.2%}" if ds.test is not None else ""
    print(f"stopped: {why}. best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.2%}{test_text}. wrote {run_dir}", flush=True)
    return run_dir


def hparams(cfg: Config) -> dict:
    """The knobs the HParams dashboard compares runs by (plain numbers and strings)."""
    return {
        "optimiser": cfg.optim.name,
        "cost": cfg.optim.cost,
        "lr": cfg.optim.lr,
        "batch_size": cfg.optim.batch_size or 0,  # 0 = full batch
        "momentum": cfg.optim.momentum,
        "hidden": str(cfg.model.hidden),
        "activation": cfg.model.activation,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "seed": cfg.seed,
    }


class Interrupted(Exception):
    """Training stopped by a signal after saving; carries the exit code."""

    def __init__(self, code: int):
        self.code = code


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.train", description="Train the hot-dog MLP from a YAML config.")
    p.add_argument("--config", help="YAML config (keys: hotdog_torch/config.py); without it, the schema's defaults")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<name> from its checkpoints/last.pt, with its config.yaml (overrides still apply)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, values parsed as YAML, e.g. optim.lr=0.5 model.hidden=[256,64]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _plain_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = _plain_warnings  # a user reads "warning: ...", not a source line
    try:
        if args.resume:
            if args.config:
                raise UserError("--resume takes the run's own config.yaml; pass changes as overrides, not --config")
            if not (Path(args.resume) / "config.yaml").is_file():
                raise UserError(f"{args.resume} is not a run folder (it has no config.yaml)")
            cfg = config.load(Path(args.resume) / "config.yaml", args.overrides)
        else:
            cfg = config.load(args.config, args.overrides)
        run(cfg, Path(args.config).stem if args.config else "run", progress=not args.no_progress, resume_dir=args.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return e.code
    except KeyboardInterrupt:
        print("interrupted; the checkpoints already written are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
