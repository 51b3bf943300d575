"""What a new user trips over: a mistyped data folder, short runs, what to do after a run, an installed package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import in_process, tiny_doc
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import config, train

REPO = Path(__file__).resolve().parents[1]


def test_a_mistyped_data_folder_is_an_error_and_nothing_is_created(tmp_path, capsys):
    typo = tmp_path / "nonexistent" / "x"
    # the command's main() in this process (its real command line: tests/test_config.py's augment range error)
    code = train.main(
        ["--no-progress", "--config", f"{REPO}/configs/hotdog.yaml", f"data.root={typo}", f"log.dir={tmp_path}/runs"]
    )
    r = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: data folder {typo} does not exist"]
    assert list(tmp_path.iterdir()) == []  # no drawn set, no run folder


def test_generate_in_a_config_file_draws_only_into_the_default_folder(tmp_path):
    doc = {"data": {"root": str(tmp_path / "mine"), "generate": True}}
    assert config.from_dict(doc).data.generate is False
    assert config.from_dict(doc, ["data.generate=true"]).data.generate is True  # asked for on the command line
    assert config.from_dict({"data": {"generate": True}}).data.generate is True  # the default synthetic folder
    assert config.load("configs/hotdog.yaml").data.generate is True


def test_asked_for_on_the_command_line_the_set_is_drawn_anywhere_and_atomically(drawn_set):
    root, parent, ds, printed = drawn_set  # drawn once a session (tests/conftest.py)
    assert "is missing: drawing the synthetic hot-dog set" in printed
    assert len(ds.train) + len(ds.val) == 6000 and (root / "manifest.json").is_file()
    hidden = [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert hidden == []  # the drawing folder was renamed (the lock file of the draw stays, empty, as lock files do)


def test_a_short_run_logs_its_norms_once_an_epoch(small_tree, make_config):
    run_dir = train.run(make_config(small_tree, "train.epochs=3", "log.every_steps=50"), progress=False)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("weight_norm/layer1", "weight_norm/layer2", "grad_norm/layer1", "grad_norm/layer2"):
        assert [e.step for e in acc.Scalars(tag)] == [15, 30, 45], tag  # 240 images in batches of 16: 15 steps
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 46))  # the lr of every step
    assert all(e.value > 0 for e in acc.Scalars("grad_norm/layer1"))


def test_the_last_lines_say_how_to_see_and_use_the_run(tiny_tree, tmp_path, capfd):
    doc = tiny_doc(tiny_tree, tmp_path)
    doc["train"]["epochs"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = in_process(train.main, ["--no-progress", "--config", str(path)], capfd)  # real ones: test_resume.py
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-2:]
    run_dir = tmp_path / "runs" / "tiny"
    assert last[0].startswith("see it:") and f"tensorboard --logdir {tmp_path / 'runs'}" in last[0]
    assert last[1].startswith("use it:") and f"--checkpoint {run_dir / 'checkpoints' / 'best.pt'}" in last[1]
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_lessons_run_from_an_installed_package(tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    build = subprocess.run([*pip, str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert not (target / "hotdog_torch" / "configs" / "lessons").is_symlink()  # real files inside the package
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run(
        [sys.executable, "-m", "hotdog_torch.lessons", "--list"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()[:4]] == [
        "1_shot_in_the_dark",
        "2_two_weights",
        "3_learning_rate",
        "4_smooth_cost",
    ]
    assert str(target / "hotdog_torch" / "configs" / "lessons") in r.stdout
