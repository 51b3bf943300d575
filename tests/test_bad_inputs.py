"""Broken files, odd images and damaged checkpoints: each is used, skipped and counted, or refused in one sentence."""

from __future__ import annotations

import importlib
import os
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from conftest import in_process
from PIL import Image

from hotdog_torch import checkpoint, config, data, train
from hotdog_torch.config import UserError


def png_claiming(width, height) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb for Pillow's guard."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def messy_tree(tmp_path, tiny_tree):
    root = tmp_path / "messy"
    shutil.copytree(tiny_tree / "train", root)
    hot, other = root / "hot_dog", root / "not_hot_dog"
    good = sorted(hot.glob("*.jpg"))[0].read_bytes()
    (hot / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (hot / "zero.jpg").write_bytes(b"")
    (hot / "notes.jpg").write_text("this is not a picture\n")
    (other / "bomb.png").write_bytes(png_claiming(30000, 30000))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(other / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(other / "sixteen.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).convert("P").save(other / "palette.png")
    Image.new("RGBA", (30, 30), (200, 10, 10, 100)).save(other / "alpha.png")
    Image.new("LA", (30, 30), (90, 50)).save(other / "gray_alpha.png")
    (other / "README.txt").write_text("not an image extension: ImageFolder ignores it")
    (other / ".DS_Store").write_bytes(b"\0\1\2")
    os.symlink(other, other / "loop")  # a directory that contains itself
    with open(os.fsencode(other) + b"/caf\xe9.jpg", "wb") as f:  # a Latin-1 file name, not UTF-8
        f.write(sorted(other.glob("*.jpg"))[0].read_bytes())
    return root


def test_every_kind_of_bad_file_is_used_or_skipped_and_counted(messy_tree, tmp_path):
    d = config.Data(root=str(messy_tree), image_size=16, channels=1, cache_dir=str(tmp_path / "c"), workers=2)
    classes, split, skipped = data.load_folder(messy_tree, d, progress=False)
    names = sorted(os.path.basename(p) for p in skipped)
    assert names == ["bomb.png", "notes.jpg", "truncated.jpg", "zero.jpg"]
    used = {os.path.basename(p): i for i, p in enumerate(split.paths)}
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "gray_alpha.png"):
        assert name in used
    assert (
        len(split) == 90 + 6
    )  # the good set, 5 odd-but-valid images and the non-UTF-8 name, each once despite the loop
    image = lambda name: split.batch(torch.tensor([used[name]]))[0]  # noqa: E731
    assert int(image("sixteen.png").float().mean()) == 40000 >> 8  # 16-bit: the top 8 bits, not clipped to white
    assert not any("README" in p or "DS_Store" in p for p in split.paths)
    again = data.load_folder(messy_tree, d, progress=False)  # from the cache entry now: the same files, skipped too
    assert again[2] == skipped and again[1].paths == split.paths


def test_a_messy_tree_trains_and_says_what_it_skipped(messy_tree, tmp_path, capfd):
    args = ["--no-progress", f"data.root={messy_tree}", "data.image_size=16", f"data.cache_dir={tmp_path}/c"]
    args += [f"log.dir={tmp_path}/runs", "train.epochs=1", "model.hidden=[4]", "optim.lr=0.05", "optim.momentum=0"]
    r = in_process(train.main, [*args, "device=cpu"], capfd)  # train's real command line: test_resume.py
    assert r.returncode == 0, r.stderr
    assert "warning: skipped 4 files that are not decodable images" in r.stderr and "Traceback" not in r.stderr


def test_a_class_left_empty_stops_with_a_message(tmp_path, tiny_tree):
    root = tmp_path / "t"
    shutil.copytree(tiny_tree / "train", root)
    for p in (root / "hot_dog").iterdir():
        p.write_bytes(b"broken")
    d = config.Data(root=str(root), image_size=16, cache_dir=str(tmp_path / "c"), workers=1)
    with pytest.raises(UserError, match="hot_dog .* hold no decodable images"):
        data.load_dataset(d, 0, progress=False)
    fresh = tmp_path / "fresh"
    shutil.copytree(tiny_tree / "train", fresh)
    (fresh / "pizza").mkdir()  # an empty class folder
    with pytest.raises(UserError, match="pizza .* hold no decodable images"):
        data.load_dataset(
            config.Data(root=str(fresh), image_size=16, cache_dir=str(tmp_path / "c"), workers=1), 0, progress=False
        )


def test_a_crash_mid_write_leaves_the_old_file(tmp_path):
    from hotdog_torch.files import atomic_write, atomic_write_text

    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def crash(f):
        f.write(b"half of the new")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---------------------------------------------------------------- checkpoints


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, small_tree):
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = config.from_dict(
        {
            "data": {"root": str(small_tree), "image_size": 32, "cache_dir": str(tmp / "c"), "workers": 1},
            "model": {"hidden": [8]},
            "optim": {"lr": 0.05, "momentum": 0.0},
            "train": {"epochs": 1},
            "log": {"dir": str(tmp / "runs"), "run_name": "r"},
            "device": "cpu",
        }
    )
    return train.run(cfg, progress=False) / "checkpoints" / "last.pt"


def test_checkpoints_load_with_weights_only(good_checkpoint, tmp_path):
    ckpt = checkpoint.load(good_checkpoint)
    assert ckpt["format"] == checkpoint.FORMAT
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": Payload()}, evil)
    with pytest.raises(UserError, match="other than weights and plain data.*GLOBAL posix.system"):
        checkpoint.load(evil)


def test_damaged_and_foreign_checkpoints_are_refused_in_one_sentence(good_checkpoint, tmp_path):
    raw = good_checkpoint.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 3],
        "garbage.pt": os.urandom(4096),
        "empty.pt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match="damaged or not a hotdog_torch checkpoint"):
            checkpoint.load(tmp_path / name)
    old = checkpoint.load(good_checkpoint)
    old["format"] = 99
    torch.save(old, tmp_path / "future.pt")
    with pytest.raises(UserError, match="format version 99"):
        checkpoint.load(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a hotdog_torch checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_resume_from_a_corrupt_checkpoint_exits_2(good_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(good_checkpoint.parent.parent, run_dir)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"PK\3\4 not really")
    code = train.main(["--resume", str(run_dir)])  # in this process: the real command line is test_config's
    r = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: checkpoint {run_dir}/checkpoints/last.pt is damaged or not a hotdog_torch checkpoint"
    ]


def test_a_dangling_link_is_skipped_and_a_hard_link_counts_once(tmp_path, tiny_tree):
    root = tmp_path / "links"
    shutil.copytree(tiny_tree / "train", root)
    os.symlink(tmp_path / "gone.jpg", root / "hot_dog" / "dangling.jpg")
    first = sorted((root / "not_hot_dog").glob("*.jpg"))[0]
    os.link(first, root / "not_hot_dog" / "zz_hard_link.jpg")
    d = config.Data(root=str(root), image_size=16, channels=1, cache_dir=str(tmp_path / "c"), workers=1)
    _, split, skipped = data.load_folder(root, d, progress=False)
    assert [os.path.basename(p) for p in skipped] == ["dangling.jpg"]
    assert len(split) == 90 and not any(p.endswith("zz_hard_link.jpg") for p in split.paths)


@pytest.mark.parametrize(
    "command, args",
    [
        ("train", ["--config", "MISSING", "model.hidden=[8]", "--no-progress", "train.epochs=2"]),
        ("lr_find", ["--config", "MISSING", "model.hidden=[8]", "--steps", "5", "train.epochs=2"]),
        ("baselines", ["--config", "MISSING", "model.hidden=[8]", "--log-dir", "runs", "train.epochs=2"]),
        ("predict", ["--checkpoint", "MISSING", "a.jpg", "--json", "b.jpg"]),
    ],
)
def test_arguments_after_a_flag_still_reach_the_command(command, args, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    main = importlib.import_module(f"hotdog_torch.{command}").main
    assert main([missing if a == "MISSING" else a for a in args]) == 2  # the missing file, not "unrecognized arguments"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err


def emptied(tiny_tree, tmp_path, split, leave=None):
    """A copy of tiny_tree's train/ (and test/) with split/'s class folders there but empty, or holding only the
    file `leave` (not an image, by its bytes) in each."""
    root = tmp_path / "tree"
    shutil.copytree(tiny_tree, root)
    for cls in ("hot_dog", "not_hot_dog"):
        folder = root / split / cls
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if leave:
            (folder / leave).write_text("not a picture\n")
    return root


@pytest.mark.parametrize("split, leave", [("val", None), ("test", None), ("val", "notes.jpg")])
def test_an_empty_val_or_test_folder_is_refused_before_anything_is_written(tiny_tree, tmp_path, capfd, split, leave):
    """An empty validation (or test) set is a mistake, as in Keras or Lightning: one sentence naming the folder,
    exit 2, no run folder (it trained on with `val accuracy nan%` every epoch)."""
    root = emptied(tiny_tree, tmp_path, split, leave)
    args = ["--no-progress", f"data.root={root}", "data.image_size=16", f"data.cache_dir={tmp_path}/c"]
    args += [f"log.dir={tmp_path}/runs", "train.epochs=1", "model.hidden=[4]", "data.workers=1"]
    r = in_process(train.main, args, capfd)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{root / split}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_cache_dir_that_cannot_be_written_is_one_sentence_before_any_decode(tiny_tree, tmp_path, capfd):
    """An existing data.cache_dir nobody may write in: /proc refuses a new file to root too (a chmod'ed folder
    does not: tests and CI run as root), and it exists, so only the first write can tell."""
    args = ["--no-progress", f"data.root={tiny_tree}", "data.image_size=16", "data.cache_dir=/proc"]
    args += [f"log.dir={tmp_path}/runs", "train.epochs=1", "model.hidden=[4]", "data.workers=1"]
    r = in_process(train.main, args, capfd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "/proc" in r.stderr and "data.cache_dir" in r.stderr and not (tmp_path / "runs").exists()
