"""lr_find: the exponential rise, fastai's smoothing, stop and 'valley', a copy trained with every optimiser on
every path, and everything it was given left as it was."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_doc
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import checkpoint, config, data, lr_find
from hotdog_torch.config import UserError
from hotdog_torch.model import build_model

REPO = Path(__file__).resolve().parents[1]
DIVERGING = ["model.activation=relu", "model.hidden=[64,64]", "optim.cost=cross_entropy"]  # unbounded, it blows up


def test_the_lr_rises_by_the_same_ratio_every_step_from_min_to_max():
    lrs = lr_find.rates(1e-7, 10.0, 100)
    assert len(lrs) == 100 and lrs[0] == 1e-7 and lrs[-1] == pytest.approx(10.0, rel=1e-12)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, (10.0 / 1e-7) ** (1 / 99), rtol=1e-12)


def test_the_smoothing_is_fastais_debiased_moving_average():
    assert lr_find.smoothed([0.3] * 50) == pytest.approx([0.3] * 50, rel=1e-12)  # debiased: no ramp up from 0
    a1 = 0.02 * 1.0
    a2 = 0.98 * a1 + 0.02 * 2.0
    a3 = 0.98 * a2 + 0.02 * 4.0
    expected = [a1 / (1 - 0.98), a2 / (1 - 0.98**2), a3 / (1 - 0.98**3)]
    assert lr_find.smoothed([1.0, 2.0, 4.0]) == pytest.approx(expected, rel=1e-12)


def test_valley_is_halfway_down_the_longest_descent():
    # 10 flat points, a descent over points 10..40, a bump, a short dip, then the rise: the descent's middle wins,
    # not the lowest point (70) nor the steepest
    curve = [1.0] * 10 + [1.0 - 0.02 * i for i in range(31)] + [0.6, 0.7, 0.65] + [0.5 - 0.1 * i for i in range(4)]
    curve += [0.3 + 0.2 * i for i in range(22)]
    i = lr_find.valley(curve)
    assert 20 <= i <= 30, i
    assert lr_find.valley([1.0]) is None


@pytest.mark.parametrize(
    "curve, at",
    [
        ([2.0, 1.0, 1.5, 1.8, 2.5], (0, 1)),  # a short test (--steps 5): the descent is its first two points
        ([1.0, 1.2, 1.5, 1.8, 2.5], (0,)),  # no descent at all: the first point, never the last (largest) lr
        ([3.0, 2.0, 1.0, 0.8, 0.7, 0.9], (1, 2)),  # falling from the first point on
    ],
)
def test_valley_never_suggests_past_the_descent_on_a_short_curve(curve, at):
    assert lr_find.valley(curve) in at


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def rng_states() -> dict:
    """Every random generator's state, as plain comparable values."""
    kind, keys, *rest = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": (kind, keys.tolist(), *rest),
        "python": random.getstate(),
        "cuda_initialised": torch.cuda.is_initialized(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
    }


@pytest.mark.parametrize(
    "overrides, given",
    [
        (["model.dropout=0.2"], True),  # fused SGD with momentum, dropout drawing from torch's generator
        (["optim.name=adamw", "optim.momentum=0", "optim.fused=false", "optim.class_weights=balanced"], False),
    ],
    ids=["fused-sgd-momentum-dropout-given-model", "autograd-adamw-fresh-model"],
)
def test_it_trains_a_copy_and_leaves_model_config_cache_and_random_state_as_they_were(
    small_tree, make_config, tmp_path, overrides, given
):
    cfg, threads = make_config(small_tree, *overrides), torch.get_num_threads()
    data.prepare(cfg.data, cfg.seed, progress=False)  # the cache as a run before left it
    torch.manual_seed(123)
    model = build_model(32 * 32, cfg.model.hidden, 2, cfg.model.activation, cfg.model.dropout) if given else None
    if given:
        model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()} if given else {}
    np.random.seed(7)
    random.seed(7)
    np.random.rand(3), random.random(), torch.rand(3)  # somewhere along each generator, not at a seed
    states, doc, cache, tree = rng_states(), config.to_dict(cfg), snapshot(tmp_path / "cache"), snapshot(small_tree)
    torch.set_num_threads(2)  # the caller's (a tiny network's run sets one)
    try:
        f = lr_find.find(cfg, 1e-4, 10.0, 30, model)
        assert torch.get_num_threads() == 2  # the caller's threads, as they were
    finally:
        torch.set_num_threads(threads)

    assert len(f.lrs) >= 10 and max(f.costs) - min(f.costs) > 1e-3  # the copy did train, and moved
    assert rng_states() == states
    assert config.to_dict(cfg) == doc
    assert snapshot(tmp_path / "cache") == cache and snapshot(small_tree) == tree
    assert not (tmp_path / "runs").exists()  # find() writes nothing; main() writes its --out
    if given:
        assert set(model.state_dict()) == set(before)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert not model.training and all(p.grad is None for p in model.parameters())


OPTIMISERS = {
    "sgd": ["optim.momentum=0"],
    "sgd-momentum": ["optim.momentum=0.9"],
    "adamw": ["optim.name=adamw", "optim.momentum=0", "optim.weight_decay=0.01"],
    "adam": ["optim.name=adam", "optim.momentum=0"],
}


@pytest.mark.parametrize("name", OPTIMISERS)
def test_every_optimiser_on_either_path_steps_at_the_finders_lr_not_the_configs(small_tree, make_config, name):
    fused = lr_find.find(make_config(small_tree, *OPTIMISERS[name], "optim.lr=0.5"), 1e-3, 1.0, 20)
    autograd = lr_find.find(
        make_config(small_tree, *OPTIMISERS[name], "optim.lr=1e-5", "optim.fused=false"), 1e-3, 1.0, 20
    )
    assert fused.step_name.startswith("fused") and autograd.step_name.startswith("autograd")
    assert len(fused.costs) == len(autograd.costs) == 20
    assert np.allclose(fused.costs, autograd.costs, rtol=1e-4, atol=1e-6)  # the same lr each step, on each path
    assert abs(fused.costs[-1] - fused.costs[0]) > 1e-3


def test_the_lr_changes_at_every_step(small_tree, make_config):
    cfg = make_config(small_tree, "optim.momentum=0")
    rising, flat = lr_find.find(cfg, 1e-3, 3.0, 20), lr_find.find(cfg, 1e-3, 1.001e-3, 20)
    assert rising.costs[0] == flat.costs[0]  # the same first batch and first lr
    assert not np.allclose(rising.costs[-5:], flat.costs[-5:], rtol=1e-3)


def test_a_diverging_config_stops_early_and_says_where(small_tree, make_config, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() sets its own
    cfg = make_config(small_tree, *DIVERGING)
    path = Path(cfg.log.dir).parent / "diverging.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    assert lr_find.main(["--config", str(path), "--min-lr", "1e-4", "--steps", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    (run,) = Path(cfg.log.dir).glob("lr_find-diverging-*")
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("lr_find/lr")]
    costs = [e.value for e in acc.Scalars("lr_find/cost")]
    smooth = lr_find.smoothed(costs)
    assert 5 < len(lrs) < 40 and len(costs) == len(lrs) and acc.Tags()["images"] == ["lr_find"]
    assert smooth[-1] > 4 * min(smooth) and all(s <= 4 * min(smooth[: i + 1]) for i, s in enumerate(smooth[:-1]))
    assert f"stopped early at lr {lrs[-1]:.3g}, step {len(lrs)} of 40, because the cost blew up" in out[0]
    suggested = float(out[0].split("suggested lr ")[1].split()[0])
    assert lrs[0] < suggested < lrs[-1] and "valley" in out[0]
    picture = Image.open(run / "lr_find.png")
    assert picture.format == "PNG" and picture.width >= 400
    assert lr_find.out_dir(str(run), cfg, "x") == run.with_name(run.name + "-2")  # never an existing folder


def test_a_nan_cost_stops_it_at_once_and_is_left_out_of_the_curve(small_tree, make_config, tmp_path):
    f = lr_find.find(make_config(small_tree, "model.activation=relu"), 1e-3, 1e30, 30)
    assert len(f.lrs) < 30 and math.isnan(f.costs[-1]) and all(math.isfinite(c) for c in f.costs[:-1])
    assert f.blew_up == "the cost turned nan" and len(f.smooth) == len(f.costs) - 1
    assert f.lr is not None and math.isfinite(f.lr) and "stopped early at lr" in lr_find.line(f, tmp_path)
    lr_find.write(f, tmp_path)
    assert Image.open(tmp_path / "lr_find.png").format == "PNG"


def test_the_checkpoint_is_only_read_and_must_be_the_configs_network(small_tree, make_config, tmp_path, capsys):
    cfg = make_config(small_tree)
    model = build_model(32 * 32, cfg.model.hidden, 2, cfg.model.activation)
    meta = checkpoint.meta(config.to_dict(cfg), ["hot_dog", "not_hot_dog"], [0.5], [0.25])
    ckpt = tmp_path / "best.pt"
    checkpoint.save(ckpt, model, None, meta, {}, checkpoint.RunState(), resumable=False)
    seen = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    common = ["--config", str(path), "--checkpoint", str(ckpt), "--steps", "10", "--out", str(tmp_path / "found")]
    assert lr_find.main(common) == 0
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == seen and (tmp_path / "found" / "lr_find.png").is_file()
    assert lr_find.main([*common, "model.hidden=[8]"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: the network given (Flatten -> Linear(16) -> Sigmoid -> Linear(2) -> Sigmoid)" in err
        and not (tmp_path / "found-2").exists()
    )


@pytest.mark.parametrize(
    "args, says, own_process",
    [
        (["--min-lr", "1", "--max-lr", "1"], "--max-lr must be above --min-lr", True),  # as a user runs the command
        (["--steps", "1"], "--steps must be at least 2", False),  # the others call its main() here: a start-up less
        (["optim.name=adamx"], "adamw", False),  # the config's did-you-mean
        (
            ["optim.name=random_search"],
            "must be one of 'sgd', 'adamw', 'adam'",
            False,
        ),  # the shot in the dark: search.py
    ],
    ids=["min-not-below-max", "one-step", "unknown-optimiser", "random-search"],
)
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(small_tree, tmp_path, capsys, args, says, own_process):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_doc(small_tree, tmp_path)))
    if own_process:
        cmd = [sys.executable, "-m", "hotdog_torch.lr_find", "--config", str(path), *args]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    else:
        code = lr_find.main(["--config", str(path), *args])
        r = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr
    assert r.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no cache, no run


@pytest.mark.parametrize("out", ["out-under-a-file", "log-dir-under-a-file"])
def test_an_out_it_cannot_write_is_one_sentence_before_the_test(small_tree, tmp_path, capsys, out):
    """--out (or log.dir, where the default --out goes) under a regular file: no one may write there, root neither
    (a chmod'ed folder would not stop root, who runs the tests in CI).  It said so in a traceback, after the test."""
    (tmp_path / "file").write_text("a regular file\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_doc(small_tree, tmp_path)))
    where = ["--out", str(tmp_path / "file" / "found")] if out.startswith("out") else [f"log.dir={tmp_path}/file/runs"]
    code = lr_find.main(["--config", str(path), "--steps", "5", *where])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'file'}" in err and not (tmp_path / "cache").exists()  # refused before any decode


def test_a_test_that_fails_leaves_no_folder_made_for_it(small_tree, tmp_path, capsys):
    """The results' folder is made before the test; a test refused on its way (here: its cache cannot be written)
    takes it away again, and the folders made above it, and nothing else."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_doc(small_tree, tmp_path)))
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file\n")
    out = tmp_path / "kept" / "made" / "above" / "found"
    code = lr_find.main(["--config", str(path), "--steps", "5", "--out", str(out), "data.cache_dir=/proc"])
    assert code == 2 and "data.cache_dir" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("low, high, steps", [(0.0, 1.0, 10), (math.nan, 1.0, 10), (1e-3, math.inf, 10)])
def test_every_range_is_checked(low, high, steps):
    with pytest.raises(UserError):
        lr_find.check(low, high, steps)


def test_it_measures_on_batches_framed_as_data_augment_frames_them(small_tree, make_config):
    """The photos recipe trains on augmented batches: the range test must see those, not the bare images.  Framings
    of zero magnitude give the bare batches back (the same order): the difference is the framing alone."""
    plain = lr_find.find(make_config(small_tree, "optim.momentum=0"), 1e-4, 1e-3, 10)
    augmented = lr_find.find(make_config(small_tree, "optim.momentum=0", "data.augment.enabled=true"), 1e-4, 1e-3, 10)
    still = ["data.augment.enabled=true", "data.augment.shift=0", "data.augment.zoom=1", "data.augment.rotate=0"]
    still += ["data.augment.flip=false", "data.augment.light=0"]
    unmoved = lr_find.find(make_config(small_tree, "optim.momentum=0", *still), 1e-4, 1e-3, 10)
    assert np.allclose(unmoved.costs, plain.costs, rtol=1e-5, atol=1e-7)
    assert not np.allclose(augmented.costs, plain.costs, rtol=1e-3, atol=1e-5)
