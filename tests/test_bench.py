"""scripts/bench.py at tiny sizes, so that the bench behind docs/BENCHMARKS.md cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_bench_runs_the_trainer_the_tutorial_and_numpy(small_tree, tmp_path):
    out = tmp_path / "bench.json"
    tiny = [f"data.root={small_tree}", "data.image_size=16", "train.epochs=1", "model.hidden=[8]"]
    args = ["--parts", "cold,momentum,small", "--repeats", "1", "--epochs", "1", "--json", str(out), *tiny]
    done = subprocess.run([sys.executable, "scripts/bench.py", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["cold"]["ours"][0][1] == 1 and r["cold"]["tutorial"][0][1] == 1  # both ran their one epoch
    assert r["momentum"]["rates"]["hotdog_torch"][0] > 0 and r["momentum"]["limit"] > 0
    assert set(r["small"]) == {"ours", "numpy", "small"} and r["small"]["numpy"] > 0
    verdicts = {what.split(":")[1].split(" x ")[0].strip(): v for what, _, v in r["targets"]}
    assert len(verdicts) == 4 and all(v == "met" or v.startswith("missed by") for v in verdicts.values())
    assert done.stdout.count("| target: ") == 4


def test_scripts_stay_small():
    """scripts/ holds what proves something: the bench, its tutorial, the GPU and app checks (issue 19; the app
    check times the router's cost since issue 22: 600 lines then 630)."""
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "scripts").iterdir() if p.is_file())
    assert lines <= 630, f"scripts/ has {lines} lines"
