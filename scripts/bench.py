"""The bench: hotdog_torch's own command against a careful tutorial pipeline and a NumPy network, side by side.

    python scripts/bench.py [--parts cold,momentum,plain,small,ddp] [--repeats 3] [--epochs 3] [--json OUT]

Each figure is a new process of `python -m hotdog_torch.train` read back from its metrics.json, or of
`python scripts/tutorial_train.py` from its --json; they take turns, and a figure is the best of --repeats runs
(the machine is shared: a slower run had the cores taken).  TARGETS is the one place the targets are written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hotdog_torch import config, data, runtime, synth  # noqa: E402

TARGETS = {  # figure: (what it is held to, bound, "min" = at least / "max" = at most)
    "cold": ("default job, fresh cache, command to 99%: x the tutorial", 3.0, "min"),
    "momentum": ("momentum 0.9, RGB 128, [512], batch 64: x the tutorial", 4.0, "min"),
    "limit": ("momentum 0.9: step time / the step's limit", 1.2, "max"),
    "plain": ("plain SGD, RGB 128, [512], batch 64: x the tutorial", 3.0, "min"),
    "small": ("784-30-10, batch 10, lr 3, plain SGD: x NumPy", 1.0, "min"),
}
STEADY = ["train.target_accuracy=null", "log.images_every_epochs=0"]
PY = (sys.executable,)


def command(args: list[str]) -> float:
    """Seconds from starting the command to its exit (it must succeed)."""
    t0, done = time.perf_counter(), subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return time.perf_counter() - t0


def train(tmp, name, cfg, *overrides, launcher=PY) -> tuple[float, dict]:
    """(seconds, metrics.json) of `python -m hotdog_torch.train --config cfg overrides` in a new process."""
    runs = f"log.dir={tmp}/runs"
    seconds = command([*launcher, "-m", "hotdog_torch.train", "--no-progress", "--config", cfg, runs, *overrides])
    return seconds, json.loads(Path(tmp, "runs", name, "metrics.json").read_text())


def tutorial(tmp, name, cfg, *overrides) -> tuple[float, dict]:
    """(seconds, its --json) of `python scripts/tutorial_train.py --config cfg overrides` in a new process."""
    out = Path(tmp, f"tutorial-{name}.json")
    seconds = command([sys.executable, "scripts/tutorial_train.py", "--config", cfg, "--json", str(out), *overrides])
    return seconds, json.loads(out.read_text())


def cold(a, tmp) -> tuple[dict, list]:
    """The default job from the command to the target, a fresh decode cache each time, against the tutorial."""
    ours, theirs, cfg = [], [], "configs/hotdog.yaml"
    for i in range(a.repeats):
        s, m = train(tmp, f"cold{i}", cfg, f"log.run_name=cold{i}", f"data.cache_dir={tmp}/c{i}", *a.o)
        ours.append((s, m["epochs"], m["stopped_because"] == "target_accuracy"))
        s, m = tutorial(tmp, f"cold{i}", cfg, *a.o)
        theirs.append((s, m["epochs"], m["reached"]))
    runs = lambda rs: ", ".join(f"{s:.1f} s ({e} epochs{'' if hit else ', short'})" for s, e, hit in rs)  # noqa: E731
    o, t = min(ours)[0], min(theirs)[0]
    rows = [(f"hotdog_torch, `python -m hotdog_torch.train --config {cfg}`", f"{o:.1f} s", runs(ours))]
    rows.append((f"tutorial, `python scripts/tutorial_train.py --config {cfg}`", f"{t:.1f} s", runs(theirs)))
    return {"ours": ours, "tutorial": theirs, "cold": t / o}, rows


def throughput(a, tmp, momentum: float) -> tuple[dict, list]:
    """Steady-state training images/s of configs/bench.yaml at this momentum, ours against the tutorial's; with
    momentum also ours with subnormals not flushed, and the step against its limit (measured between the runs)."""
    part, cfg = "momentum" if momentum else "plain", "configs/bench.yaml"
    arms = {"hotdog_torch": (PY, ["train.flush_denormal=auto"]), "tutorial, DataLoader decoding every epoch": None}
    arms |= {"hotdog_torch, train.flush_denormal=false": (PY, ["train.flush_denormal=false"])} if momentum else {}
    over = [f"optim.momentum={momentum}", f"train.epochs={a.epochs}", *STEADY, f"data.cache_dir={tmp}/c", *a.o]
    r, rows, limits = alternate(a, tmp, part, cfg, over, arms, momentum_limit if momentum else None)
    ours, tutorial_rate, *off = (max(rates) for rates in r["rates"].values())
    r[part] = ours / tutorial_rate
    if momentum:
        rows.append(("flushing subnormals", f"{ours / off[0]:.2f}x", "images/s flushed / not flushed"))
        limit = {k: min(x[k] for x in limits) for k in limits[0]}
        seconds = config.load(cfg, a.o).optim.batch_size / ours  # of our step, from the best run
        note = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in limit.items()) + f"; our step {seconds * 1e3:.1f} ms"
        rows.append(("the step's limit: GEMMs + one stream over W, v", f"{sum(limit.values()) * 1e3:.1f} ms", note))
        r |= {"limit_seconds": limit, "limit": seconds / sum(limit.values())}
    return r, rows


def alternate(a, tmp, part, cfg, over, arms, between=None) -> tuple[dict, list, list]:
    """Each arm's steady-state training images/s, the arms taking turns --repeats times; an arm is (launcher, more
    overrides) of our command, or None for the tutorial.  between(config), if given, is measured after each turn."""
    rates, steps, measured = {arm: [] for arm in arms}, {}, []
    for i in range(a.repeats):
        for j, (arm, how) in enumerate(arms.items()):
            name = f"{part}{i}{j}"
            if how is None:
                rates[arm].append(tutorial(tmp, name, cfg, *over)[1]["images_per_second"])
                continue
            m = train(tmp, name, cfg, *over, *how[1], f"log.run_name={name}", launcher=how[0])[1]
            rates[arm].append(m["train_images_per_second"])
            steps[arm] = f" ({m['step']})"
        measured += [between(config.load(cfg, a.o))] if between else []
    rows = [(arm + steps.get(arm, ""), f"{max(r):,.0f} images/s", runs(r)) for arm, r in rates.items()]
    return {"rates": rates}, rows, measured


def runs(values) -> str:
    return "runs: " + ", ".join(f"{v:,.0f}" for v in values)


def momentum_limit(cfg) -> dict:
    """Seconds per step below which no momentum step of the config's first layer can go: the forward GEMM, the
    gradient product accumulated into the velocity, and one stream over the weights and the velocity; best of 7."""
    n, width, hidden = cfg.optim.batch_size, cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden[0]
    g = lambda *shape: torch.randn(*shape, device=runtime.resolve_device(cfg.device))  # noqa: E731
    x, w, v, d = g(n, width), g(hidden, width), g(hidden, width) * 0, g(n, hidden)
    ops = {"x·Wᵀ": lambda: torch.mm(x, w.t()), "v += δᵀx": lambda: v.addmm_(d.t(), x), "W −= lr·v": lambda: w.sub_(v)}
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    return {name: min(timeit.repeat(lambda op=op: (op(), sync()), number=1, repeat=7)) for name, op in ops.items()}


def ten_classes(root: Path, tmp: str) -> Path:
    """The synthetic set's training images as 10 classes by what each shows (the 4 kinds of hot dog as one)."""
    for path, kind in synth.manifest(root).items():
        group, what = kind.split("/")
        if path.startswith("train/"):
            folder = Path(tmp, "ten", group if group == "hot_dog" else what)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(path).name).symlink_to((root / path).resolve())
    return Path(tmp, "ten")


def numpy_epoch(W1, b1, W2, b2, X, Y, order, batch, lr):
    """Nielsen's network.py, vectorised over each mini-batch: sigmoid neurons, ½·MSE, plain SGD."""
    for i in range(0, len(order), batch):
        x, y = X[order[i : i + batch]], Y[order[i : i + batch]]
        a1 = 1 / (1 + np.exp(-(x @ W1.T + b1)))
        a2 = 1 / (1 + np.exp(-(a1 @ W2.T + b2)))
        d2 = (a2 - y) * a2 * (1 - a2) / len(x)
        d1 = (d2 @ W2) * a1 * (1 - a1)
        W2 -= lr * (d2.T @ a1)
        b2 -= lr * d2.sum(0)
        W1 -= lr * (d1.T @ x)
        b1 -= lr * d1.sum(0)


def small(a, tmp) -> tuple[dict, list]:
    """784-30-10 sigmoid, ½·MSE, batch 10, lr 3 (Nielsen's MNIST run) on 10 classes of the synthetic set at
    28x28: our command's steady-state images/s against a vectorised NumPy network's, alternating."""
    root = ten_classes(Path(config.load("configs/hotdog.yaml", a.o).data.root), tmp)
    over = [f"data.root={root}", "data.image_size=28", "model.hidden=[30]", "optim.batch_size=10", "optim.lr=3"]
    over += ["optim.momentum=0", f"train.epochs={a.epochs}", *STEADY, "log.every_steps=0", f"data.cache_dir={tmp}/c"]
    cfg = config.load("configs/hotdog.yaml", over)
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False)  # the same decode, resize and training split
    n, k = len(ds.train), len(ds.classes)
    X = ds.train.batch(torch.arange(n)).reshape(n, -1).float().numpy() / 255
    X, Y = (X - X.mean()) / X.std(), np.eye(k, dtype=np.float32)[ds.train.labels.numpy()]
    rng = np.random.default_rng(0)  # weights and biases of N(0, 1/fan-in), as torch's Linear draws them (roughly)
    params = [(rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for s in [(30, 784), (30,), (k, 30), (k,)]]
    ours, theirs = [], []
    for i in range(a.repeats):
        ours.append(train(tmp, f"small{i}", "configs/hotdog.yaml", *over, f"log.run_name=small{i}")[1])
        for epoch in range(a.epochs):
            with np.errstate(over="ignore"):  # exp(-z) overflows to inf for a saturated neuron: σ is then 0, right
                t = timeit.timeit(lambda: numpy_epoch(*params, X, Y, rng.permutation(n), 10, 3.0), number=1)
            theirs += [n / t] if epoch or a.epochs == 1 else []
    rates = [m["train_images_per_second"] for m in ours]
    o, t = max(rates), max(theirs)
    rows = [(f"hotdog_torch ({ours[0]['step']}), {n} images an epoch", f"{o:,.0f} images/s", runs(rates))]
    rows.append(("NumPy, Nielsen's network vectorised over each batch (float32)", f"{t:,.0f} images/s", runs(theirs)))
    return {"ours": o, "numpy": t, "small": o / t}, rows


def ddp(a, tmp) -> tuple[dict, list]:
    """configs/hotdog.yaml as one process and as two torchrun processes (factors gathered, gradients all-reduced)."""
    run2 = (*PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    arms = {"1 process": (PY, []), "2 processes, factors gathered": (run2, ["train.ddp_sync=factors"])}
    arms["2 processes, gradients all-reduced"] = (run2, ["train.ddp_sync=gradients"])
    over = [f"train.epochs={a.epochs}", *STEADY, f"data.cache_dir={tmp}/c", *a.o]
    return alternate(a, tmp, "ddp", "configs/hotdog.yaml", over, arms)[:2]


PARTS = {"cold": cold, "momentum": lambda a, tmp: throughput(a, tmp, 0.9), "small": small, "ddp": ddp}
PARTS["plain"] = lambda a, tmp: throughput(a, tmp, 0.0)


def verdicts(figures: dict) -> list:
    """(target, figure, met or missed by how much) for each figure that has a target."""
    rows = []
    for key, (what, bound, kind) in ((k, TARGETS[k]) for k in TARGETS if k in figures):
        v, sign = figures[key], 1 if kind == "min" else -1
        verdict = "met" if sign * (v - bound) >= 0 else f"missed by {abs(v / bound - 1):.0%}"
        rows.append((f"target: {what} {'>=' if sign > 0 else '<='} {bound:g}", f"{v:.2f}", verdict))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="cold,momentum,plain,small", help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating; the best is the figure")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each throughput run (the first is warm-up)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every run, e.g. data.root=...")
    args = sys.argv[1:] if argv is None else argv
    a = p.parse_args(args)
    a.o = a.overrides
    cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    head = f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu[0] if cpu else platform.machine()}, {os.cpu_count()} cores"
    print(f"python scripts/bench.py {' '.join(args)}\n{head}, torch {torch.__version__}\n")
    print("| what | figure | note |\n|---|---|---|", flush=True)
    out = {"machine": head, "argv": args, "targets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for part in a.parts.split(","):
            out[part], rows = PARTS[part](a, tmp)
            targets = verdicts(out[part])
            out["targets"] += targets
            for row in rows + targets:
                print("| " + " | ".join(row) + " |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
