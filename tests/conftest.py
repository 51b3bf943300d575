"""Shared fixtures: real ImageFolder trees of real JPEG files, drawn by hotdog_torch.synth."""

from __future__ import annotations

import os

import pytest
import torch

from hotdog_torch import config, synth


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="session")
def no_home_cache(tmp_path_factory):
    """No test, nor a process it starts, writes the real ~/.cache: the default decode cache is the session's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """train/{hot_dog,not_hot_dog} (30 + 60) and test/ (10 + 20) of 32x32 JPEGs."""
    root = tmp_path_factory.mktemp("tiny") / "hotdog"
    synth.generate(
        root, hot_dogs=30, others=60, test_hot_dogs=10, test_others=20, size=32, seed=1, workers=1, progress=False
    )
    return root


@pytest.fixture
def make_config(tmp_path):
    """make_config(root, "optim.lr=0.1", ...): a config for seconds of CPU training, writing under tmp_path."""

    def make(root, *overrides) -> config.Config:
        return config.from_dict(tiny_doc(root, tmp_path), list(overrides))

    return make


def config_file(tree, tmp_path, name, **changes):
    """A YAML config file of tiny_doc, the run named `name`, with changes given as section__key=value."""
    import yaml

    doc = tiny_doc(tree, tmp_path)
    doc["log"]["run_name"] = name
    for key, value in changes.items():
        section, field = key.split("__")
        doc[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_doc(root, tmp_path) -> dict:
    return {
        "data": {
            "root": str(root),
            "generate": False,
            "image_size": 32,
            "channels": 1,
            "cache_dir": str(tmp_path / "cache"),
            "workers": 1,
        },
        "model": {"hidden": [16], "activation": "sigmoid"},
        "optim": {"lr": 0.5, "batch_size": 16, "momentum": 0.9},
        "train": {"epochs": 3, "target_accuracy": None},
        "log": {"dir": str(tmp_path / "runs"), "run_name": "tiny"},
        "device": "cpu",
    }


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """300 training (100 hot dogs) and 60 test 32x32 JPEGs: enough for a tiny run to learn."""
    root = tmp_path_factory.mktemp("small") / "hotdog"
    synth.generate(
        root, hot_dogs=100, others=200, test_hot_dogs=20, test_others=40, size=32, seed=3, workers=1, progress=False
    )
    return root


@pytest.fixture(scope="session")
def reduced_tree(tmp_path_factory):
    """1800 training images (300 hot dogs) of 64x64: enough for a network that learns the classes well."""
    root = tmp_path_factory.mktemp("reduced") / "hotdog"
    synth.generate(root, hot_dogs=300, others=1500, test_hot_dogs=0, test_others=0, size=64, seed=5, progress=False)
    return root


@pytest.fixture(scope="session")
def trained(small_tree, tmp_path_factory):
    """(run folder, metrics) of a run on small_tree that learnt (90% validation accuracy), shared by the tests of
    what uses a trained network: evaluate, predict, serve, export."""
    import json

    from hotdog_torch import train

    tmp = tmp_path_factory.mktemp("trained")
    doc = tiny_doc(small_tree, tmp)
    doc["train"].update(epochs=60, target_accuracy=0.9)
    doc["model"]["hidden"] = [32]
    doc["optim"]["lr"] = 0.2
    run_dir = train.run(config.from_dict(doc), progress=False)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())
