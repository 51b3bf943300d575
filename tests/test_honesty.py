"""The synthetic data is honest: it needs the hidden layer (checked on a reduced set)."""

from __future__ import annotations

import pytest

from hotdog_torch import baselines, config


def test_only_the_hidden_layer_separates_the_classes(reduced_tree, tmp_path):
    cfg = config.load(
        "configs/hotdog.yaml",
        [
            f"data.root={reduced_tree}",
            "data.generate=false",
            "data.image_size=64",
            f"data.cache_dir={tmp_path}/cache",
            "train.epochs=25",
            "device=cpu",
        ],
    )
    r = baselines.measure(cfg, str(tmp_path / "runs"), linear_epochs=20)
    print(r)
    assert r["majority"] == pytest.approx(1500 / 1800, abs=1e-3)  # (a) always "not hot dog": 83%
    assert r["mean_colour"] <= 0.90  # (b)
    assert r["zero_hidden"] <= 0.95  # (c)
    assert r["mlp"] >= 0.97  # (d), on a quarter of the images at half the size
    assert r["mlp"] - r["zero_hidden"] >= 0.05
