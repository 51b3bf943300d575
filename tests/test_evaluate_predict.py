"""Using a trained network: evaluate reproduces the run's test accuracy; predict classifies any photo from the
checkpoint alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_process
from PIL import Image

from hotdog_torch import checkpoint, data, drawings, evaluate, loop, predict, synth

REPO = Path(__file__).resolve().parents[1]


def cli(module, *args):
    """The command as a user runs it: its mistakes, and predict's unreadable files (the other tests: in_process)."""
    return subprocess.run(
        [sys.executable, "-m", f"hotdog_torch.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_evaluate_decodes_into_the_runs_cache_not_the_home_folder(trained, small_tree, tmp_path, capfd, monkeypatch):
    run_dir, _ = trained
    home = tmp_path / "home"  # where the default cache (~/.cache/hotdog_torch) would be: read as the cache is sought
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    args = ["--checkpoint", str(run_dir / "checkpoints/best.pt"), "--data", str(small_tree)]
    r = in_process(evaluate.main, args, capfd)  # the real command line: the mistakes' test below
    assert r.returncode == 0, r.stderr
    assert not home.exists()  # the run's data.cache_dir (tests/conftest.py: under its tmp_path) held the entry


def test_evaluate_of_a_checkpoint_from_elsewhere_uses_a_cache_it_can_make(trained, small_tree, tmp_path, capfd):
    """The run's data.cache_dir is another machine's folder (here one that cannot exist: under a file): evaluate uses
    the default cache instead, or --cache-dir, and a --cache-dir it cannot make says so, naming --cache-dir."""
    run_dir, metrics = trained
    ckpt = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    (tmp_path / "a_file").write_text("")
    ckpt["config"]["data"]["cache_dir"] = str(tmp_path / "a_file" / "cache")
    torch.save(ckpt, tmp_path / "elsewhere.pt")
    args = ["--checkpoint", str(tmp_path / "elsewhere.pt"), "--data", str(small_tree)]
    r = in_process(evaluate.main, args, capfd)
    assert r.returncode == 0, r.stderr
    assert f"accuracy {100 * metrics['test_accuracy']:.2f}%" in r.stdout
    r = in_process(evaluate.main, [*args, "--cache-dir", str(tmp_path / "mine")], capfd)
    assert r.returncode == 0 and any((tmp_path / "mine").glob("*.npy")), r.stderr
    r = in_process(evaluate.main, [*args, "--cache-dir", str(tmp_path / "a_file" / "c")], capfd)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pass --cache-dir a writable folder" in r.stderr and "data.cache_dir" not in r.stderr


def test_evaluate_checks_its_json_path_before_scoring(trained, small_tree, tmp_path, capfd):
    run_dir, _ = trained
    args = ["--checkpoint", str(run_dir / "checkpoints/best.pt"), "--data", str(small_tree), "--json"]
    for out, words in [
        (tmp_path / "missing" / "o.json", f"the folder {tmp_path / 'missing'} does not exist"),
        (tmp_path, "is a folder"),
    ]:
        r = in_process(evaluate.main, [*args, str(out)], capfd)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert r.stdout == ""  # refused before the scoring, not after it


def test_evaluate_reproduces_the_runs_test_accuracy(trained, small_tree, tmp_path, capfd):
    run_dir, metrics = trained
    out = tmp_path / "e.json"
    args = ["--checkpoint", str(run_dir / "checkpoints/best.pt"), "--data", str(small_tree), "--json", str(out)]
    r = in_process(evaluate.main, args, capfd)
    assert r.returncode == 0, r.stderr
    e = json.loads(out.read_text())
    assert e["data"].endswith("test") and e["images"] == 60
    assert e["accuracy"] == pytest.approx(metrics["test_accuracy"]) and e["cost"] == pytest.approx(metrics["test_cost"])
    counts = torch.tensor(e["confusion_matrix"]["counts"])
    assert counts.sum() == 60 and counts.diag().sum() / 60 == pytest.approx(e["accuracy"])
    assert e["per_class"]["hot_dog"]["recall"] == pytest.approx(counts[0, 0].item() / counts[0].sum().item())
    assert e["per_class"]["not_hot_dog"]["precision"] == pytest.approx(counts[1, 1].item() / counts[:, 1].sum().item())
    assert f"accuracy {100 * metrics['test_accuracy']:.2f}%" in r.stdout and "confusion matrix" in r.stdout


def test_evaluate_refuses_bad_inputs_in_one_sentence(trained, tmp_path, small_tree, capsys):
    run_dir, _ = trained
    best = str(run_dir / "checkpoints/best.pt")
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        shutil.copytree(small_tree / "test" / "hot_dog", other / name)
    junk = tmp_path / "junk.pt"
    junk.write_text("no")
    for i, (args, words) in enumerate(
        [
            (["--checkpoint", str(tmp_path / "none.pt"), "--data", str(small_tree)], "does not exist"),
            (["--checkpoint", str(junk), "--data", str(small_tree)], "damaged or not a hotdog_torch checkpoint"),
            (["--checkpoint", best, "--data", str(other)], "the checkpoint was trained on"),
            (["--checkpoint", best, "--data", str(tmp_path / "nowhere")], "does not exist"),
        ]
    ):
        if i == 0:  # as a user runs the command; the others call its main() here, a start-up of torch less
            r = cli("evaluate", *args)
        else:
            r = subprocess.CompletedProcess(args, evaluate.main(args), *capsys.readouterr())
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_predict_matches_training_and_labels_fresh_hot_dogs(trained, small_tree, tmp_path, capfd):
    run_dir, _ = trained
    best = run_dir / "checkpoints/best.pt"
    ckpt = checkpoint.load(best)
    test = small_tree / "test"
    r = in_process(predict.main, ["--checkpoint", str(best), "--json", str(test)], capfd)  # the real command line:
    # test_predict_takes_any_size_and_mode_and_reports_bad_files_one_by_one
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in map(json.loads, r.stdout.splitlines())}
    # the same scores training's evaluation gives for the same files
    settings = data.Data(root=str(test), image_size=32, channels=1, cache_dir=str(tmp_path / "c"), workers=1)
    _, split, _ = data.load_folder(test, settings, progress=False)
    outputs = loop.evaluate(
        checkpoint.model_from(ckpt), split, torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]), 2
    )["outputs"]
    for path, out in zip(split.paths, outputs, strict=True):
        k = int(out.argmax())
        assert rows[path]["class"] == ckpt["classes"][k] and rows[path]["score"] == pytest.approx(
            float(out[k]), abs=1e-5
        )

    fresh = synth.generate(
        tmp_path / "fresh",
        hot_dogs=20,
        others=0,
        test_hot_dogs=0,
        test_others=0,
        size=32,
        seed=99,
        workers=1,
        progress=False,
    )
    r = in_process(predict.main, ["--checkpoint", str(best), str(fresh)], capfd)
    labels = [line.split("\t")[1] for line in r.stdout.splitlines()]
    assert len(labels) == 20 and labels.count("hot_dog") >= 14, (
        labels
    )  # a 90%-accurate tiny model on hot dogs it never saw


def test_predict_takes_any_size_and_mode_and_reports_bad_files_one_by_one(trained, tmp_path):
    run_dir, _ = trained
    files = []
    for name, img in [
        ("big.png", Image.new("RGBA", (300, 200), (200, 150, 90, 255))),
        ("gray.jpg", Image.new("L", (17, 45), 128)),
        ("cmyk.jpg", Image.new("CMYK", (64, 64), (0, 50, 100, 0))),
        ("sixteen.png", Image.fromarray(np.full((9, 9), 30000, np.uint16))),
    ]:
        img.save(tmp_path / name)
        files.append(str(tmp_path / name))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    r = cli(
        "predict",
        "--checkpoint",
        str(run_dir / "checkpoints/best.pt"),
        files[0],
        str(tmp_path / "broken.jpg"),
        *files[1:],
        str(tmp_path / "missing.png"),
    )
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert all(
        line.split("\t")[1] in ("hot_dog", "not_hot_dog") and 0 < float(line.split("\t")[2]) < 1 for line in lines
    )
    assert "broken.jpg: cannot be read as an image" in r.stderr and "missing.png: no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_predict_needs_no_config_and_no_dataset(trained, tmp_path, capfd):
    run_dir, _ = trained
    lonely = tmp_path / "model.pt"
    shutil.copy(run_dir / "checkpoints/best.pt", lonely)  # just the file: no run folder, no config.yaml, no data
    img = tmp_path / "x.jpg"
    drawings.draw_image("hot_dog", np.random.default_rng(5), size=200).save(img)
    r = in_process(predict.main, ["--checkpoint", str(lonely), str(img)], capfd)
    assert r.returncode == 0 and r.stdout.count("\t") == 2, r.stderr
