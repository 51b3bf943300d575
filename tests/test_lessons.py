"""The seed's lessons: random search, the error-rate cost, divergence, and the runner that puts them side by side."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import in_process, tiny_doc
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import checkpoint, cost, lessons, search, stopping, train
from hotdog_torch.config import UserError
from hotdog_torch.model import build_model


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)


def test_random_search_never_calls_backward_and_keeps_the_best(small_tree, make_config, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("random search must not compute gradients")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    run_dir = search.run(make_config(small_tree, "train.epochs=8"), progress=False)
    candidates = [e.value for e in scalars(run_dir, "random_search/candidate_error_rate")]
    kept = [e.value for e in scalars(run_dir, "error_rate/train")]
    assert len(candidates) == len(kept) == 8
    assert kept == pytest.approx([min(candidates[: i + 1]) for i in range(8)], abs=1e-6)  # always the best so far
    assert len(set(candidates)) > 1  # each pass really drew new weights
    # the same x axis as gradient descent: pass k ends at step k * (240 images / 16 a batch)
    assert [e.step for e in scalars(run_dir, "cost/train")] == [15 * k for k in range(1, 9)]
    model = checkpoint.model_from(checkpoint.load(run_dir / "checkpoints/last.pt"))
    assert all(p.grad is None for p in model.parameters())


def test_the_error_rate_cost_has_zero_gradient_and_the_run_does_not_move(small_tree, make_config):
    torch.manual_seed(0)
    model = build_model(20, [6], 2)
    x, labels = torch.randn(32, 20), torch.randint(0, 2, (32,))
    c = cost.error_rate_cost(model(x), cost.one_hot(labels, 2))
    assert c.item() == pytest.approx(cost.error_rate(model(x), labels).item())  # it is the error rate
    grads = torch.autograd.grad(c, list(model.parameters()))
    assert all(torch.count_nonzero(g) == 0 for g in grads)

    run_dir = train.run(
        make_config(small_tree, "optim.cost=error_rate", "train.epochs=3", "log.every_steps=5"), progress=False
    )
    assert all(e.value == 0 for e in scalars(run_dir, "grad_norm/layer1"))
    torch.manual_seed(0)  # the tiny config's seed: the starting weights again
    start = build_model(32 * 32, [16], 2).state_dict()
    final = checkpoint.load(run_dir / "checkpoints/last.pt")["model"]
    assert all(torch.equal(start[k], final[k]) for k in start)  # gradient descent on the error rate never moved


def test_divergence_watch_rules():
    healthy = [0.25 * 0.97**i + 0.02 * ((-1) ** i) for i in range(300)]  # falling, noisy
    assert not stopping.DivergenceWatch(3, 20).update(healthy)
    assert stopping.DivergenceWatch(3, 20).update([0.25, 0.2, float("nan")])
    rising = [0.25] * 20 + [0.02] * 40 + [0.9] * 60  # back above the start, at 45x its best
    assert stopping.DivergenceWatch(3, 20).update(rising)
    w = stopping.DivergenceWatch(3, 20)
    assert not w.update(rising[:70])
    assert stopping.DivergenceWatch(3, 20, w.state()).update(rising[70:])  # its state survives a checkpoint


def test_a_planted_huge_learning_rate_stops_the_run(small_tree, make_config):
    run_dir = train.run(
        make_config(small_tree, "optim.lr=1e38", "model.activation=relu", "optim.momentum=0", "train.epochs=10"),
        progress=False,
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_because"] == "diverged" and m["epochs"] < 10
    healthy = train.run(make_config(small_tree, "train.epochs=10", "log.run_name=healthy"), progress=False)
    assert json.loads((healthy / "metrics.json").read_text())["stopped_because"] == "epochs"


def test_cross_entropy_diverging_to_nan_stops_with_the_divergence_sentence(small_tree, make_config, capsys):
    """Cross-entropy's outputs turned NaN (torch's binary_cross_entropy refuses them): the run stops as ½·MSE's does."""
    settings = ["optim.lr=1e38", "model.activation=relu", "optim.cost=cross_entropy", "train.epochs=10"]
    run_dir = train.run(make_config(small_tree, *settings), progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_because"] == "diverged" and m["epochs"] < 10
    assert "the cost diverged at epoch 1" in capsys.readouterr().out


def test_an_unknown_lesson_is_one_sentence_naming_them_and_nothing_is_overwritten(tmp_path, capfd):
    out = tmp_path / "lessons"
    out.mkdir()
    (out / "summary.md").write_text("# the summary of an earlier run\n")
    r = in_process(lessons.main, ["--only", "two_weight", "no_such_lesson", "--out", str(out)], capfd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'two_weight'" in r.stderr and "did you mean '2_two_weights'?" in r.stderr
    assert all(name in r.stderr for name in lessons.load_lessons())  # the lessons there are
    assert (out / "summary.md").read_text() == "# the summary of an earlier run\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"] and r.stdout == ""


def test_the_runner_writes_a_summary_with_every_arm(small_tree, reduced_tree, tmp_path):
    base = tmp_path / "base.yaml"
    doc = tiny_doc(small_tree, tmp_path)
    base.write_text(yaml.safe_dump(doc))
    folder = tmp_path / "lessons"
    folder.mkdir()
    (folder / "a_dark.yaml").write_text(
        yaml.safe_dump(
            {
                "title": "dark",
                "base": "../base.yaml",
                "overrides": ["train.epochs=3"],
                "quick": ["train.epochs=2"],
                "arms": {"gd": ["optim.name=sgd"], "search": []},
                "search_arms": ["search"],
            }
        )
    )
    (folder / "b_rate.yaml").write_text(
        yaml.safe_dump(
            {
                "title": "rate",
                "base": "../base.yaml",
                "quick": ["train.epochs=2"],
                "sweep": {"key": "optim.lr", "values": [0.001, 1.0e38]},
            }
        )
    )
    (folder / "c_cost.yaml").write_text(
        yaml.safe_dump(
            {
                "title": "cost",
                "base": "../base.yaml",
                "quick": ["train.epochs=2"],
                "arms": {"mse": ["optim.cost=half_mse"], "err": ["optim.cost=error_rate"]},
            }
        )
    )
    # the two-weight lesson needs a network that learnt: the reduced tree (1800 images), the default optimiser
    medium = tiny_doc(reduced_tree, tmp_path)
    medium["optim"].update(lr=0.2, batch_size=64)
    (tmp_path / "medium.yaml").write_text(yaml.safe_dump(medium))
    two_lesson = {"title": "two", "kind": "two_weights", "base": "../medium.yaml", "budget": 100, "lr": 5.0}
    two_lesson["overrides"] = ["data.channels=3", "train.epochs=8", "model.hidden=[32]"]
    (folder / "d_two.yaml").write_text(yaml.safe_dump(two_lesson))
    parent = tmp_path / "out"
    summary = lessons.run_all(parent, quick=True, folder=folder)
    text = lessons.write_summary(summary, parent)
    for arm in ("gd", "search", "lr=0.001", "lr=1e+38", "mse", "err"):
        assert f"| {arm} |" in text
        assert (
            parent
            / next(k for k in summary["lessons"] if any(a["arm"] == arm for a in summary["lessons"][k].get("arms", [])))
            / arm
            / "metrics.json"
        ).is_file()
    dark = {a["arm"]: a for a in summary["lessons"]["a_dark"]["arms"]}
    assert dark["gd"]["passes"] == dark["search"]["passes"] == 2  # the same budget of passes
    assert "did not move" in text
    two = summary["lessons"]["d_two"]
    assert (parent / "d_two" / "landscape.png").is_file() and two["gradient_descent"]["cost"] < 0.9 * two[
        "gradient_descent"
    ]["start_cost"]  # it walked downhill
    assert two["gd_val_error_rate"] <= two["majority_val_error_rate"] - 0.05  # clearly better than "not hot dog"
    assert {"bun", "sausage"} == set(two["neurons"]) and two["neurons"]["bun"]["neuron"] != two["neurons"]["sausage"][
        "neuron"
    ]
    assert "random_best_val_error_rate" in two and "for always answering" in text
    assert json.loads((parent / "summary.json").read_text())["lessons"].keys() == summary["lessons"].keys()


def test_the_two_weight_lesson_refuses_a_network_without_a_hidden_layer(small_tree, tmp_path):
    from hotdog_torch import two_weights

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_doc(small_tree, tmp_path)))
    lesson = {"title": "two", "kind": "two_weights", "base": str(tmp_path / "base.yaml"), "budget": 5, "lr": 5.0}
    lesson["overrides"] = ["model.hidden=[]", "train.epochs=1"]
    with pytest.raises(UserError, match="needs a hidden layer") as refused:
        two_weights.run(lesson, tmp_path / "out", quick=True)
    assert "\n" not in str(refused.value) and not (tmp_path / "runs").exists()  # refused before training


def test_the_template_or_hot_dog_lesson_scores_both_arms_on_every_framing(small_tree, tmp_path):
    from PIL import Image

    from hotdog_torch import framing

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_doc(small_tree, tmp_path)))
    folder = tmp_path / "lessons"
    folder.mkdir()
    lesson = {"title": "template", "kind": "framings", "base": "../base.yaml", "quick": ["train.epochs=2"]}
    lesson["arms"] = {"as_drawn": [], "augmented": ["data.augment.enabled=true", "data.augment.warmup_epochs=1"]}
    (folder / "e_template.yaml").write_text(yaml.safe_dump(lesson))
    parent = tmp_path / "out"
    summary = lessons.run_all(parent, quick=True, folder=folder)
    text = lessons.write_summary(summary, parent)
    arms = {a["arm"]: a for a in summary["lessons"]["e_template"]["arms"]}
    assert set(arms) == {"as_drawn", "augmented"}
    for a in arms.values():
        assert list(a["framings"]) == ["as_is", *framing.KINDS] and a["passes"] == 2
        assert a["framings"]["as_is"]["accuracy"] == pytest.approx(
            json.loads((parent / "e_template" / a["arm"] / "metrics.json").read_text())["test_accuracy"]
        )
    assert "| arm | as_is | shift | zoom_out | zoom_in | tilt | flip | dim | jpeg |" in text
    picture = Image.open(parent / "e_template" / "neurons.png")
    assert picture.width > 2 * picture.height  # one row of neurons per arm, side by side


def test_random_search_reports_the_configured_cost(small_tree, make_config):
    """The same first draw (kept: nothing to beat), scored by ½·MSE and by cross-entropy: the training cost it
    reports is the configured one, as the validation cost is."""
    costs = {}
    for name in ("half_mse", "cross_entropy"):
        cfg = make_config(small_tree, f"optim.cost={name}", "train.epochs=1", f"log.run_name={name}")
        history = checkpoint.load(search.run(cfg, progress=False) / "checkpoints" / "last.pt")["state"]["history"]
        costs[name] = history[0]["train_cost"]
    assert costs["cross_entropy"] > 2 * costs["half_mse"]  # -log of a sigmoid against ½(1 - sigmoid)²


def test_the_search_command_runs_and_its_run_is_never_resumed_as_gradient_descent(small_tree, tmp_path, capsys):
    from conftest import config_file

    path = config_file(small_tree, tmp_path, "dark", train__epochs=2)
    assert search.main(["--config", str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "dark"
    assert "random search" in json.loads((run_dir / "metrics.json").read_text())["step"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert train.main(["--resume", str(run_dir), "train.epochs=3", "--no-progress"]) == 2
    assert "is a random search (python -m hotdog_torch.search)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing changed on disk
    assert search.main(["--resume", str(run_dir)]) == 2


def test_the_search_keeps_k_best_files_and_refuses_torchrun(small_tree, make_config, monkeypatch):
    run_dir = search.run(make_config(small_tree, "train.epochs=6", "train.keep_top_k=2"), progress=False)
    assert len(list((run_dir / "checkpoints").glob("best-*.pt"))) == 2  # the k best passes' draws, no more
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="random search runs in one process"):
        search.run(make_config(small_tree, "log.run_name=ranks"), progress=False)
