"""What a run tells its user: the console lines, and metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import RunState
from .config import Config
from .files import atomic_write_text


def print_epoch(epoch: int, epochs: int, m: dict, images_per_second: float) -> None:
    """The epoch's line; its speed is of the steps this process took (none: an epoch resumed after its last step)."""
    speed = f"  {images_per_second:,.0f} images/s" if images_per_second else ""
    print(
        f"epoch {epoch:3d}/{epochs}  train cost {m['train_cost']:.4f}  val cost {m['val_cost']:.4f}  "
        f"val error rate {100 * m['val_error_rate']:5.2f}%  val accuracy {100 * m['val_accuracy']:6.2f}%{speed}",
        flush=True,
    )


def metrics(state: RunState, router: dict | None = None, **extra) -> dict:
    """The best epoch's figures, the run's counters and speed, the router phase's (router_training.Phase.state) and
    whatever else the caller knows."""
    best = state.best
    out = {k: best[k] for k in ("val_accuracy", "val_error_rate", "val_cost", "train_cost")}
    out |= {
        "best_epoch": best["epoch"],
        "epochs": len(state.history),
        "steps": state.global_step,
        "seconds": state.seconds,
    }
    out["train_images_per_second"] = state.train_images / state.train_seconds if state.train_seconds else None
    if router:  # model.router: its phase, before the epochs
        r = router
        out |= {"router_epochs": r["epoch"], "router_seconds": sum(r["seconds"]), "router_cost": r["costs"][-1]}
    return out | extra


def write_metrics(run_dir: Path, m: dict) -> None:
    """metrics.json, NaN and inf written as null so that it stays valid JSON."""
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
    atomic_write_text(run_dir / "metrics.json", json.dumps(finite, indent=2) + "\n")


def print_end(cfg: Config, state: RunState, m: dict, run_dir: Path) -> None:
    n, best = len(state.history), state.best
    why = {
        "target_accuracy": f"reached the target validation accuracy {cfg.train.target_accuracy or 0:.2%} at epoch {n}",
        "diverged": f"diverged at epoch {n}",
        "pruned": f"pruned by the tuner at epoch {n}",
        "no_improvement": (
            f"no improvement of {cfg.train.monitor} for {cfg.train.patience} epochs: the best epoch's weights "
            f"({best['epoch']}) are the run's, in best.pt, and metrics.json and the test figures are theirs"
        ),
    }.get(state.stopped_because, f"ran all {cfg.train.epochs} epochs")
    test = f", test accuracy {m['test_accuracy']:.2%}" if "test_accuracy" in m else ""
    print(f"stopped: {why}. best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.2%}{test}. wrote {run_dir}")
    print(next_steps(cfg, run_dir), flush=True)


def next_steps(cfg: Config, run_dir: Path) -> str:
    """The commands that show the run and use what it learnt."""
    make = " (or: make tensorboard)" if Path(cfg.log.dir) == Path("runs") else ""
    best = run_dir / "checkpoints" / "best.pt"
    return (
        f"see it:   tensorboard --logdir {cfg.log.dir}{make}, then open http://127.0.0.1:6006\n"
        f"use it:   python -m hotdog_torch.predict --checkpoint {best} PHOTO_OR_FOLDER ..."
    )
