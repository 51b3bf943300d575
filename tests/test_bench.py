"""scripts/bench.py at tiny sizes, so that the bench behind docs/BENCHMARKS.md cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from conftest import in_process

REPO = Path(__file__).resolve().parents[1]


def bench_main():
    """scripts/bench.py's main(): the bench is run in this process (a start-up of torch less), each of its figures
    in a process of its own, as always."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main


def test_the_bench_runs_the_trainer_the_tutorial_and_numpy(small_tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "bench.json"
    tiny = [f"data.root={small_tree}", "data.image_size=16", "train.epochs=1", "model.hidden=[8]", "device=cpu"]
    args = ["--parts", "cold,momentum,small", "--repeats", "1", "--epochs", "1", "--json", str(out), *tiny]
    monkeypatch.setattr(sys, "path", sys.path[:])  # the script puts the repository first on it
    r = in_process(bench_main(), args, capfd)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout
    r = json.loads(out.read_text())
    assert r["cold"]["ours"][0][1] == 1 and r["cold"]["tutorial"][0][1] == 1  # both ran their one epoch
    assert r["momentum"]["rates"]["hotdog_torch"][0] > 0 and r["momentum"]["limit"] > 0
    assert set(r["small"]) == {"ours", "numpy", "small"} and r["small"]["numpy"] > 0
    verdicts = {what.split(":")[1].split(" x ")[0].strip(): v for what, _, v in r["targets"]}
    assert len(verdicts) == 4 and all(v == "met" or v.startswith("missed by") for v in verdicts.values())
    assert printed.count("| target: ") == 4


def test_scripts_stay_small():
    """scripts/ holds what proves something: the bench, its tutorial, the GPU and app checks, the screenshots."""
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "scripts").iterdir() if p.is_file())
    assert lines <= 900, f"scripts/ has {lines} lines"
