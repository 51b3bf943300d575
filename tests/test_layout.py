"""The code's shape: modules a reader can hold, functions that fit a screen, data flowing one way (docs/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hotdog_torch"

# Upstream first: a module may import only modules of an earlier layer (docs/DESIGN.md, "Who may import whom").
LAYERS = [
    ["checks"],
    ["config"],
    [
        "cli",
        "files",
        "runtime",
        "drawings",
        "images",
        "model",
        "cost",
        "dist",
        "augment",
        "optim",
        "schedule",
        "router",
        "products",
    ],
    ["synth", "step", "stopping", "checkpoint", "cache"],
    ["data", "report"],
    ["loop", "framing", "run_files"],
    ["board", "router_training"],
    ["setup"],
    ["train", "search"],
    ["evaluate", "predict", "baselines", "two_weights", "export", "lr_find", "tune"],
    ["lessons", "serve"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def package_imports(path: Path) -> set[str]:
    """The hotdog_torch modules a module imports (from . import x, from .x import y), anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {a.name for a in node.names} if node.module is None else {node.module}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hotdog_torch"):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_place_in_the_layers():
    assert {p.stem for p in modules()} == set(LAYER)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_data_flows_one_way(path):
    upward = {m for m in package_imports(path) if LAYER[m] >= LAYER[path.stem]}
    assert not upward, f"{path.stem} (layer {LAYER[path.stem]}) imports {upward} from its own layer or below it"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_limits_a_reader_feels(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= (250 if path.stem == "train" else 400), f"{path.name} has {len(lines)} lines"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"{path.name}: lines over 120 characters at {long}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 80, f"{path.name}: {node.name} is {n} lines long"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "model.py"
    bad.write_text("from . import train\nfrom .data import Split\n")
    assert package_imports(bad) == {"train", "data"}


TRAINER = ["train", "loop", "step", "optim", "dist"]  # what a reader follows from run() to the weight update


def test_the_trainer_reads_in_one_sitting():
    """Issue 23: the five modules of the training path at most 950 lines together, no function in them over 40."""
    sizes = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in TRAINER}
    assert sum(sizes.values()) <= 950, sizes
    for m in TRAINER:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 40, (
                    f"{m}.{node.name} is {node.end_lineno - node.lineno + 1} lines"
                )
