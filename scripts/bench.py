"""Side-by-side benchmark: the PyTorch-tutorial pipeline against hotdog_torch's own training path.

    python scripts/bench.py [--config configs/bench.yaml] [--device cpu|cuda] [--json OUT]

Both train the same MLP with the same ½·MSE cost and plain SGD on the same
ImageFolder data, in this one process:

(a) tutorial: torchvision ImageFolder + transforms + DataLoader(num_workers = cores,
    shuffle, persistent workers, pinned memory on CUDA), decoding and transforming
    every image every epoch, autograd + torch.optim.SGD;
(b) hotdog_torch: the decode-once uint8 tensor on the device, batches by index,
    the configured training step (for plain SGD in fp32, the fused update).

It reports steady-state images/s (the median of the epochs after the first), the
speedup, FLOPs per image from the model's shapes, the GEMM rate measured at the
model's own matrix shapes and at a large square, the fraction of the square's
roofline reached, cold start (decode + cache build, on every core and on one),
warm start (cache hit) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_more as more  # noqa: E402

from hotdog_torch import config, data, loop, runtime, step  # noqa: E402
from hotdog_torch.cost import half_mse, one_hot  # noqa: E402
from hotdog_torch.model import build_model, linear_layers  # noqa: E402

# ---------------------------------------------------------------- measuring


class PeakRSS:
    """Peak resident memory of this process and its children (DataLoader workers) above its start, every 50 ms."""

    def __init__(self):
        self.peak, self.base, self._stop = 0, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self):
        me, total = os.getpid(), 0
        for pid in [me] + _children(me):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * self._page
            except OSError:
                pass
        return total

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss() - self.base)

    def __enter__(self):
        self.base = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def peak_memory(device, fn):
    """(result of fn(), peak bytes fn added: GPU memory allocated on CUDA, resident memory on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    with PeakRSS() as p:
        out = fn()
    return out, p.peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_per_image(model) -> int:
    """Per Linear: 2·in·out forward, 2·in·out weight gradient, 2·in·out input gradient except at the first layer."""
    total = 0
    for i, layer in enumerate(linear_layers(model)):
        total += 2 * layer.in_features * layer.out_features * (2 if i == 0 else 3)
    return total


def model_shape_seconds(model, batch, rates, fused):
    """Seconds per image that the step's own GEMMs take at the rates measured at their shapes."""
    total = 0.0
    for i, layer in enumerate(linear_layers(model)):
        k, n = layer.in_features, layer.out_features
        flops = 2 * k * n  # per image, for each of the products below
        names = [
            f"layer{i + 1} forward",
            f"layer{i + 1} weight update in place" if fused else f"layer{i + 1} weight grad",
        ]
        if i > 0:
            names.append(f"layer{i + 1} input grad")
        for name in names:
            rate = next(v for key, v in rates.items() if key.startswith(name))
            total += flops / (rate * 1e9)
    return total


def gemm_rates(model, batch, device, dtype, square):
    """GFLOP/s of torch.mm at each of the model's matrix shapes, and at a square n x n x n."""
    out = {}
    g = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    for i, layer in enumerate(linear_layers(model)):
        k, n = layer.in_features, layer.out_features
        x, w, d = g(batch, k), g(n, k), g(batch, n)
        shapes = {
            f"layer{i + 1} forward ({batch}x{k} @ {k}x{n})": lambda x=x, w=w: torch.mm(x, w.t()),
            f"layer{i + 1} weight grad ({n}x{batch} @ {batch}x{k}), new matrix": lambda x=x, d=d: torch.mm(d.t(), x),
            f"layer{i + 1} weight update in place (W.addmm_)": lambda x=x, w=w, d=d: w.addmm_(d.t(), x, alpha=-1e-6),
        }
        if i > 0:
            shapes[f"layer{i + 1} input grad ({batch}x{n} @ {n}x{k})"] = lambda d=d, w=w: torch.mm(d, w)
        for name, fn in shapes.items():
            out[name] = 2 * batch * k * n / median_seconds(fn, device, 10) / 1e9
    a, b = g(square, square), g(square, square)
    out[f"square {square}^3"] = 2 * square**3 / median_seconds(lambda: torch.mm(a, b), device, 5) / 1e9
    return out


# ---------------------------------------------------------------- (a) the tutorial pipeline


def tutorial_pipeline(cfg, ds_root, device, workers):
    """ImageFolder + transforms + DataLoader, as the PyTorch tutorials write it; returns run_one_epoch() -> images."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    steps = [transforms.Resize((cfg.data.image_size, cfg.data.image_size))]
    if cfg.data.channels == 1:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * cfg.data.channels, [0.25] * cfg.data.channels)]
    dataset = datasets.ImageFolder(ds_root, transform=transforms.Compose(steps))
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size or 64,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    torch.manual_seed(cfg.seed)
    k = len(dataset.classes)
    model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, k, cfg.model.activation).to(
        device
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)

    def epoch():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = half_mse(model(x), one_hot(y, k))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        return len(dataset)

    return epoch


# ---------------------------------------------------------------- (b) hotdog_torch


def own_pipeline(cfg, ds, device):
    """The data already decoded on the device; returns (run_one_epoch() -> images, step name, model)."""
    torch.manual_seed(cfg.seed)
    k = len(ds.classes)
    width = cfg.data.channels * cfg.data.image_size**2
    model = build_model(width, cfg.model.hidden, k, cfg.model.activation).to(device)
    take = step.make_step(model, step.make_optimizer(model, cfg, device), cfg, device)
    generator = torch.Generator(device=ds.train.index.device).manual_seed(cfg.seed)
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    feed = loop.Feed(ds.train, mean, std, cfg.optim.batch_size or len(ds.train), k, device)

    def epoch():
        done = loop.train_one_epoch(take, feed, generator)
        done["costs"].tolist()  # the epoch's one sync
        return len(ds.train)

    return epoch, take.name, model


def timed(epoch):
    t0 = time.perf_counter()
    n = epoch()
    return n / (time.perf_counter() - t0)


def decode_rates(d, folder, tmp, cores, repeats=3):
    """Images/s of the decode step alone (into an .npy), on one process and on every core: median of `repeats`."""
    import numpy as np

    _, samples = data._scan(folder)  # (path, class, size, mtime)
    rates = {1: [], cores: []}
    for _ in range(repeats):
        for workers in rates:
            c = config.Data(**{**vars(d), "workers": workers})
            target = Path(tmp) / f"decode-{workers}.npy"
            offset = np.lib.format.open_memmap(
                target, mode="w+", dtype=np.uint8, shape=(len(samples), d.channels, d.image_size, d.image_size)
            ).offset
            t0 = time.perf_counter()
            data._decode_all(samples, c, target, offset, progress=False, desc="")
            rates[workers].append(len(samples) / (time.perf_counter() - t0))
    out = {
        "decode_images_per_second_1_worker": statistics.median(rates[1]),
        "decode_images_per_second_all_cores": statistics.median(rates[cores]),
        "decode_rates": {str(k): v for k, v in rates.items()},
    }
    out["decode_speedup_all_cores"] = (
        out["decode_images_per_second_all_cores"] / out["decode_images_per_second_1_worker"]
    )
    return out


def machine(device) -> dict:
    cores = os.cpu_count() or 1
    r = {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}",
    }
    if device.type == "cuda":
        r["gpu"] = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:
            r["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return r


def startup(cfg, device, tmp, train_root) -> tuple[dict, list]:
    """Cold start on every core and on one (each into an empty cache), decode alone, warm start (cache hit)."""
    r, cores, budget = {}, os.cpu_count() or 1, data.default_memory_budget(device)
    for label, workers in (("cold_start_seconds", None), ("cold_start_1_worker_seconds", 1)):
        c = config.from_dict(
            config.to_dict(cfg), [f"data.cache_dir={tmp}/{label}", f"data.workers={workers or 'null'}"]
        )
        t0 = time.perf_counter()
        data.load_dataset(c.data, c.seed, progress=False, memory_budget=budget)
        r[label] = time.perf_counter() - t0
    r["cold_start_speedup_all_cores"] = r["cold_start_1_worker_seconds"] / r["cold_start_seconds"]
    r.update(decode_rates(cfg.data, train_root, tmp, cores))
    c = config.from_dict(config.to_dict(cfg), [f"data.cache_dir={tmp}/cold_start_seconds"])
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        ds = data.load_dataset(c.data, c.seed, progress=False, memory_budget=budget).to(device)
        sync(device)
        warm.append(time.perf_counter() - t0)
        del ds
    r["warm_start_seconds"] = statistics.median(warm)
    rows = [
        ("cold start, every core", f"{r['cold_start_seconds']:.2f} s", "ImageFolder scan + decode + cache write"),
        (
            "cold start, one worker",
            f"{r['cold_start_1_worker_seconds']:.2f} s",
            f"every core is {r['cold_start_speedup_all_cores']:.2f}x faster",
        ),
        ("decode alone, one worker", f"{r['decode_images_per_second_1_worker']:,.0f} images/s", "median of 3"),
        (
            f"decode alone, {cores} workers",
            f"{r['decode_images_per_second_all_cores']:,.0f} images/s",
            f"median of 3; {r['decode_speedup_all_cores']:.2f}x one worker",
        ),
        (
            "warm start (cache hit)",
            f"{r['warm_start_seconds']:.2f} s",
            "median of 3: scan + stat + load + move to device",
        ),
    ]
    return r, rows


def throughput(cfg, device, tmp, train_root, epochs) -> tuple[dict, list]:
    """Both pipelines' steady-state images/s, epochs alternating, and the roofline of the step's GEMMs."""
    r, cores, budget = {}, os.cpu_count() or 1, data.default_memory_budget(device)
    c = config.from_dict(config.to_dict(cfg), [f"data.cache_dir={tmp}/throughput"])

    def own_first():  # each pipeline's set-up and first (warm-up) epoch, measured for memory
        ds = data.load_dataset(c.data, c.seed, progress=False, memory_budget=budget).to(device)
        epoch, name, model = own_pipeline(cfg, ds, device)
        return epoch, name, model, timed(epoch)

    (own, step_name, model, _), r["own_peak_memory_bytes"] = peak_memory(device, own_first)

    def tutorial_first():
        epoch = tutorial_pipeline(cfg, train_root, device, cores)
        return epoch, timed(epoch)

    (tutorial, _), r["tutorial_peak_memory_bytes"] = peak_memory(device, tutorial_first)
    r["own_epoch_rates"], r["tutorial_epoch_rates"] = [], []
    for _ in range(epochs):  # the timed epochs, alternating, so that both see the same machine
        r["own_epoch_rates"].append(timed(own))
        r["tutorial_epoch_rates"].append(timed(tutorial))
    r["own_step"] = step_name
    r["own_images_per_second"] = statistics.median(r["own_epoch_rates"])
    r["tutorial_images_per_second"] = statistics.median(r["tutorial_epoch_rates"])
    r["speedup"] = r["own_images_per_second"] / r["tutorial_images_per_second"]
    r["speedup_per_pair"] = [o / t for o, t in zip(r["own_epoch_rates"], r["tutorial_epoch_rates"], strict=True)]
    r.update(roofline(model, cfg, device, step_name, r["own_images_per_second"]))
    return r, throughput_rows(r, device, cores)


def roofline(model, cfg, device, step_name, rate) -> dict:
    r = {"flops_per_image": flops_per_image(model)}
    dtype = torch.bfloat16 if "bf16" in step_name else torch.float32
    batch = cfg.optim.batch_size or 64
    r["gemm_dtype"] = str(dtype).replace("torch.", "")
    r["gemm_gflops"] = gemm_rates(model, batch, device, dtype, 8192 if device.type == "cuda" else 2048)
    square = [v for k, v in r["gemm_gflops"].items() if k.startswith("square")][0]
    r["roofline_images_per_second"] = square * 1e9 / r["flops_per_image"]
    r["roofline_fraction"] = rate / r["roofline_images_per_second"]
    r["own_gflops"] = rate * r["flops_per_image"] / 1e9
    fused = step_name.startswith("fused SGD (")  # the plain fused update: W.addmm_ rather than a fresh gradient
    r["model_shape_roofline_images_per_second"] = 1 / model_shape_seconds(model, batch, r["gemm_gflops"], fused)
    r["model_shape_roofline_fraction"] = rate / r["model_shape_roofline_images_per_second"]
    return r


def throughput_rows(r, device, cores) -> list:
    added = "added GPU memory" if device.type == "cuda" else "added resident memory"
    rows = [
        (
            f"tutorial pipeline (DataLoader, {cores} workers)",
            f"{r['tutorial_images_per_second']:,.0f} images/s",
            "median of epochs " + ", ".join(f"{x:,.0f}" for x in r["tutorial_epoch_rates"]),
        ),
        (
            "hotdog_torch (" + r["own_step"] + ")",
            f"{r['own_images_per_second']:,.0f} images/s",
            "median of epochs " + ", ".join(f"{x:,.0f}" for x in r["own_epoch_rates"]),
        ),
        ("speedup", f"{r['speedup']:.2f}x", "epoch pairs: " + ", ".join(f"{x:.2f}" for x in r["speedup_per_pair"])),
        ("FLOPs per image", f"{r['flops_per_image'] / 1e6:.1f} MFLOP", "forward + backward, from the model's shapes"),
    ]
    rows += [(f"GEMM {k}", f"{v:,.1f} GFLOP/s", r["gemm_dtype"]) for k, v in r["gemm_gflops"].items()]
    rows += [
        ("hotdog_torch achieved", f"{r['own_gflops']:,.1f} GFLOP/s", ""),
        ("roofline (square GEMM / FLOPs per image)", f"{r['roofline_images_per_second']:,.0f} images/s", ""),
        ("fraction of roofline", f"{r['roofline_fraction']:.0%}", "of the square GEMM's rate"),
        (
            "model-shape roofline",
            f"{r['model_shape_roofline_images_per_second']:,.0f} images/s",
            "the step's own GEMMs at the rates measured at their shapes",
        ),
        ("fraction of model-shape roofline", f"{r['model_shape_roofline_fraction']:.0%}", ""),
        (
            "peak memory, hotdog_torch",
            f"{r['own_peak_memory_bytes'] / 2**20:,.0f} MiB",
            added + ": data, model, first epoch",
        ),
        (
            "peak memory, tutorial",
            f"{r['tutorial_peak_memory_bytes'] / 2**20:,.0f} MiB",
            added + ": model, first epoch",
        ),
    ]
    return rows


def print_table(title: str, rows: list) -> None:
    print(f"\n### {title}\n\n| what | figure | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


PARTS = ("start", "throughput", "momentum", "cold", "small", "import")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the config's device")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs of each pipeline, alternating, after a warm-up")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which measurements, comma-separated: {','.join(PARTS)}")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    try:
        cfg = config.load(a.config, a.overrides + ([f"device={a.device}"] if a.device else []))
        device = runtime.resolve_device(cfg.device)
        data.prepare(cfg.data, cfg.seed, progress=False)  # draws the synthetic set if it is missing
    except config.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.use_tf32(device)
    root = Path(cfg.data.root)
    train_root = root / "train" if (root / "train").is_dir() else root
    r = {**machine(device), "config": a.config, "overrides": a.overrides}
    command = f"python scripts/bench.py --config {a.config}" + (f" --device {a.device}" if a.device else "")
    print(f"\n{r['date']}  {command}{''.join(' ' + o for o in a.overrides)}  ({r.get('cpu') or r.get('gpu')})")
    with tempfile.TemporaryDirectory() as tmp:
        if "start" in parts:
            r["start"], rows = startup(cfg, device, tmp, train_root)
            print_table("Start-up: decode once, then the cache", rows)
        if "throughput" in parts:
            r["throughput"], rows = throughput(cfg, device, tmp, train_root, a.epochs)
            print_table(f"Steady state, {cfg.optim.momentum:g} momentum: tutorial pipeline against hotdog_torch", rows)
        if "momentum" in parts and cfg.optim.momentum == 0:
            c = config.from_dict(config.to_dict(cfg), ["optim.momentum=0.9"])
            r["momentum"], rows = throughput(c, device, tmp, train_root, a.epochs)
            print_table("Steady state, momentum 0.9: tutorial pipeline against hotdog_torch", rows)
    r.update(more.run_parts(parts, device, print_table))
    print_table("Against the targets", more.targets(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
