"""Atomic save and safe load of a trained network.

A checkpoint holds everything needed to classify a photo without the original
config or data: the weights, the resolved config, the class names, the input
size and channels and the normalisation.  It is written atomically and read
with torch.load(weights_only=True), so a checkpoint from someone else cannot
run code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from .config import UserError
from .files import atomic_write
from .model import build_model

FORMAT = 1


def save(path: str | Path, *, model, optimizer, config: dict, classes: list[str], mean, std, epoch: int, step: int, metrics: dict, state: dict | None = None) -> None:
    """state: the loop's own (counters, best so far, history, RNG states, mid-epoch position) for --resume."""
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config,
        "classes": list(classes),
        "image_size": config["data"]["image_size"],
        "channels": config["data"]["channels"],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "state": state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if refused is None:  # the unpickler met bytes it cannot read at all
            raise UserError(f"checkpoint {path} is damaged or not a hotdog_torch checkpoint") from None
        raise UserError(f"checkpoint {path} holds code or objects other than weights and plain data, so it was not loaded ({refused})") from None
    except Exception:  # noqa: BLE001 - whatever the unpickler trips on in a file that is not ours, the file is at fault
        raise UserError(f"checkpoint {path} is damaged or not a hotdog_torch checkpoint") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"checkpoint {path} is not a hotdog_torch checkpoint")
    if ckpt["format"] != FORMAT:
        raise UserError(f"checkpoint {path} has format version {ckpt['format']}, but this hotdog_torch reads version {FORMAT}")
    return ckpt


def model_from(ckpt: dict) -> torch.nn.Sequential:
    """The network a checkpoint describes, with its weights, on the CPU, in eval mode."""
    m = ckpt["config"]["model"]
    model = build_model(ckpt["channels"] * ckpt["image_size"] ** 2, m["hidden"], len(ckpt["classes"]), m["activation"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
