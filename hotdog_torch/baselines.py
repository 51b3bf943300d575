"""Is the data honest?  Four classifiers on the same split, from trivial to the real MLP.

    python -m hotdog_torch.baselines --config configs/hotdog.yaml

(a) always answering the most common class ("not hot dog": 5000 of 6000 = 83%);
(b) a classifier that sees only each image's mean colour (mean R, G, B);
(c) the zero-hidden-layer network (one layer of sigmoid neurons on the pixels),
    best validation accuracy over a few learning rates;
(d) the configured network.
If (b) or (c) came close to (d), the images would carry a shortcut and the
hidden layer would not be needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch

from . import cli, config, data, train
from .config import Config
from .cost import half_mse, one_hot

LINEAR_LRS = (0.003, 0.01, 0.03)


def images_of(split: data.Split) -> torch.Tensor:
    return split.batch(torch.arange(len(split)))


def majority_accuracy(ds: data.Dataset) -> float:
    counts = torch.bincount(ds.val.labels, minlength=len(ds.classes))
    return counts.max().item() / len(ds.val)


def mean_colour_accuracy(cfg: Config, epochs: int = 60) -> float:
    """Best validation accuracy of a small MLP (3 -> 32 -> classes) on each image's mean R, G, B."""
    d = copy.deepcopy(cfg.data)
    d.channels, d.image_size = 3, min(cfg.data.image_size, 32)  # the mean colour barely depends on the size
    ds = data.load_dataset(d, cfg.seed, progress=False)
    features = {s: images_of(getattr(ds, s)).float().mean(dim=(2, 3)) / 255 for s in ("train", "val")}
    mu, sd = features["train"].mean(0), features["train"].std(0)
    x_train, x_val = (features["train"] - mu) / sd, (features["val"] - mu) / sd
    torch.manual_seed(cfg.seed)
    k = len(ds.classes)
    model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.ReLU(), torch.nn.Linear(32, k), torch.nn.Sigmoid())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    targets = one_hot(ds.train.labels, k)
    best = 0.0
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            half_mse(model(x_train[idx]), targets[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            best = max(best, (model(x_val).argmax(1) == ds.val.labels).float().mean().item())
    return best


def _best_val(cfg: Config, overrides: list[str]) -> dict:
    arm = config.from_dict(config.to_dict(cfg), overrides)
    run_dir = train.run(arm, "baseline", progress=False)
    return json.loads((run_dir / "metrics.json").read_text())


def measure(cfg: Config, log_dir: str, linear_epochs: int = 30) -> dict:
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False)
    out = {"majority": majority_accuracy(ds), "mean_colour": mean_colour_accuracy(cfg)}
    linear = [
        _best_val(
            cfg,
            [
                "model.hidden=[]",
                f"optim.lr={lr}",
                f"train.epochs={linear_epochs}",
                "train.target_accuracy=null",
                f"log.dir={log_dir}",
                f"log.run_name=linear-lr{lr}",
            ],
        )
        for lr in LINEAR_LRS
    ]
    out["zero_hidden"] = max(m["val_accuracy"] for m in linear)
    mlp = _best_val(cfg, [f"log.dir={log_dir}", "log.run_name=mlp"])
    out["mlp"] = mlp["val_accuracy"]
    out["mlp_test"] = mlp.get("test_accuracy")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/hotdog.yaml")
    p.add_argument("--log-dir", help="where the runs go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_intermixed_args(argv)  # flags and positionals in any order

    def command():
        cfg = config.load(a.config, a.overrides)
        data.prepare(cfg.data, cfg.seed)  # draws the synthetic set if the config asks for it
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(cfg, a.log_dir or tmp)
        rows = [
            ("(a) always the most common class", r["majority"]),
            ("(b) mean colour only (3 -> 32 -> 2 MLP)", r["mean_colour"]),
            (f"(c) zero hidden layers (best of lr {', '.join(map(str, LINEAR_LRS))})", r["zero_hidden"]),
            (f"(d) {cfg.model.hidden} {cfg.model.activation} MLP", r["mlp"]),
        ]
        print("\n| classifier | val accuracy |\n|---|---|")
        for name, acc in rows:
            print(f"| {name} | {acc:.2%} |")
        if r["mlp_test"] is not None:
            print(f"| (d) on the test split | {r['mlp_test']:.2%} |")

    return cli.exit_code(command)


if __name__ == "__main__":
    cli.run(main)
