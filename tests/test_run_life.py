"""A run's life: a resume that checks what it restores before it writes, files that only the run writes and only the
run removes, a finish that a stop cannot lose, and the folder the app trains and serves."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_resume import REPO, snapshot, stop_at_call

from hotdog_torch import checkpoint, config, files, stopping, train

ROUTED = ["data.augment.enabled=true", "model.router.hidden=[8]", "model.router.epochs=3", "model.router.size=16"]


@pytest.fixture
def own_tree(tiny_tree, tmp_path):
    """A copy of tiny_tree a test may change."""
    return Path(shutil.copytree(tiny_tree, tmp_path / "tree"))


def stopped_mid_epoch(cfg, monkeypatch, call=9):
    """The run of cfg, stopped by a stop request (as Ctrl-C makes) at step 3 of epoch 2; its folder."""
    stop_at_call(monkeypatch, call)
    with pytest.raises(stopping.Interrupted):
        train.run(cfg, progress=False)
    monkeypatch.undo()
    return Path(cfg.log.dir) / cfg.log.run_name


def resume(run_dir, capsys, *overrides) -> tuple[int, str]:
    capsys.readouterr()
    code = train.main(["--no-progress", "--resume", str(run_dir), *overrides])
    return code, capsys.readouterr().err


def removed(tree: Path, n: int, cls: str = "hot_dog") -> None:
    for path in sorted((tree / cls).iterdir())[:n]:
        path.unlink()


def test_a_resume_after_images_were_removed_is_refused_in_one_sentence(own_tree, make_config, monkeypatch, capsys):
    run_dir = stopped_mid_epoch(make_config(own_tree, "train.epochs=4"), monkeypatch)
    before = snapshot(run_dir)
    removed(own_tree / "train", 7)
    code, err = resume(run_dir, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained on 90 images" in err and "83 (7 fewer in hot_dog)" in err and "put them back" in err
    assert snapshot(run_dir) == before


def test_a_resume_after_images_were_added_is_refused(own_tree, make_config, monkeypatch, capsys):
    run_dir = stopped_mid_epoch(make_config(own_tree, "train.epochs=4"), monkeypatch)
    for k, path in enumerate(sorted((own_tree / "train" / "not_hot_dog").iterdir())[:5]):
        shutil.copy(path, path.with_name(f"extra-{k}.jpg"))
    code, err = resume(run_dir, capsys)
    assert code == 2 and "95 (5 more in not_hot_dog)" in err, err


def test_a_resume_with_another_validation_split_is_refused(tiny_tree, make_config, monkeypatch, capsys):
    run_dir = stopped_mid_epoch(make_config(tiny_tree, "train.epochs=4"), monkeypatch)
    code, err = resume(run_dir, capsys, "data.val_fraction=0.5")
    assert code == 2 and "data.val_fraction" in err and "resume without that override" in err, err
    assert resume(run_dir, capsys)[0] == 0  # the plain resume goes on


def test_a_resume_mid_epoch_with_another_batch_count_is_refused(tiny_tree, make_config, monkeypatch, capsys):
    run_dir = stopped_mid_epoch(make_config(tiny_tree, "train.epochs=4"), monkeypatch)
    code, err = resume(run_dir, capsys, "optim.batch_size=8")
    assert code == 2 and "optim.batch_size" in err and err.count("\n") == 1, err


def test_a_routed_run_stopped_in_its_phase_refuses_a_changed_set(own_tree, make_config, monkeypatch, capsys):
    cfg = make_config(own_tree, *ROUTED, "train.epochs=2")
    run_dir = stopped_mid_epoch(cfg, monkeypatch, call=1)  # asked after router epoch 1: stopped in the phase
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]["router"]["epoch"] == 1
    for k, path in enumerate(sorted((own_tree / "train" / "hot_dog").iterdir())[:20]):
        shutil.copy(path, path.with_name(f"extra-{k}.jpg"))
    code, err = resume(run_dir, capsys)
    assert code == 2 and "20 more in hot_dog" in err, err


def test_a_resume_never_removes_a_file_the_user_put_in_checkpoints(tiny_tree, make_config, capsys):
    run_dir = train.run(make_config(tiny_tree, "train.epochs=2", "train.keep_top_k=1"), progress=False)
    backup = run_dir / "checkpoints" / "best-backup.pt"
    shutil.copy(run_dir / "checkpoints" / "best.pt", backup)
    assert resume(run_dir, capsys)[0] == 0  # finished: nothing to train
    assert resume(run_dir, capsys, "train.epochs=4")[0] == 0
    assert backup.is_file()
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.pt"))
    assert len(kept) == 2 and "best-backup.pt" in kept  # the one k-best file, and the user's


def test_one_cycle_with_one_rising_step_is_one_sentence_and_leaves_no_folder(tiny_tree, make_config, capsys):
    cfg = make_config(tiny_tree, "optim.schedule=one_cycle", "optim.batch_size=72", "train.epochs=4")
    with pytest.raises(config.UserError, match="one_cycle") as e:
        train.run(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not Path(cfg.log.dir).exists() or not any(Path(cfg.log.dir).iterdir())


KILLER = """
import os, signal, sys
from hotdog_torch import board, train
how, hparams = sys.argv.pop(1), board.Board.hparams
def stopped_hparams(self, *args, **kw):  # the stop comes in the middle of finish()
    os.kill(os.getpid(), getattr(signal, how))
    return hparams(self, *args, **kw)
board.Board.hparams = stopped_hparams
sys.exit(train.main(sys.argv[1:]))
"""


def finish_stopped(how, tiny_tree, tmp_path, make_config):
    cfg = make_config(tiny_tree, "train.epochs=2")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    command = [sys.executable, str(killer), how, "--no-progress", "--config", str(path)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300), Path(cfg.log.dir) / "tiny"


def test_a_sigterm_during_finish_still_writes_metrics(tiny_tree, tmp_path, make_config):
    done, run_dir = finish_stopped("SIGTERM", tiny_tree, tmp_path, make_config)
    assert (run_dir / "metrics.json").is_file(), done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_killed_during_finish_is_finished_by_its_resume(tiny_tree, tmp_path, make_config, capsys):
    killed, run_dir = finish_stopped("SIGKILL", tiny_tree, tmp_path, make_config)
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()
    assert resume(run_dir, capsys)[0] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and "test_accuracy" in metrics


def test_a_run_folder_crashed_before_its_first_save_is_trained_by_its_resume(tiny_tree, make_config, capsys):
    cfg = make_config(tiny_tree, "train.epochs=2")
    run_dir = Path(cfg.log.dir) / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)  # what a crash before the first save leaves
    files.write_config(run_dir, cfg)
    assert resume(run_dir, capsys)[0] == 0
    assert (run_dir / "metrics.json").is_file() and not (run_dir.parent / "tiny-2").exists()


def test_make_app_trains_and_serves_the_same_folder(tiny_tree, make_config, tmp_path):
    cfg = make_config(tiny_tree, "train.epochs=2")
    path = tmp_path / "photos.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    photos = Path(cfg.log.dir) / "photos"
    (photos / "checkpoints").mkdir(parents=True)  # a crash before the first save
    files.write_config(photos, cfg)
    make = ["make", "-s", "-o", "install", "photos", f"BIN={Path(sys.executable).parent}"]
    make += [f"PHOTOS={photos}", f"PHOTOS_CONFIG={path}"]
    done = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (photos / "metrics.json").is_file() and not (photos.parent / "photos-2").exists()
    served = subprocess.run([*make, "-n", "app"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f"hotdog_torch.serve --checkpoint {photos}/checkpoints/best.pt" in served.stdout


def test_a_stale_temporary_of_the_run_is_removed_and_no_other(tiny_tree, make_config, monkeypatch, capsys):
    run_dir = stopped_mid_epoch(make_config(tiny_tree, "train.epochs=4"), monkeypatch)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run_dir / "checkpoints" / f".last.pt.{dead.stdout.strip()}.tmp"  # a SIGKILL in the middle of a save
    stale.write_bytes(b"half a checkpoint")
    mine = run_dir / "checkpoints" / ".notes.txt.1.tmp"
    mine.write_text("not the run's")
    assert resume(run_dir, capsys)[0] == 0
    assert not stale.exists() and mine.exists()


def test_a_nested_run_name_makes_nested_folders(tiny_tree, make_config):
    cfg = make_config(tiny_tree, "train.epochs=1", "log.run_name=exp/one")
    assert train.run(cfg, progress=False) == Path(cfg.log.dir) / "exp" / "one"
    assert train.run(cfg, progress=False) == Path(cfg.log.dir) / "exp" / "one-2"


def test_an_unwritable_log_dir_is_one_sentence(tiny_tree, make_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    cfg = make_config(tiny_tree, "train.epochs=1", f"log.dir={tmp_path / 'afile' / 'runs'}")
    with pytest.raises(config.UserError, match="log.dir") as e:
        train.run(cfg, progress=False)
    assert "\n" not in str(e.value)


def test_a_resume_of_an_older_last_pt_still_drops_the_k_best_files_it_wrote(tiny_tree, make_config, capsys):
    common = ("train.keep_top_k=1", "train.monitor=val_cost")
    run_dir = train.run(make_config(tiny_tree, "train.epochs=3", *common), progress=False)
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["run_files"]  # as a last.pt written before the run recorded its own files
    torch.save(ckpt, last)
    assert resume(run_dir, capsys, "train.epochs=6")[0] == 0
    assert len(list((run_dir / "checkpoints").glob("best-*.pt"))) == 1  # keep_top_k=1: the older one dropped
