"""Never lose a run: kill a real training process, resume it, and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import checkpoint, train

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 30


def write_config(small_tree, tmp_path, log__run_name, **changes):
    settings = dict(optim__batch_size=4, optim__lr=0.1, model__hidden=[24], train__epochs=EPOCHS) | changes
    return config_file(small_tree, tmp_path, log__run_name, **settings)


def train_cli(*args) -> subprocess.CompletedProcess:
    """The training command in a process of its own, run to the end."""
    command = [sys.executable, "-m", "hotdog_torch.train", "--no-progress", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "hotdog_torch.train", "--no-progress", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epoch(run_dir, epoch, proc, timeout=120):
    """Wait until last.pt holds at least this epoch (it is written atomically, so reading it is safe)."""
    deadline = time.time() + timeout
    last = run_dir / "checkpoints" / "last.pt"
    while time.time() < deadline:
        if last.exists() and checkpoint.load(last)["epoch"] >= epoch:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("training did not get that far")


def final_weights(run_dir):
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == EPOCHS and ckpt["state"]["stopped_because"] == "epochs"
    return ckpt["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def reference(small_tree, tmp_path):
    cfg = write_config(small_tree, tmp_path, log__run_name="straight")
    proc = train_cli("--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    return final_weights(tmp_path / "runs" / "straight")


def test_sigkill_mid_epoch_then_resume_is_bit_identical(small_tree, tmp_path, reference):
    cfg = write_config(small_tree, tmp_path, log__run_name="killed")
    run_dir = tmp_path / "runs" / "killed"
    proc = start("--config", str(cfg))
    wait_for_epoch(run_dir, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"]
    assert killed_at < EPOCHS

    resumed = train_cli("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the end of epoch {killed_at}" in resumed.stdout
    assert_same_weights(final_weights(run_dir), reference)

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("cost/train")]
    assert steps == list(range(1, EPOCHS * 60 + 1))  # 240 images in batches of 4: no step twice, none missing
    assert [e.value for e in acc.Scalars("epoch")] == list(range(1, EPOCHS + 1))


def test_sigterm_saves_mid_epoch_and_resume_is_bit_identical(small_tree, tmp_path, reference):
    cfg = write_config(small_tree, tmp_path, log__run_name="stopped", train__checkpoint_every_epochs=1000)
    run_dir = tmp_path / "runs" / "stopped"
    proc = start("--config", str(cfg))
    best = run_dir / "checkpoints" / "best.pt"
    deadline = time.time() + 120
    while not (best.exists() and checkpoint.load(best)["epoch"] >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and f"--resume {run_dir}" in err
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert saved["state"]["epoch_progress"] is not None  # stopped inside an epoch, and saved there

    resumed = train_cli("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(run_dir), reference)


def test_resuming_a_finished_run_does_nothing_unless_extended(small_tree, make_config, tmp_path):
    cfg = make_config(small_tree, "train.epochs=2")
    run_dir = train.run(cfg, progress=False)
    before = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]
    again = train.run(cfg, progress=False, resume_dir=run_dir)
    assert again == run_dir
    assert_same_weights(checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"], before)
    longer = make_config(small_tree, "train.epochs=4")
    train.run(longer, progress=False, resume_dir=run_dir)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == 4


def test_resume_errors_are_one_sentence(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hotdog_torch.train", "--resume", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
