"""Never lose a run: kill a real training process, resume it, and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import checkpoint, stopping, train

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


@pytest.fixture(scope="module")
def reference(small_tree, tmp_path_factory):
    """The uninterrupted run, trained once for the tests that kill or stop one (in this process: a start-up less)."""
    tmp = tmp_path_factory.mktemp("straight")
    assert train.main(["--no-progress", "--config", str(write_config(small_tree, tmp, log__run_name="straight"))]) == 0
    return final_weights(tmp / "runs" / "straight")


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

    # a process of its own: TensorBoard reads a run's event files in the order of their names (the second they
    # were made, then the pid), and drops the steps of a file read after one that resumed before those steps
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

    assert train.main(["--no-progress", "--resume", str(run_dir)]) == 0  # the resume, in this process
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


def test_resume_errors_are_one_sentence(tmp_path, capsys):
    code = train.main(["--resume", str(tmp_path / "nope")])  # in this process: the real command line is test_config's
    r = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def snapshot(folder: Path) -> dict:
    """Every file under folder: its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.name=adamw", "resume without that override"),
        ("model.hidden=[8]", "does not fit"),
        ("train.epochs=1", ""),
    ],
)
def test_a_refused_resume_changes_nothing_on_disk(tiny_tree, make_config, capsys, override, says):
    run_dir = train.run(make_config(tiny_tree, "train.epochs=2"), progress=False)
    before = snapshot(run_dir)
    train.main(["--resume", str(run_dir), "--no-progress", override])
    out, err = capsys.readouterr()
    assert says in err and ("already finished" in out or err.startswith("error: "))
    assert snapshot(run_dir) == before  # config.yaml too: the plain --resume still works
    assert train.main(["--resume", str(run_dir), "--no-progress", "train.epochs=3"]) == 0


@pytest.mark.parametrize(
    "given, why, stopped_at, advice, follow, ends_at",
    [
        (["train.epochs=6", "train.patience=1", "optim.lr=1e-9"], "no_improvement", 2, "train.patience", 3, 4),
        (["train.target_accuracy=0.01"], "target_accuracy", 1, "train.target_accuracy", "null", 3),
    ],
)
def test_a_run_stopped_early_trains_on_as_its_advice_says(
    tiny_tree, make_config, capsys, given, why, stopped_at, advice, follow, ends_at
):
    run_dir = train.run(make_config(tiny_tree, *given), progress=False)
    last = run_dir / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["state"]["stopped_because"] == why and checkpoint.load(last)["epoch"] == stopped_at
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--no-progress"]) == 0
    assert f"nothing to resume. To train on, pass {advice} above" in capsys.readouterr().out
    assert train.main(["--resume", str(run_dir), "--no-progress", f"{advice}={follow}"]) == 0
    assert checkpoint.load(last)["epoch"] == ends_at


def stop_at_call(monkeypatch, n):
    """A stop request (as Ctrl-C makes) seen at the n-th time the loop asks, counted from now."""
    calls = iter(range(1, 10_000))
    monkeypatch.setattr(stopping.StopRequest, "__call__", lambda self: next(calls) >= n)


@pytest.mark.parametrize("stop_call, resumed_images", [(9, 40), (12, 0)])  # at step 3 of epoch 2; after its last
def test_a_resumed_epoch_counts_only_the_images_it_trained(
    tiny_tree, make_config, monkeypatch, capsys, stop_call, resumed_images
):
    cfg = make_config(tiny_tree)  # 72 training images in 5 steps (16, 16, 16, 16, 8); 5 asks + 1 at the end an epoch
    stop_at_call(monkeypatch, stop_call)
    with pytest.raises(stopping.Interrupted):
        train.run(cfg, progress=False)
    run_dir = Path(cfg.log.dir) / "tiny"
    monkeypatch.undo()
    capsys.readouterr()
    train.run(cfg, progress=False, resume_dir=run_dir)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert ("images/s" in lines[0]) == (resumed_images > 0) and "images/s" in lines[1]
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]
    assert state["train_images"] == resumed_images + 72  # the resumed part of epoch 2, then all of epoch 3


KILLER = """
import os, signal, sys
from hotdog_torch import checkpoint, stopping, train
save, when = checkpoint.save, sys.argv.pop(1)
def killing_save(path, *args, **kw):
    state = args[4]
    at = path.name == "best.pt" and state.epoch >= 3 and state.epoch % 2 == 1  # last.pt not due: every 2 epochs
    if when == "final":  # the last epoch's new best: last.pt (the run finished) written, best.pt not yet
        at = path.name == "best.pt" and state.stopped_because is not None
    if at and when in ("before", "final"):
        os.kill(os.getpid(), signal.SIGKILL)
    save(path, *args, **kw)
    if at:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = killing_save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_between_best_and_last_leaves_best_pt_and_metrics_agreeing(small_tree, tmp_path, when):
    options = dict(optim__batch_size=16, train__epochs=8, train__checkpoint_every_epochs=2)
    cfg = write_config(small_tree, tmp_path, log__run_name="lost", **options)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run = [sys.executable, str(killer), when, "--no-progress", "--config", str(cfg)]
    killed = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # a new best at an odd epoch: SIGKILLed at best.pt
    run_dir = tmp_path / "runs" / "lost"
    epoch = checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"]
    # the resumed timeline, no more epochs, in this process
    assert train.main(["--no-progress", "--resume", str(run_dir), f"train.epochs={epoch}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert best["epoch"] == metrics["best_epoch"]
    assert (
        best["metrics"]["val_accuracy"] == metrics["val_accuracy"]
        and best["metrics"]["val_cost"] == metrics["val_cost"]
    )


def test_a_kill_on_the_last_epoch_before_best_pt_is_mended_by_a_plain_resume(small_tree, tmp_path):
    """The last epoch's new best: last.pt says the run is finished, best.pt is an earlier epoch's.  A plain
    --resume has nothing to train, and still writes best.pt from last.pt's weights (that epoch's)."""
    cfg = write_config(small_tree, tmp_path, log__run_name="final", optim__batch_size=16, train__epochs=3)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(killer), "final", "--no-progress", "--config", str(cfg)], cwd=REPO)
    run_dir = tmp_path / "runs" / "final"
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    if killed.returncode != -signal.SIGKILL:  # the last epoch was not a new best: nothing to mend
        pytest.skip("the last epoch of this run was not its best")
    assert checkpoint.load(run_dir / "checkpoints" / "best.pt")["epoch"] < last["epoch"]
    assert train.main(["--no-progress", "--resume", str(run_dir)]) == 0  # in this process
    assert checkpoint.load(run_dir / "checkpoints" / "best.pt")["epoch"] == last["state"]["best"]["epoch"]
