"""The PyTorch-tutorial way to train the default job, as a command, to time it from the command to the target.

    python scripts/tutorial_train.py [--config configs/hotdog.yaml] [section.key=value ...]

The same hyper-parameters as hotdog_torch's run of that config (image size, channels, MLP, sigmoid,
½·MSE, lr, momentum, batch size, seed, the stratified 20% validation split, the target validation
accuracy), written as the tutorials write it: torchvision's ImageFolder + transforms + a DataLoader
(every core, shuffled) that decodes and resizes every JPEG every epoch, nn.Sequential, autograd and
torch.optim.SGD, the validation split scored after each epoch.  It prints one line per epoch and
exits once validation accuracy reaches the target.
"""

from __future__ import annotations

import argparse
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


def loaders(cfg, workers):
    steps = [transforms.Resize((cfg.data.image_size, cfg.data.image_size))]
    if cfg.data.channels == 1:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * cfg.data.channels, [0.25] * cfg.data.channels)]
    root = Path(cfg.data.root)
    dataset = datasets.ImageFolder(
        str(root / "train" if (root / "train").is_dir() else root), transforms.Compose(steps)
    )
    train_idx, val_idx = stratified_split(torch.tensor(dataset.targets), cfg.data.val_fraction, cfg.seed)
    kw = dict(num_workers=workers, persistent_workers=workers > 0)
    train = DataLoader(Subset(dataset, train_idx.tolist()), batch_size=cfg.optim.batch_size, shuffle=True, **kw)
    val = DataLoader(Subset(dataset, val_idx.tolist()), batch_size=256, **kw)
    return train, val, len(dataset.classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/hotdog.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    cfg = config.load(a.config, a.overrides)
    torch.manual_seed(cfg.seed)
    train, val, k = loaders(cfg, os.cpu_count() or 1)
    model = build_model(cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, k, cfg.model.activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        for x, y in train:
            loss = half_mse(model(x), one_hot(y, k))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            right = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
        accuracy = right / len(val.dataset)
        print(f"epoch {epoch}: val accuracy {accuracy:.2%} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if cfg.train.target_accuracy is not None and accuracy >= cfg.train.target_accuracy:
            print(f"reached {cfg.train.target_accuracy:.0%} at epoch {epoch}")
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
