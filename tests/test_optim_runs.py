"""The optimiser's numbers through whole runs: a resumed run's override, a killed AdamW run resumed bit-identical,
early stopping on the best weights, the k best checkpoints, and the mistakes a user can make."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import assert_same_weights, start, train_cli, wait_for_epoch, write_config

from hotdog_torch import checkpoint, config, train


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.parametrize("fused", ["true", "false"])
def test_resume_with_a_new_lr_trains_at_the_new_lr_on_both_paths(small_tree, make_config, capsys, fused):
    cfg = make_config(small_tree, f"optim.fused={fused}", "optim.lr=0.2", "train.epochs=1", f"log.run_name=lr-{fused}")
    run_dir = train.run(cfg, progress=False)
    steps = max(scalars(run_dir, "lr"))
    again = config.load_run(None, run_dir, ["optim.lr=0.001", "train.epochs=2"])
    train.run(again, progress=False, resume_dir=run_dir)
    assert "changed on resume: optim.lr 0.2 -> 0.001" in capsys.readouterr().out  # and nothing else changed
    lrs = scalars(run_dir, "lr")
    assert [lrs[s] for s in range(1, steps + 1)] == pytest.approx([0.2] * steps)
    assert [lrs[s] for s in range(steps + 1, 2 * steps + 1)] == pytest.approx([0.001] * steps)
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert saved["lr"] == 0.001


ADAMW = dict(
    optim__name="adamw",
    optim__momentum=0.0,
    optim__lr=0.003,
    optim__weight_decay=0.05,
    optim__schedule="cosine",
    optim__warmup_steps=30,
    model__dropout=0.2,
    train__epochs=12,
)


def test_a_killed_adamw_cosine_warmup_dropout_run_resumes_bit_identical(small_tree, tmp_path):
    straight = write_config(small_tree, tmp_path, "adamw-straight", **ADAMW)
    assert train.main(["--no-progress", "--config", str(straight)]) == 0  # in this process: a start-up less
    reference = checkpoint.load(tmp_path / "runs" / "adamw-straight" / "checkpoints" / "last.pt")
    run_dir = tmp_path / "runs" / "adamw-killed"
    proc = start("--config", str(write_config(small_tree, tmp_path, "adamw-killed", **ADAMW)))
    wait_for_epoch(run_dir, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] < 12
    resumed = train_cli("--resume", str(run_dir))  # its own process: its event file sorts after the killed one's
    assert resumed.returncode == 0, resumed.stderr
    final = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert final["epoch"] == 12 and "torch.optim.AdamW" in json.loads((run_dir / "metrics.json").read_text())["step"]
    assert_same_weights(final["model"], reference["model"])
    lrs = scalars(run_dir, "lr")
    assert lrs == scalars(tmp_path / "runs" / "adamw-straight", "lr") and lrs[1] == pytest.approx(0.003 / 30)


def test_early_stopping_ends_on_the_best_epoch_and_keeps_the_k_best(small_tree, make_config, capsys):
    cfg = make_config(
        small_tree, "train.epochs=40", "train.patience=2", "train.monitor=val_cost", "train.min_delta=0.01",
        "train.keep_top_k=2", "optim.lr=0.5",
    )  # fmt: skip
    run_dir = train.run(cfg, progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_because"] == "no_improvement" and m["epochs"] < 40
    history = checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]["history"]
    best = min(history, key=lambda e: e["val_cost"])
    assert m["best_epoch"] == best["epoch"] and m["val_cost"] == best["val_cost"]
    assert m["epochs"] - best["epoch"] >= 2  # two epochs with no improvement of val_cost by 0.01
    out = capsys.readouterr().out
    assert f"no improvement of val_cost for 2 epochs: the best epoch's weights ({best['epoch']})" in out
    two = sorted(history, key=lambda e: e["val_cost"])[:2]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.pt"))
    assert kept == sorted(f"best-{e['epoch']}.pt" for e in two)
    for e in two:
        assert (
            checkpoint.load(run_dir / "checkpoints" / f"best-{e['epoch']}.pt")["metrics"]["val_cost"] == e["val_cost"]
        )
    weights = checkpoint.load(run_dir / "checkpoints" / "best.pt")["model"]  # the network the last line names
    kept_best = checkpoint.load(run_dir / "checkpoints" / f"best-{best['epoch']}.pt")
    assert kept_best["epoch"] == best["epoch"] and all(
        torch.equal(weights[k], v) for k, v in kept_best["model"].items()
    )
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]  # the last epoch's, for --resume
    assert any(not torch.equal(weights[k], v) for k, v in last.items())


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.name=adamww", "did you mean 'adamw'"),
        ("optim.schedule=cosin", "did you mean 'cosine'"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be 0 or more"),
        ("model.dropout=1", "model.dropout must be in [0, 1)"),
        ("optim.clip_grad_norm=0", "optim.clip_grad_norm must be above 0"),
        ("optim.pct_start=1", "optim.pct_start must lie strictly between 0 and 1"),
        ("optim.warmup_steps=100000", "optim.warmup_steps 100000 is not shorter than the run"),
        ("train.patience=0", "train.patience must be at least 1"),
        ("train.keep_top_k=0", "train.keep_top_k must be at least 1"),
        ("optim.class_weights=[1,2,3]", "optim.class_weights has 3 weights for the 2 classes"),
    ],
)
def test_a_mistake_is_one_sentence_exit_2_and_nothing_written(small_tree, tmp_path, capsys, override, says):
    cfg_file = write_config(small_tree, tmp_path, "mistake")
    assert train.main(["--config", str(cfg_file), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_a_stop_request_at_an_epochs_end_saves_a_last_pt_that_resumes(small_tree, make_config, monkeypatch, extra):
    """Issue 18, item 2: a signal between the end of an epoch's steps and its bookkeeping (any of the checks there)."""
    from hotdog_torch import stopping

    cfg = make_config(small_tree, "train.epochs=2", f"log.run_name=straight-{extra}")
    reference = checkpoint.load(train.run(cfg, progress=False) / "checkpoints" / "last.pt")["model"]
    steps = len(scalars(Path(cfg.log.dir) / f"straight-{extra}", "cost/train")) // 2

    class LateRequest(stopping.StopRequest):  # says "stop" on its n-th question, just after the first epoch's steps
        asked = 0

        def __call__(self):
            LateRequest.asked += 1
            if LateRequest.asked == steps + extra + 1:
                self.signal = signal.SIGTERM
            return super().__call__()

    monkeypatch.setattr(stopping, "StopRequest", LateRequest)
    cfg = make_config(small_tree, "train.epochs=2", f"log.run_name=stopped-{extra}")
    with pytest.raises(stopping.Interrupted):
        train.run(cfg, progress=False)
    monkeypatch.undo()
    run_dir = Path(cfg.log.dir) / f"stopped-{extra}"
    train.run(config.load_run(None, run_dir), progress=False, resume_dir=run_dir)
    assert_same_weights(checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"], reference)


def test_resuming_a_scheduled_run_names_only_what_changed(small_tree, make_config, capsys):
    cfg = make_config(small_tree, "optim.schedule=cosine", "optim.warmup_steps=5", "train.epochs=1")
    run_dir = train.run(cfg, progress=False)
    capsys.readouterr()
    train.run(config.load_run(None, run_dir, ["train.epochs=2"]), progress=False, resume_dir=run_dir)
    out = capsys.readouterr().out
    assert "changed on resume" not in out and "the schedule now spans 30 steps (it spanned 15)" in out
    with pytest.raises(config.UserError, match="trained with optim.name=sgd"):
        train.run(config.load_run(None, run_dir, ["optim.name=adamw", "train.epochs=3"]), resume_dir=run_dir)
