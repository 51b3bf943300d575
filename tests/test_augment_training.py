"""Augmented training: off is today's run bit for bit; on, every step path frames the images, a killed run
resumes bit-identical, and torchrun's processes frame their shares as one process frames the whole batch."""

from __future__ import annotations

import signal
import time

import pytest
import torch
import yaml
from conftest import config_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import close
from test_resume import assert_same_weights, start, wait_for_epoch

from hotdog_torch import augment, checkpoint, config, framing, stopping, train
from hotdog_torch.config import Augment, Train

AUGMENT = {"enabled": True, "shift": 0.15, "zoom": 1.2, "rotate": 10.0, "light": 0.2, "warmup_epochs": 2}
EPOCHS = 5


def last(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize(
    "path",
    [
        [],
        ["optim.momentum=0"],
        ["optim.momentum=0", "optim.fused_window=1"],
        ["optim.fused=false"],
        ["optim.name=adamw", "optim.momentum=0", "optim.lr=0.003", "optim.schedule=one_cycle"],
    ],
)
def test_off_is_todays_run_and_on_frames_the_images_on_every_step_path(small_tree, make_config, path):
    """enabled: false ignores the magnitudes and draws nothing (the batch order stays the same); enabled: true moves
    the weights elsewhere, from the same start, on the fused, windowed, momentum, autograd and AdamW paths alike."""
    wild = ["data.augment.shift=0.4", "data.augment.rotate=90", "data.augment.zoom=2"]
    runs = {
        name: last(train.run(make_config(small_tree, *path, *extra, "train.epochs=1", f"log.run_name={name}"), False))
        for name, extra in [("plain", []), ("unused", wild), ("framed", ["data.augment.enabled=true"])]
    }
    assert_same_weights(runs["unused"]["model"], runs["plain"]["model"])
    assert not torch.equal(runs["framed"]["model"]["1.weight"], runs["plain"]["model"]["1.weight"])
    assert all(torch.isfinite(v).all() for v in runs["framed"]["model"].values())


def test_an_augmented_run_shows_what_it_is_fed_and_how_it_copes_with_photos(small_tree, make_config):
    run_dir = train.run(make_config(small_tree, "data.augment.enabled=true", "train.epochs=2"), progress=False)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"augment/batch", "framings/val"} <= set(acc.Tags()["images"])
    kinds = {t.split("/")[1] for t in acc.Tags()["scalars"] if t.startswith("framing/")}
    assert kinds == {"as_is", *framing.KINDS}
    assert [m["augment_strength"] for m in last(run_dir)["state"]["history"]] == [1.0, 1.0]  # in every epoch's


def settings(**changes):
    return dict(data__augment=AUGMENT, optim__batch_size=8, model__hidden=[24], train__epochs=EPOCHS) | changes


def test_an_augmented_run_stopped_mid_epoch_then_killed_resumes_bit_identical(small_tree, tmp_path):
    """SIGTERM inside an epoch saves its framings as drawn; SIGKILL loses the epoch, whose framings are drawn again
    from the generator's saved state: either way the run ends where the uninterrupted one does."""
    straight = config.from_dict(yaml.safe_load(config_file(small_tree, tmp_path, "straight", **settings()).read_text()))
    reference = last(train.run(straight, progress=False))["model"]
    cfg = config_file(small_tree, tmp_path, "stopped", **settings(train__checkpoint_every_epochs=1000))
    run_dir = tmp_path / "runs" / "stopped"
    proc = start("--config", str(cfg))
    best, deadline = run_dir / "checkpoints" / "best.pt", time.time() + 120
    while not (best.exists() and checkpoint.load(best)["epoch"] >= 1):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    stopped = last(run_dir)
    progress = stopped["state"]["epoch_progress"]
    assert progress is not None and progress["framings"].shape == (240, 10)  # the epoch's framings, as drawn
    proc = start("--resume", str(run_dir), "train.checkpoint_every_epochs=1")
    wait_for_epoch(run_dir, stopped["epoch"] + 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last(run_dir)["epoch"] < EPOCHS
    assert train.main(["--no-progress", "--resume", str(run_dir)]) == 0  # the resume, in this process
    assert_same_weights(last(run_dir)["model"], reference)


@pytest.mark.torchrun("augment", **settings(optim__batch_size=15, train__epochs=2))
def test_two_processes_frame_their_shares_as_one_process_frames_the_batch(torchrun_runs):
    run = torchrun_runs["augment"]  # trained in the session's one torchrun launch (tests/conftest.py)
    one, two = (last(r)["model"] for r in (run.one, run.two))
    assert close(one, two, 3e-5)  # the tolerance of tests/test_distributed.py


def test_best_pt_is_never_an_epoch_of_the_ramp_once_one_at_full_strength_exists():
    ramp = {"val_accuracy": 0.99, "val_cost": 0.01, "augment_strength": 0.5}
    full = {"val_accuracy": 0.90, "val_cost": 0.08, "augment_strength": 1.0}
    train = Train()
    assert stopping.better(full, ramp, train) and not stopping.better(ramp, full, train)
    assert stopping.better(ramp | {"val_accuracy": 0.995}, ramp, train)  # within the ramp, as before
    assert augment.recorded(Augment(enabled=True, warmup_epochs=3), 2) == {"augment_strength": 0.5}
    assert augment.recorded(Augment(), 2) == {}  # not augmented: today's metrics


def test_an_augmented_run_on_a_one_image_class_still_trains(small_tree, tmp_path, make_config):
    import shutil

    root = tmp_path / "lonely"  # train/ and val/ folders: one hot dog to train on, the test split to validate
    shutil.copytree(small_tree / "train" / "not_hot_dog", root / "train" / "not_hot_dog")
    (root / "train" / "hot_dog").mkdir()
    shutil.copy(sorted((small_tree / "train" / "hot_dog").glob("*.jpg"))[0], root / "train" / "hot_dog")
    shutil.copytree(small_tree / "test", root / "val")
    run_dir = train.run(make_config(root, "data.augment.enabled=true", "train.epochs=2"), progress=False)
    assert all(torch.isfinite(v).all() for v in last(run_dir)["model"].values())
