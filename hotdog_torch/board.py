"""Everything written to TensorBoard.

The x axis is always the optimiser step (1 = after the first update).
Per step:                        cost/train
Per epoch (at its last step):    epoch, cost/train_epoch, cost/val, error_rate/train,
                                 error_rate/val, accuracy/val
Text:                            config (the resolved YAML), dataset (class counts, skipped files)

The error rate is the seed's first cost function, # wrongly identified / total:
it is logged beside the smooth cost ½·MSE that gradient descent follows.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def open_writer(run_dir: str | Path, purge_step: int | None = None) -> SummaryWriter:
    """purge_step, on resume: TensorBoard discards events this run logged at that step or later."""
    return SummaryWriter(log_dir=str(run_dir), flush_secs=10, purge_step=purge_step)


def log_text(writer: SummaryWriter, config_yaml: str, dataset_summary: str) -> None:
    # TensorBoard renders text as Markdown: indent by four spaces to keep it verbatim.
    writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)
    writer.add_text("dataset", "    " + dataset_summary.replace("\n", "\n    "), 0)


def log_steps(writer: SummaryWriter, tag: str, values: list[float], first_step: int) -> None:
    for i, v in enumerate(values):
        writer.add_scalar(tag, v, first_step + i)


def log_epoch(writer: SummaryWriter, step: int, metrics: dict) -> None:
    """Epoch metrics at the global step the epoch ended on (as Lightning does), so every curve shares one x axis."""
    writer.add_scalar("epoch", metrics["epoch"], step)
    writer.add_scalar("cost/train_epoch", metrics["train_cost"], step)
    writer.add_scalar("error_rate/train", metrics["train_error_rate"], step)
    writer.add_scalar("cost/val", metrics["val_cost"], step)
    writer.add_scalar("error_rate/val", metrics["val_error_rate"], step)
    writer.add_scalar("accuracy/val", metrics["val_accuracy"], step)
    writer.flush()
