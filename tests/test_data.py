"""Data: ImageFolder discovery, the decode-once cache and its invalidation, splits, normalisation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config_file
from PIL import Image

from hotdog_torch import cache, config, data, drawings, images
from hotdog_torch.config import UserError

REPO = Path(__file__).resolve().parents[1]


def settings(tmp_path, **kw):
    return config.Data(**{"cache_dir": str(tmp_path / "cache"), "image_size": 32, "channels": 1, "workers": 1, **kw})


def fresh_decode(split, d):
    return torch.from_numpy(np.stack([images.decode(p, d.image_size, d.channels) for p in split.paths]))


def images_of(split):
    return split.batch(torch.arange(len(split)))


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_cache_equals_a_fresh_decode_and_is_hit_the_second_time(tmp_path, tiny_tree, monkeypatch):
    d = settings(tmp_path)
    classes, first, skipped = data.load_folder(tiny_tree / "train", d, progress=False)
    assert classes == ["hot_dog", "not_hot_dog"] and skipped == []
    assert first.images.dtype == torch.uint8 and images_of(first).shape == (90, 1, 32, 32)
    assert torch.equal(images_of(first), fresh_decode(first, d))
    assert torch.bincount(first.labels).tolist() == [30, 60]

    def no_decoding(*a, **k):
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(cache, "decode_all", no_decoding)
    _, second, _ = data.load_folder(tiny_tree / "train", d, progress=False)
    assert torch.equal(images_of(first), images_of(second)) and torch.equal(first.labels, second.labels)
    assert second.paths == first.paths


def test_image_settings_are_part_of_the_key(tmp_path, tiny_tree):
    _, gray, _ = data.load_folder(tiny_tree / "test", settings(tmp_path), progress=False)
    _, rgb, _ = data.load_folder(tiny_tree / "test", settings(tmp_path, channels=3, image_size=16), progress=False)
    assert images_of(gray).shape[1:] == (1, 32, 32) and images_of(rgb).shape[1:] == (3, 16, 16)


def test_a_changed_added_or_removed_file_invalidates_the_cache(tmp_path, tiny_tree):
    root = copy_tree(tiny_tree / "test", tmp_path / "tree")
    d = settings(tmp_path)
    _, before, _ = data.load_folder(root, d, progress=False)

    changed = root / "hot_dog" / "hot_dog_00000.jpg"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(changed)
    _, after, _ = data.load_folder(root, d, progress=False)
    i = after.paths.index(str(changed))
    assert images_of(after)[i].min() > 240  # the new white picture, not the cached hot dog
    assert not torch.equal(images_of(before)[i], images_of(after)[i])
    assert torch.equal(images_of(after), fresh_decode(after, d))

    Image.new("RGB", (40, 40), (0, 0, 0)).save(root / "not_hot_dog" / "new.png")
    _, added, _ = data.load_folder(root, d, progress=False)
    assert len(added) == len(before) + 1

    os.remove(root / "not_hot_dog" / "new.png")
    (root / "hot_dog" / "hot_dog_00001.jpg").unlink()
    _, removed, _ = data.load_folder(root, d, progress=False)
    assert len(removed) == len(before) - 1
    assert torch.equal(images_of(removed), fresh_decode(removed, d))


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, tiny_tree):
    d = settings(tmp_path)
    _, first, _ = data.load_folder(tiny_tree / "test", d, progress=False)
    for f in (tmp_path / "cache").glob("*.npy"):
        f.write_bytes(f.read_bytes()[:100])  # truncated, as a crash or a full disk might leave it
    _, again, _ = data.load_folder(tiny_tree / "test", d, progress=False)
    assert torch.equal(images_of(first), images_of(again))
    for f in (tmp_path / "cache").glob("*.json"):
        f.write_text("{not json")
    _, third, _ = data.load_folder(tiny_tree / "test", d, progress=False)
    assert torch.equal(images_of(first), images_of(third))
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary file left behind


def test_a_changed_folders_older_entry_is_evicted_and_nothing_else(tmp_path, tiny_tree):
    """A new entry of a folder takes the folder's older entry at the same image settings away (its files changed:
    it is never read again); the folder at other settings, other folders' entries and files that are not the
    cache's own stay."""
    root, cache_dir, d = copy_tree(tiny_tree / "test", tmp_path / "tree"), tmp_path / "cache", settings(tmp_path)
    old = cache.cache_key(cache.scan(root)[1], d)
    data.load_folder(root, d, progress=False)
    data.load_folder(root, settings(tmp_path, image_size=16), progress=False)
    data.load_folder(tiny_tree / "train", d, progress=False)
    (cache_dir / "notes.txt").write_text("mine")
    np.save(cache_dir / f"{'0' * 32}.npy", np.zeros(3))  # named as an entry is, but no entry's .json says it is one
    before = {p.name for p in cache_dir.iterdir()}
    (root / "hot_dog" / "hot_dog_00001.jpg").unlink()
    _, again, _ = data.load_folder(root, d, progress=False)
    new = cache.cache_key(cache.scan(root)[1], d)
    after = {p.name for p in cache_dir.iterdir()}
    assert before - after == {f"{old}.npy", f"{old}.json", f"{old}.lock"}
    assert after - before == {f"{new}.npy", f"{new}.json", f"{new}.lock"}
    assert torch.equal(images_of(again), fresh_decode(again, d))


def test_splits_layout_uses_train_and_test_and_a_stratified_val(tmp_path, tiny_tree):
    ds = data.load_dataset(settings(tmp_path, root=str(tiny_tree), val_fraction=0.2), seed=0, progress=False)
    assert ds.layout == "splits" and ds.classes == ["hot_dog", "not_hot_dog"]
    assert torch.bincount(ds.val.labels).tolist() == [6, 12]  # round(0.2 * 30), round(0.2 * 60)
    assert torch.bincount(ds.train.labels).tolist() == [24, 48]
    assert not set(ds.val.paths) & set(ds.train.paths)
    assert len(ds.test) == 30
    again = data.load_dataset(settings(tmp_path, root=str(tiny_tree), val_fraction=0.2), seed=0, progress=False)
    assert again.val.paths == ds.val.paths  # the split is seeded
    other = data.load_dataset(settings(tmp_path, root=str(tiny_tree), val_fraction=0.2), seed=1, progress=False)
    assert other.val.paths != ds.val.paths


def test_class_folders_layout_and_any_number_of_classes(tmp_path, tiny_tree):
    root = tmp_path / "three"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
    for i, p in enumerate(sorted((tiny_tree / "train" / "not_hot_dog").iterdir())[:30]):
        shutil.copy(p, root / "abc"[i % 3] / p.name)
    ds = data.load_dataset(settings(tmp_path, root=str(root), val_fraction=0.3), seed=0, progress=False)
    assert ds.layout == "folders" and ds.classes == ["a", "b", "c"] and ds.test is None
    assert torch.bincount(ds.val.labels).tolist() == [3, 3, 3]


def test_an_explicit_val_folder_is_used_as_is(tmp_path, tiny_tree):
    root = copy_tree(tiny_tree, tmp_path / "t")
    shutil.copytree(root / "test", root / "val")
    ds = data.load_dataset(settings(tmp_path, root=str(root)), seed=0, progress=False)
    assert len(ds.train) == 90 and len(ds.val) == 30


def test_mismatched_classes_between_splits(tmp_path, tiny_tree):
    root = copy_tree(tiny_tree, tmp_path / "t")
    (root / "test" / "not_hot_dog").rename(root / "test" / "pizza")
    with pytest.raises(UserError, match="must match"):
        data.load_dataset(settings(tmp_path, root=str(root)), seed=0, progress=False)


def test_normalise_gives_zero_mean_unit_std():
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=g)
    index = torch.randperm(60, generator=g)[:50]  # a split is a subset of the pool's rows
    split = data.Split(pool, index, torch.zeros(50, dtype=torch.int64), [""] * 50)
    mean, std = data.normalisation(split, chunk=7)
    images = pool[index]
    x = images.double() / 255
    assert torch.allclose(mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False), atol=1e-5)
    z = data.normalise(images, mean, std)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_decode_brings_any_mode_and_size_to_the_input(tmp_path):
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (50, 20), (255, 0, 0, 128)).save(rgba)
    pal = tmp_path / "p.png"
    Image.new("RGB", (7, 9), (0, 0, 255)).convert("P").save(pal)
    for p in (rgba, pal):
        assert images.decode(p, 16, 1).shape == (1, 16, 16)
        assert images.decode(p, 16, 3).shape == (3, 16, 16)
    assert tuple(images.decode(rgba, 16, 3)[:, 0, 0]) == (255, 0, 0)


def test_large_jpegs_decode_in_draft_mode(tmp_path):

    big = tmp_path / "big.jpg"
    drawings.draw_image("hot_dog", np.random.default_rng(0), size=512).save(big, quality=92)
    with images.open_scaled(big, 128, "RGB") as im:
        assert im.size == (128, 128)  # libjpeg decoded at 1/4 scale
    with images.open_scaled(big, 200, "RGB") as im:
        assert im.size == (256, 256)  # the smallest scale still >= the target
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    with images.open_scaled(png, 128, "RGB") as im:
        assert im.size == (512, 512)  # not a JPEG: no draft
    fast, full = images.decode(big, 128, 3).astype(int), images.decode(png, 128, 3).astype(int)
    assert np.abs(fast - full).mean() < 4  # the same picture, within JPEG and scaling error


def test_parallel_decode_equals_one_process_and_skips_bad_files(tmp_path, tiny_tree):
    root = copy_tree(tiny_tree / "train", tmp_path / "t")
    (root / "hot_dog" / "notes.jpg").write_text("not a picture")
    (root / "not_hot_dog" / "empty.png").write_bytes(b"")
    _, one, skipped = data.load_folder(
        root, settings(tmp_path, workers=1, cache_dir=str(tmp_path / "c1")), progress=False
    )
    _, two, skipped2 = data.load_folder(
        root, settings(tmp_path, workers=2, cache_dir=str(tmp_path / "c2")), progress=False
    )
    assert sorted(os.path.basename(p) for p in skipped) == ["empty.png", "notes.jpg"] and skipped2 == skipped
    assert len(one) == 90 and one.paths == two.paths
    assert torch.equal(images_of(one), images_of(two))


def test_the_folder_scan_follows_torchvisions_imagefolder(tmp_path, tiny_tree):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = copy_tree(tiny_tree / "train", tmp_path / "tree")
    (root / "hot_dog" / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(next((root / "hot_dog").glob("*.jpg")), root / "hot_dog" / "nested" / "deeper" / "B.JPEG")
    (root / "hot_dog" / "notes.txt").write_text("not an image")
    (root / "not_hot_dog" / ".DS_Store").write_bytes(b"\0")
    (root / "z_empty_class").mkdir()
    os.symlink(root / "hot_dog" / "nested", root / "not_hot_dog" / "linked")
    (root / "hot_dog" / "iphone.HEIC").write_bytes(b"")  # the phones' formats too (images.PHOTO_EXTENSIONS)
    ours = images.IMG_EXTENSIONS  # torchvision's and the phones'
    reference = ImageFolder(str(root), loader=str, is_valid_file=lambda p: p.lower().endswith(ours), allow_empty=True)
    classes, samples = data.image_folder(root)
    assert classes == reference.classes and samples == reference.samples
    assert images.TORCHVISION_EXTENSIONS == IMG_EXTENSIONS and any(p.endswith(".HEIC") for p, _ in samples)
    assert any(p.endswith("B.JPEG") for p, _ in samples) and not any(p.endswith(".txt") for p, _ in samples)


@pytest.mark.parametrize("bug", [TypeError, IndexError, ZeroDivisionError, RecursionError, ValueError])
def test_a_bug_in_decoding_raises_instead_of_skipping_every_image(tmp_path, tiny_tree, monkeypatch, bug):
    def broken(*a, **k):  # our code failing, not Pillow reading a bad file
        raise bug("a bug in hotdog_torch, not a bad image")

    monkeypatch.setattr(images, "open_scaled", broken)
    with pytest.raises(bug, match="a bug in hotdog_torch"):
        data.load_folder(tiny_tree / "test", settings(tmp_path), progress=False)


def test_what_pillow_raises_for_a_bad_file_is_a_decode_error(tmp_path, tiny_tree):
    good = sorted((tiny_tree / "test" / "hot_dog").glob("*.jpg"))[0].read_bytes()
    for name, blob in [("half.jpg", good[: len(good) // 2]), ("text.png", b"no"), ("zero.webp", b"")]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(images.DECODE_ERRORS):
            images.decode(tmp_path / name, 16, 1)


# ---------------------------------------------------------------- copies on the device


class Moves(torch.overrides.TorchFunctionMode):
    """Counts Tensor.to calls on uint8 image pools (4-D), whatever device they go to."""

    def __init__(self):
        super().__init__()
        self.pools = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and args[0].dtype == torch.uint8 and args[0].dim() == 4:
            self.pools.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))


def test_each_pool_is_moved_to_the_device_once(tmp_path, tiny_tree):
    ds = data.load_dataset(settings(tmp_path, root=str(tiny_tree)), seed=0, progress=False)
    assert ds.train.images is ds.val.images  # train/ split into train and val: one pool; test/ another
    with Moves() as moves:
        moved = ds.to(torch.device("meta"))  # a real move of the tensors, with no memory behind it
    assert sorted(moves.pools) == sorted({ds.train.images.data_ptr(), ds.test.images.data_ptr()})
    assert moved.train.images is moved.val.images and moved.train.images.device.type == "meta"


class LargestImages(torch.utils._python_dispatch.TorchDispatchMode):
    """The most uint8 numbers any one operation made (an image gather's size)."""

    most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.uint8:
                LargestImages.most = max(LargestImages.most, t.numel())
        return out


def test_an_epoch_makes_no_copy_of_its_images(tiny_tree, make_config, monkeypatch):
    from hotdog_torch import loop, train

    real = loop.train_one_epoch

    def watched(*a, **k):
        with LargestImages():
            return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", watched)
    cfg = make_config(tiny_tree, "train.epochs=2", "optim.batch_size=16")
    train.run(cfg, progress=False)
    image = cfg.data.channels * cfg.data.image_size**2
    assert 0 < LargestImages.most <= 16 * image  # a batch's rows at a time, never the epoch's 72 images at once


def test_the_training_command_starts_decoding_before_it_imports_torch(tmp_path, tiny_tree, monkeypatch):
    """`python -m hotdog_torch.train` decodes its folders in a process of its own while torch loads (cache.prefetch):
    the run then finds every entry in the cache."""
    d = settings(tmp_path, root=str(tiny_tree))
    argv = ["--config", "configs/hotdog.yaml", f"data.root={tiny_tree}", f"data.cache_dir={d.cache_dir}"]
    argv += ["data.image_size=32", "data.workers=1", "--no-progress"]
    code = f"""import sys
sys.orig_argv = [sys.executable, "-m", "hotdog_torch.train", *{argv!r}]
import hotdog_torch, hotdog_torch.cache as cache
assert "torch" not in sys.modules and len(cache._PREFETCH) == 1
sys.exit(cache._PREFETCH[0].wait())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    def no_decoding(*a, **k):
        raise AssertionError("the prefetch decoded every folder already")

    monkeypatch.setattr(cache, "decode_all", no_decoding)
    ds = data.load_dataset(d, seed=0, progress=False)
    assert len(ds.train) + len(ds.val) == 90 and len(ds.test) == 30


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75, 0.9])
def test_the_split_keeps_every_class_in_training_and_in_validation(fraction):
    labels = torch.tensor([0, 0, 0] + [1] * 2 + [2] * 40)  # small classes: round(fraction * n) may be 0 or n
    train, val = data.stratified_split(labels, fraction, seed=0)
    assert set(labels[train].tolist()) == {0, 1, 2} and set(labels[val].tolist()) == {0, 1, 2}
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))
    assert len(val[labels[val] == 2]) == round(fraction * 40)  # a class of many images: the fraction, as before


@pytest.mark.parametrize("form", ["--config=FILE", "--resume=DIR", "--conf FILE"])
def test_the_prefetch_reads_the_command_line_as_the_command_does(tmp_path, tiny_tree, form):
    """The `=` forms and argparse's abbreviations name the run's config to the prefetch too (it read only
    `--config FILE`, and otherwise decoded the default config's data/hotdog-synth at 128 px beside the run)."""
    cfg = config_file(tiny_tree, tmp_path, "run")
    (tmp_path / "runs" / "run").mkdir(parents=True)
    shutil.copy(cfg, tmp_path / "runs" / "run" / "config.yaml")
    argv = {"--config=FILE": [f"--config={cfg}"], "--resume=DIR": [f"--resume={tmp_path / 'runs' / 'run'}"]}
    argv = argv.get(form, ["--conf", str(cfg)]) + ["--no-progress"]
    code = f"""import sys
sys.orig_argv = [sys.executable, "-m", "hotdog_torch.train", *{argv!r}]
import hotdog_torch, hotdog_torch.cache as cache
assert len(cache._PREFETCH) == 1, "no prefetch started"
sys.exit(cache._PREFETCH[0].wait())
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # run where the default config's data folder is not
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train/ and test/ of the run's own set


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc")
def test_the_prefetch_leaves_a_complete_entry_on_disk(tmp_path, tiny_tree):
    """With the cache complete, the prefetch reads the entries' headers, not their images (it loaded each whole,
    beside the run's own copy: twice the memory, and data.memory_budget defeated)."""
    d = settings(tmp_path, root=str(tiny_tree), image_size=320, channels=3)
    for folder in cache.folders(d).values():
        cache.entry(folder, d, progress=False, in_memory=False)
    code = """import json, re, sys
from hotdog_torch import cache
peak = lambda: int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
before = peak()
cache.decode_folders(cache.Data(**json.loads(sys.argv[1])))
print(peak() - before)
"""
    keys = dict(root=d.root, image_size=d.image_size, channels=d.channels, cache_dir=d.cache_dir, workers=1)
    command = [sys.executable, "-c", code, json.dumps(keys)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout)  # the peak resident memory (VmHWM: ru_maxrss would carry pytest's over the exec)
    assert grown < data.decoded_bytes(120, d) / 4, f"the prefetch's peak memory grew by {grown / 2**20:.0f} MiB"
