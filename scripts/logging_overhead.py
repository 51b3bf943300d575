"""How much the default TensorBoard logging slows training: the default config with logging at its
defaults against logging turned down to the per-step cost and per-epoch scalars.

    python scripts/logging_overhead.py [--config configs/hotdog.yaml] [--epochs 21] [--pairs 3]

Each run trains --epochs epochs (no early stop); an epoch's time counts training, evaluation,
logging and checkpoints. The figure is the mean epoch time over epochs 2 .. N-1 (so the pictures of
epochs 10 and 20 are in it, and the end-of-run pictures are not), runs alternating on and off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotdog_torch import checkpoint, config, train  # noqa: E402


def epoch_seconds(cfg_path, overrides, log_dir):
    """(mean epoch seconds, share of them spent in the optional summaries) over epochs 2 .. N-1."""
    cfg = config.load(cfg_path, overrides + [f"log.dir={log_dir}", "train.target_accuracy=null"])
    run_dir = train.run(cfg, "overhead", progress=False)
    history = checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]["history"][1:-1]
    total = sum(m["seconds"] for m in history)
    logging = sum(m["logging_seconds"] for m in history)
    return total / len(history), logging / (total - logging)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/hotdog.yaml")
    p.add_argument("--epochs", type=int, default=21)
    p.add_argument("--pairs", type=int, default=3)
    a = p.parse_args(argv)
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.pairs):
            on.append(epoch_seconds(a.config, [f"train.epochs={a.epochs}"], tmp))
            off.append(
                epoch_seconds(
                    a.config, [f"train.epochs={a.epochs}", "log.every_steps=0", "log.images_every_epochs=0"], tmp
                )
            )
    ratios = [x[0] / y[0] for x, y in zip(on, off, strict=True)]
    print("\n| logging | mean epoch seconds (one per run) |\n|---|---|")
    print(f"| defaults (every_steps 50, images_every_epochs 10) | {', '.join(f'{x[0]:.3f}' for x in on)} |")
    print(f"| per-step cost and epoch scalars only | {', '.join(f'{x[0]:.3f}' for x in off)} |")
    inside = statistics.median(x[1] for x in on)
    print(
        f"\ntimed inside the runs, the optional summaries (norms, histograms, pictures) cost: median {inside:+.1%} "
        f"of the rest of the epoch (runs: {', '.join(f'{x[1]:+.1%}' for x in on)})"
    )
    print(
        f"between runs, on against off: median {statistics.median(ratios) - 1:+.1%} "
        f"(pairs: {', '.join(f'{r - 1:+.1%}' for r in ratios)}); "
        "this machine's speed drifts by more than that between runs"
    )


if __name__ == "__main__":
    main()
