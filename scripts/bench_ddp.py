"""One process against two under torchrun, on this machine, and what each way of sharing a gradient sends.

    python scripts/bench_ddp.py [--config configs/hotdog.yaml] [--epochs 4] [--repeats 2]

Trains the config for --epochs epochs (no target, no pictures) as one process, and as two torchrun
processes with the fused step's gradients shared by all-gathering the factors and by all-reducing the
gradients, alternating, and prints the median steady-state images/s of each (metrics.json's
train_images_per_second).  Then, from the model's shapes, the bytes each process receives per step for
each layer under either way of sharing, for 2, 4 and 8 processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotdog_torch import config, dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def images_per_second(cfg_path: str, processes: int, sync: str, epochs: int, tmp: str, name: str) -> float:
    args = [
        "-m",
        "hotdog_torch.train",
        "--no-progress",
        "--config",
        cfg_path,
        f"train.epochs={epochs}",
        "train.target_accuracy=null",
        "log.images_every_epochs=0",
        f"train.ddp_sync={sync}",
        f"log.dir={tmp}",
        f"log.run_name={name}",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*launcher, *args] if processes > 1 else [sys.executable, *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(tmp) / name / "metrics.json").read_text())["train_images_per_second"]


def bytes_per_step(layers: list[tuple[int, int]], batch: int, world: int) -> list[tuple[str, int, int]]:
    """Per layer (in -> out): bytes a process receives per step, gathering factors / all-reducing gradients."""
    rows = []
    for n_in, n_out in layers:
        sent = dist.sync_bytes(dist.World(0, world), batch, n_out, n_in)  # what train.ddp_sync: auto compares
        rows.append((f"{n_in} -> {n_out}", sent["factors"], sent["gradients"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/hotdog.yaml")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    cfg = config.load(a.config)
    arms = {
        "1 process": (1, "auto"),
        "2 processes, factors gathered": (2, "factors"),
        "2 processes, gradients all-reduced": (2, "gradients"),
    }
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for arm, (processes, sync) in arms.items():
                rates[arm].append(
                    images_per_second(a.config, processes, sync, a.epochs, tmp, f"r{i}-{processes}-{sync}")
                )
    print(
        f"\n`python scripts/bench_ddp.py --config {a.config} --epochs {a.epochs}`: steady-state images/s "
        f"(epochs after the first), median of {a.repeats} runs each, alternating\n"
    )
    print("| run | images/s | runs |\n|---|---|---|")
    for arm, values in rates.items():
        print(f"| {arm} | {statistics.median(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    width = cfg.data.channels * cfg.data.image_size**2
    sizes = [width, *cfg.model.hidden, 2]
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    print(f"\nBytes each process receives per step, batch {cfg.optim.batch_size}, fp32 (auto takes the smaller):\n")
    print("| processes | layer | factors gathered | gradients all-reduced |\n|---|---|---|---|")
    for world in (2, 4, 8):
        for layer, factors, gradients in bytes_per_step(layers, cfg.optim.batch_size, world):
            print(f"| {world} | {layer} | {factors:,} | {gradients:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
