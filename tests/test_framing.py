"""The framing report: each kind frames pictures as its name says, and evaluate --framings scores every kind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hotdog_torch import checkpoint, framing, synth
from hotdog_torch.drawings import FRAMINGS
from hotdog_torch.evaluate import main as evaluate_main

REPO = Path(__file__).resolve().parents[1]


def evaluate(*args):
    return subprocess.run(
        [sys.executable, "-m", "hotdog_torch.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_every_kind_frames_the_pictures_reproducibly_as_uint8(channels):
    images = torch.randint(40, 216, (6, channels, 32, 32), dtype=torch.uint8)
    for kind in framing.KINDS:
        framed = framing.frame(kind, images)
        assert framed.dtype == torch.uint8 and framed.shape == images.shape, kind
        assert torch.equal(framed, framing.frame(kind, images)), kind  # seeded: the same report every time
        assert not torch.equal(framed, images), kind
    assert torch.equal(framing.frame("flip", images), images.flip(-1))
    dim = framing.frame("dim", torch.full((1, channels, 8, 8), 200, dtype=torch.uint8))
    assert dim[0, :, 0, 0].tolist() == ([142] if channels == 1 else [154, 140, 119])  # 70%, warm (grey: its luma)


def test_shift_moves_the_subject_12_to_20_percent_and_tilt_turns_12_to_18_degrees():
    rows = framing._rows("shift", 500, 0)
    distance = rows[:, :2].norm(dim=1)
    assert distance.min() >= 0.12 - 1e-6 and distance.max() <= 0.20 + 1e-6
    angle = framing._rows("tilt", 500, 0)[:, 3].rad2deg().abs()
    assert angle.min() >= 12 - 1e-4 and angle.max() <= 18 + 1e-4


def test_evaluate_framings_prints_one_table_and_writes_json(trained, small_tree, tmp_path):
    run_dir, metrics = trained
    out = tmp_path / "f.json"
    best = str(run_dir / "checkpoints/best.pt")
    r = evaluate("--checkpoint", best, "--data", str(small_tree), "--framings", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())["framings"]
    assert list(figures) == ["as_is", *framing.KINDS]
    assert figures["as_is"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert all(0 <= f["accuracy"] <= 1 and 0 <= f["balanced_accuracy"] <= 1 for f in figures.values())
    table = r.stdout[r.stdout.index("framing ") :].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["as_is", *framing.KINDS]
    assert f"{100 * figures['shift']['balanced_accuracy']:.2f}%" in table[2]


def test_framings_on_a_one_class_checkpoint_is_one_sentence(trained, small_tree, tmp_path, capsys):
    run_dir, _ = trained
    ckpt = checkpoint.load(run_dir / "checkpoints/best.pt")
    ckpt["classes"] = ["hot_dog"]
    one = tmp_path / "one.pt"
    torch.save(ckpt, one)
    code = evaluate_main(["--checkpoint", str(one), "--data", str(small_tree / "test"), "--framings"])
    r = subprocess.CompletedProcess([], code, *capsys.readouterr())  # in this process (the real command line:
    # test_evaluate_framings_prints_one_table_and_writes_json, and test_evaluate_predict.py's mistakes)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--framings needs" in lines[0], r.stderr


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


SEED_SET = "1a78c2f308f9e0122ba56c8424e85f2ece2eeacd9e7da255bf9c6887e1762f07"  # drawn before --framing existed


def test_the_seed_set_is_drawn_byte_for_byte_as_before_and_photo_framing_draws_the_same_things(tmp_path):
    counts = dict(hot_dogs=4, others=10, test_hot_dogs=2, test_others=4, size=48, seed=7, workers=1, progress=False)
    assert tree_hash(synth.generate(tmp_path / "seed", **counts)) == SEED_SET
    synth.main(["--out", str(tmp_path / "photo"), "--hot-dogs", "4", "--others", "10", "--test-hot-dogs", "2"]
               + ["--test-others", "4", "--size", "48", "--seed", "7", "--framing", "photo"])  # fmt: skip
    assert synth.manifest(tmp_path / "photo") == synth.manifest(tmp_path / "seed")  # the same things, framed anew
    header = json.loads((tmp_path / "photo" / synth.MANIFEST).read_text())
    assert header["variation"] == dataclasses.asdict(FRAMINGS["photo"])
    seed_files, photo_files = sorted((tmp_path / "seed").rglob("*.jpg")), sorted((tmp_path / "photo").rglob("*.jpg"))
    assert [p.name for p in seed_files] == [p.name for p in photo_files]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(seed_files, photo_files, strict=True))
