"""The bench's reference, a careful PyTorch-tutorial training of a config: python scripts/tutorial_train.py
[--config configs/hotdog.yaml] [--json OUT] [section.key=value ...].  ImageFolder with the grayscale conversion and
the resize in the transform, a DataLoader with a persistent worker per core decoding every JPEG every epoch,
nn.Sequential, autograd, torch.optim.SGD with momentum; it stops at the target accuracy.  --json: the epochs,
whether it reached the target, and the training images/s of the epochs after the first."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotdog_torch import config  # noqa: E402
from hotdog_torch.cost import half_mse, one_hot  # noqa: E402
from hotdog_torch.data import stratified_split  # noqa: E402
from hotdog_torch.model import build_model  # noqa: E402


def loaders(cfg, device):
    steps = [transforms.Grayscale()] if cfg.data.channels == 1 else []  # ImageFolder's loader gives RGB
    steps += [transforms.Resize((cfg.data.image_size, cfg.data.image_size)), transforms.ToTensor()]
    steps.append(transforms.Normalize([0.5] * cfg.data.channels, [0.25] * cfg.data.channels))
    root = Path(cfg.data.root)
    dataset = datasets.ImageFolder(str(root / "train" if (root / "train").is_dir() else root))
    dataset.transform = transforms.Compose(steps)
    train_idx, val_idx = stratified_split(torch.tensor(dataset.targets), cfg.data.val_fraction, cfg.seed)
    workers = os.cpu_count() or 1
    kw = dict(num_workers=workers, persistent_workers=True, pin_memory=device.type == "cuda")
    train = DataLoader(Subset(dataset, train_idx.tolist()), batch_size=cfg.optim.batch_size, shuffle=True, **kw)
    val = DataLoader(Subset(dataset, val_idx.tolist()), batch_size=256, **kw)
    return train, val, len(dataset.classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split(".  ")[0])
    p.add_argument("--config", default="configs/hotdog.yaml")
    p.add_argument("--json", help="write the epochs, the target reached and the images/s here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    cfg = config.load(a.config, a.overrides)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    train, val, k = loaders(cfg, device)
    model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, k, cfg.model.activation).to(
        device
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    seconds, reached = [], False
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = half_mse(model(x), one_hot(y, k))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize(device) if device.type == "cuda" else None  # the work done, not only launched
        seconds.append(time.perf_counter() - t0)
        with torch.no_grad():
            right = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in val)
        accuracy = right / len(val.dataset)
        print(f"epoch {epoch}: val accuracy {accuracy:.2%} ({seconds[-1]:.1f} s training)", flush=True)
        reached = cfg.train.target_accuracy is not None and accuracy >= cfg.train.target_accuracy
        if reached:
            break
    steady = seconds[1:] or seconds
    rate = len(train.dataset) * len(steady) / sum(steady)
    if a.json:
        Path(a.json).write_text(json.dumps({"epochs": len(seconds), "reached": reached, "images_per_second": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
