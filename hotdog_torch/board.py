"""Everything written to TensorBoard.

Per step (x = optimiser step):   cost/train
Per epoch (x = epoch):           cost/train_epoch, cost/val, error_rate/train,
                                 error_rate/val, accuracy/val
Text:                            config (the resolved YAML), dataset (class counts, skipped files)

The error rate is the seed's first cost function, # wrongly identified / total:
it is logged beside the smooth cost ½·MSE that gradient descent follows.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def open_writer(run_dir: str | Path) -> SummaryWriter:
    return SummaryWriter(log_dir=str(run_dir), flush_secs=10)


def log_text(writer: SummaryWriter, config_yaml: str, dataset_summary: str) -> None:
    # TensorBoard renders text as Markdown: indent by four spaces to keep it verbatim.
    writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)
    writer.add_text("dataset", "    " + dataset_summary.replace("\n", "\n    "), 0)


def log_steps(writer: SummaryWriter, tag: str, values: list[float], first_step: int) -> None:
    for i, v in enumerate(values):
        writer.add_scalar(tag, v, first_step + i)


def log_epoch(writer: SummaryWriter, epoch: int, metrics: dict) -> None:
    writer.add_scalar("cost/train_epoch", metrics["train_cost"], epoch)
    writer.add_scalar("error_rate/train", metrics["train_error_rate"], epoch)
    writer.add_scalar("cost/val", metrics["val_cost"], epoch)
    writer.add_scalar("error_rate/val", metrics["val_error_rate"], epoch)
    writer.add_scalar("accuracy/val", metrics["val_accuracy"], epoch)
    writer.flush()
