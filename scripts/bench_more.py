"""The parts of scripts/bench.py that run whole commands or other implementations, side by side.

- cold: the default job (configs/hotdog.yaml), from the command to the target validation accuracy, each
  run its own new process with an empty decode cache, against scripts/tutorial_train.py with the same
  hyper-parameters; alternating, median of 3;
- small: the seed's algorithm at small scale (Nielsen's MNIST setting: 784 -> 30 -> 10 sigmoid, ½·MSE,
  plain SGD, batch 10, lr 3) on the 4800 synthetic training images at 28x28 grayscale: hotdog_torch's loop and
  step against a vectorised numpy implementation of the same algorithm, epochs alternating, median of 3;
- import: `import torch` against `import hotdog_torch.train`, new processes, alternating, median of 5.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hotdog_torch import config, data, loop, step
from hotdog_torch.cost import one_hot
from hotdog_torch.model import build_model

REPO = Path(__file__).resolve().parents[1]


def seconds(command: list[str], env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, done


def cold_to_target(repeats: int = 3) -> tuple[dict, list]:
    """The default job from the command to 99% validation accuracy, against the tutorial's way, alternating."""
    ours, tutorial = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            own = [
                sys.executable,
                "-m",
                "hotdog_torch.train",
                "--config",
                "configs/hotdog.yaml",
                "--no-progress",
                f"data.cache_dir={tmp}/cache-{i}",
                f"log.dir={tmp}/runs",
                f"log.run_name=cold-{i}",
            ]
            t, done = seconds(own)
            metrics = json.loads((Path(tmp) / "runs" / f"cold-{i}" / "metrics.json").read_text())
            assert done.returncode == 0 and metrics["stopped_because"] == "target_accuracy", done.stderr
            ours.append((t, metrics["epochs"]))
            t, done = seconds([sys.executable, "scripts/tutorial_train.py", "--config", "configs/hotdog.yaml"])
            assert done.returncode == 0, done.stdout + done.stderr
            tutorial.append((t, int(done.stdout.strip().split()[-1])))
    r = {"own_seconds": [t for t, _ in ours], "tutorial_seconds": [t for t, _ in tutorial]}
    r["own_epochs"], r["tutorial_epochs"] = [e for _, e in ours], [e for _, e in tutorial]
    r["own_median"], r["tutorial_median"] = (
        statistics.median(r["own_seconds"]),
        statistics.median(r["tutorial_seconds"]),
    )
    r["speedup"] = r["tutorial_median"] / r["own_median"]
    rows = [
        (
            "hotdog_torch, `python -m hotdog_torch.train --config configs/hotdog.yaml`",
            f"{r['own_median']:.1f} s",
            "runs: " + ", ".join(f"{t:.1f} s ({e} epochs)" for t, e in ours),
        ),
        (
            "tutorial, `python scripts/tutorial_train.py`",
            f"{r['tutorial_median']:.1f} s",
            "runs: " + ", ".join(f"{t:.1f} s ({e} epochs)" for t, e in tutorial),
        ),
        ("speedup, command to 99%", f"{r['speedup']:.2f}x", "medians of 3, each run a new process, cold cache"),
    ]
    return r, rows


def numpy_epoch(W1, b1, W2, b2, X, Y, order, batch, lr):
    """Nielsen's network.py, vectorised over each mini-batch: sigmoid neurons, ½·MSE, plain SGD."""
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        x, y = X[idx], Y[idx]
        a1 = 1 / (1 + np.exp(-(x @ W1.T + b1)))
        a2 = 1 / (1 + np.exp(-(a1 @ W2.T + b2)))
        d2 = (a2 - y) * a2 * (1 - a2) / len(x)
        d1 = (d2 @ W2) * a1 * (1 - a1)
        W2 -= lr * (d2.T @ a1)
        b2 -= lr * d2.sum(0)
        W1 -= lr * (d1.T @ x)
        b1 -= lr * d1.sum(0)


def small_net(repeats: int = 3) -> tuple[dict, list]:
    """784 -> 30 -> 10 sigmoid, batch 10, lr 3, plain SGD: hotdog_torch's epoch against numpy's, alternating."""
    cfg = config.load(
        "configs/hotdog.yaml",
        [
            "data.image_size=28",
            "model.hidden=[30]",
            "optim.batch_size=10",
            "optim.lr=3",
            "optim.momentum=0",
            "device=cpu",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = config.Data(**{**vars(cfg.data), "cache_dir": tmp})
        split = data.load_dataset(d, cfg.seed, progress=False).train
    n, k = len(split), 10
    mean, std = data.normalisation(split)
    torch.manual_seed(0)
    model = build_model(784, [30], k)
    W1, b1, W2, b2 = (p.detach().numpy().copy() for p in model.parameters())
    X = (split.batch(torch.arange(n)).float().view(n, -1) / 255 - mean) / std
    X, Y = X.numpy(), one_hot(split.labels, k).numpy()
    rng = np.random.default_rng(0)
    take = step.make_step(model, None, cfg, torch.device("cpu"))
    feed = loop.Feed(split, mean, std, 10, k, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    own, ref = [], []
    for _ in range(repeats + 1):  # the first pair warms up
        t0 = time.perf_counter()
        loop.train_one_epoch(take, feed, generator)["costs"].tolist()
        own.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with np.errstate(
            over="ignore"
        ):  # exp(-z) overflows to inf for a saturated neuron: σ is then 0, as it should be
            numpy_epoch(W1, b1, W2, b2, X, Y, rng.permutation(n), 10, 3.0)
        ref.append(n / (time.perf_counter() - t0))
    r = {"own_rates": own[1:], "numpy_rates": ref[1:], "own_step": take.name, "images": n}
    r["own"], r["numpy"] = statistics.median(r["own_rates"]), statistics.median(r["numpy_rates"])
    r["ratio"] = r["own"] / r["numpy"]
    rows = [
        (
            f"numpy (vectorised, {n} images/epoch)",
            f"{r['numpy']:,.0f} images/s",
            "epochs " + ", ".join(f"{x:,.0f}" for x in r["numpy_rates"]),
        ),
        (
            f"hotdog_torch ({take.name})",
            f"{r['own']:,.0f} images/s",
            "epochs " + ", ".join(f"{x:,.0f}" for x in own[1:]),
        ),
        ("hotdog_torch / numpy", f"{r['ratio']:.2f}x", f"intra-op threads: {torch.get_num_threads()}"),
    ]
    return r, rows


def import_times(repeats: int = 5) -> tuple[dict, list]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    torch_s, ours = [], []
    for _ in range(repeats):
        torch_s.append(seconds([sys.executable, "-c", "import torch"], env)[0])
        ours.append(seconds([sys.executable, "-c", "import hotdog_torch.train"], env)[0])
    r = {"torch_seconds": torch_s, "train_seconds": ours}
    r["torch"], r["train"] = statistics.median(torch_s), statistics.median(ours)
    r["over_torch"] = r["train"] - r["torch"]
    rows = [
        ("`python -c 'import torch'`", f"{r['torch']:.2f} s", "median of 5, new processes"),
        ("`python -c 'import hotdog_torch.train'`", f"{r['train']:.2f} s", f"{r['over_torch']:+.2f} s over torch"),
    ]
    return r, rows


def run_parts(parts, device, print_table) -> dict:
    out = {}
    for name, title, fn in (
        ("cold", "The default job, cold, from the command to 99%", cold_to_target),
        ("small", "The seed's algorithm at small scale, against numpy", small_net),
        ("import", "Start-up of the command line", import_times),
    ):
        if name in parts and (name != "small" or device.type == "cpu"):
            out[name], rows = fn()
            print_table(title, rows)
    return out


def targets(r: dict) -> list:
    """Each issue-10 target against this run's figure."""
    rows = []  # (target, figure, value, at least / at most)
    if "cold" in r:
        rows.append(("default job, cold, command to 99%: >= 3x the tutorial", "{:.2f}x", r["cold"]["speedup"], 3, 1))
    if "momentum" in r:
        m = r["momentum"]
        rows.append(("momentum 0.9: >= 2.5x the tutorial", "{:.2f}x", m["speedup"], 2.5, 1))
        rows.append(("momentum 0.9: >= 70% of the square-GEMM roofline", "{:.0%}", m["roofline_fraction"], 0.7, 1))
    if "small" in r:
        rows.append(("small net: >= 1.0x numpy", "{:.2f}x", r["small"]["ratio"], 1.0, 1))
    if "import" in r:
        rows.append(("trainer import: <= 1 s over torch", "{:+.2f} s", r["import"]["over_torch"], 1.0, -1))
    out = [
        (what, form.format(v), "met" if sign * (v - bound) >= 0 else "missed") for what, form, v, bound, sign in rows
    ]
    if "throughput" in r:
        t = r["throughput"]
        out.append(("plain SGD throughput", f"{t['own_images_per_second']:,.0f} images/s", "see docs/BENCHMARKS.md"))
    return out
