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
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from . import board, checkpoint, config, data, synth
from .config import Config, UserError
from .cost import error_rate, half_mse, one_hot, wrong
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


def make_step(model, optimizer, cfg: Config, device: torch.device):
    """The training step for this config: step(x, targets) -> (cost, outputs), both left on the device."""
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if cfg.optim.fused and cfg.optim.momentum == 0 and precision == "fp32" and not cfg.train.compile:
        return lambda x, t: fused_sgd_step(model, x, t, cfg.optim.lr, cfg.model.activation), "fused SGD (fp32)"
    forward = torch.compile(model) if cfg.train.compile else model

    def step(x, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = forward(x)
        cost = half_mse(outputs.float(), targets)  # C = ½ · mean_batch Σ_outputs (a − y)²
        optimizer.zero_grad()  # set_to_none: measured faster here than zeroing and accumulating into old buffers
        cost.backward()
        optimizer.step()  # w <- w − lr · ∂C/∂w  (plus momentum when optim.momentum > 0)
        return cost.detach(), outputs.detach()

    return step, f"autograd + torch.optim.SGD ({precision}{', compiled' if cfg.train.compile else ''})"


def train_one_epoch(step, split: data.Split, mean, std, batch_size, n_classes, generator, device):
    """One pass over the training split in shuffled batches; returns per-step costs and wrong counts.

    Both stay on the device until the caller asks for them: no host sync inside the epoch.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator, device=split.index.device)
    n_steps = math.ceil(n / batch_size)
    costs = torch.empty(n_steps, device=device)
    wrongs = torch.empty(n_steps, dtype=torch.int64, device=device)
    for i in range(n_steps):
        pos = order[i * batch_size : (i + 1) * batch_size]
        x = data.normalise(split.batch(pos).to(device, non_blocking=True), mean, std)
        y = split.labels[pos].to(device, non_blocking=True)
        cost, outputs = step(x, one_hot(y, n_classes))
        costs[i] = cost
        wrongs[i] = wrong(outputs, y)
    return costs, wrongs


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
        print(f"{root} is missing: drawing the synthetic hot-dog set there (1000 hot dogs and 5000 others to train, 200 and 1000 to test, {cfg.data.image_size}x{cfg.data.image_size})", flush=True)
        synth.generate(root, size=cfg.data.image_size, seed=0, progress=progress)
    return data.load_dataset(cfg.data, cfg.seed, progress, memory_budget)


def run(cfg: Config, config_name: str = "run", progress: bool = True) -> Path:
    """Train one run from a checked config; returns its folder under log.dir."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    budget = cfg.data.memory_budget if cfg.data.memory_budget is not None else data.default_memory_budget(device)
    ds = prepare_data(cfg, progress, budget).to(device)
    n_classes = len(ds.classes)
    batch_size = cfg.optim.batch_size or len(ds.train)
    if batch_size > len(ds.train):
        warnings.warn(f"optim.batch_size {batch_size} is larger than the {len(ds.train)} training images; using full-batch gradient descent")
        batch_size = len(ds.train)

    run_dir = make_run_dir(cfg.log.dir, cfg.log.run_name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    (run_dir / "checkpoints").mkdir()
    resolved = config.to_dict(cfg)
    config_yaml = yaml.safe_dump(resolved, sort_keys=False)
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    print(f"run {run_dir}: {len(ds.train)} train, {len(ds.val)} val" + (f", {len(ds.test)} test" if ds.test else "") + f" images of {n_classes} classes on {device}", flush=True)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, n_classes, cfg.model.activation).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    step_fn, step_name = make_step(model, optimizer, cfg, device)
    generator = torch.Generator(device=ds.train.index.device).manual_seed(cfg.seed)
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    print(f"step: {step_name}; data " + ("memory-mapped from the cache (larger than data.memory_budget)" if ds.train.mapped else f"resident on {device}"), flush=True)

    writer = board.open_writer(run_dir)
    board.log_text(writer, config_yaml, ds.summary())
    step, best, history = 0, None, []
    stopped_because = "epochs"
    started = time.perf_counter()
    train_seconds, train_images = 0.0, 0
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        costs, wrongs = train_one_epoch(step_fn, ds.train, mean, std, batch_size, n_classes, generator, device)
        costs, n_wrong = costs.tolist(), int(wrongs.sum())  # the epoch's one transfer to the host
        seconds = time.perf_counter() - t0
        if epoch > 1 or cfg.train.epochs == 1:  # steady state: the first epoch pays for warm-up
            train_seconds += seconds
            train_images += len(ds.train)
        val = evaluate(model, ds.val, mean, std, n_classes)
        m = {
            "epoch": epoch,
            "train_cost": sum(costs) / len(costs),
            "train_error_rate": n_wrong / len(ds.train),
            "val_cost": val["cost"],
            "val_error_rate": val["error_rate"],
            "val_accuracy": val["accuracy"],
        }
        board.log_steps(writer, "cost/train", costs, step)
        step += len(costs)
        board.log_epoch(writer, epoch, m)
        _print_epoch(epoch, cfg.train.epochs, m, len(ds.train) / seconds)
        history.append(m)
        save = dict(model=model, optimizer=optimizer, config=resolved, classes=ds.classes, mean=mean.tolist(), std=std.tolist(), epoch=epoch, step=step, metrics=m)
        checkpoint.save(run_dir / "checkpoints" / "last.pt", **save)
        if best is None or (m["val_accuracy"], -m["val_cost"]) > (best["val_accuracy"], -best["val_cost"]):
            best = m
            checkpoint.save(run_dir / "checkpoints" / "best.pt", **save)
        if cfg.train.target_accuracy is not None and m["val_accuracy"] >= cfg.train.target_accuracy:
            stopped_because = "target_accuracy"
            break
    writer.close()

    metrics = {
        "val_accuracy": best["val_accuracy"],
        "val_error_rate": best["val_error_rate"],
        "val_cost": best["val_cost"],
        "train_cost": best["train_cost"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "steps": step,
        "seconds": time.perf_counter() - started,
        "train_images_per_second": train_images / train_seconds if train_seconds else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "step": step_name,
        "stopped_because": stopped_because,
        "device": str(device),
        "classes": ds.classes,
        "skipped_files": len(ds.skipped),
    }
    if ds.test is not None:
        best_model = checkpoint.model_from(checkpoint.load(run_dir / "checkpoints" / "best.pt")).to(device)
        test = evaluate(best_model, ds.test, mean, std, n_classes)
        metrics.update(test_accuracy=test["accuracy"], test_error_rate=test["error_rate"], test_cost=test["cost"])
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    why = f"reached the target validation accuracy {cfg.train.target_accuracy:.2%} at epoch {len(history)}" if stopped_because == "target_accuracy" else f"ran all {cfg.train.epochs} epochs"
    test_text = f", test accuracy {metrics['test_accuracy']:.2%}" if ds.test is not None else ""
    print(f"stopped: {why}. best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.2%}{test_text}. wrote {run_dir}", flush=True)
    return run_dir


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.train", description="Train the hot-dog MLP from a YAML config.")
    p.add_argument("--config", help="YAML config (keys: hotdog_torch/config.py); without it, the schema's defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, values parsed as YAML, e.g. optim.lr=0.5 model.hidden=[256,64]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        run(cfg, Path(args.config).stem if args.config else "run", progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the checkpoints already written are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
