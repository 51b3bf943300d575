"""The loop end to end: a tiny run learns, logs a falling cost, writes its outputs, and repeats itself exactly."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import checkpoint, data, loop, train


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_a_tiny_run_reaches_its_target(small_tree, make_config):
    cfg = make_config(small_tree, "train.epochs=60", "train.target_accuracy=0.9", "model.hidden=[32]", "optim.lr=0.2")
    run_dir = train.run(cfg, progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_because"] == "target_accuracy"
    assert m["val_accuracy"] >= 0.9 and m["epochs"] < 60
    for key in (
        "val_accuracy",
        "val_error_rate",
        "val_cost",
        "train_cost",
        "test_accuracy",
        "epochs",
        "steps",
        "seconds",
        "train_images_per_second",
    ):
        assert key in m
    assert abs(m["val_error_rate"] + m["val_accuracy"] - 1) < 1e-9
    assert m["steps"] == m["epochs"] * -(-240 // 16)  # 240 training images in batches of 16


def test_the_event_file_holds_a_falling_cost(small_tree, make_config):
    run_dir = train.run(make_config(small_tree, "train.epochs=8", "optim.lr=0.2", "model.hidden=[32]"), progress=False)
    acc = scalars(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"cost/train", "cost/train_epoch", "cost/val", "error_rate/train", "error_rate/val", "accuracy/val"} <= tags
    cost = [e.value for e in acc.Scalars("cost/train")]
    assert [e.step for e in acc.Scalars("cost/train")] == list(range(1, 8 * 15 + 1))
    first, last = sum(cost[:15]) / 15, sum(cost[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    per_epoch = [e.value for e in acc.Scalars("cost/train_epoch")]
    assert per_epoch[-1] < per_epoch[0]
    assert {"config", "dataset"} <= {t.split("/")[0] for t in acc.Tags()["tensors"]}


def test_outputs_and_checkpoints_predict_without_the_config(small_tree, make_config):
    cfg = make_config(small_tree, "train.epochs=4")
    run_dir = train.run(cfg, progress=False)
    assert (run_dir / "config.yaml").is_file()
    m = json.loads((run_dir / "metrics.json").read_text())
    ckpt = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert ckpt["classes"] == ["hot_dog", "not_hot_dog"] and ckpt["image_size"] == 32 and ckpt["channels"] == 1
    model = checkpoint.model_from(ckpt)
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False)
    mean, std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    test = loop.evaluate(model, ds.test, mean, std, 2)
    assert test["accuracy"] == pytest.approx(m["test_accuracy"])
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == 4


def test_an_existing_run_is_never_overwritten(tiny_tree, make_config):
    first = train.run(make_config(tiny_tree, "train.epochs=1"), progress=False)
    second = train.run(make_config(tiny_tree, "train.epochs=1"), progress=False)
    assert first != second and second.name == "tiny-2"
    assert (first / "metrics.json").is_file() and (second / "metrics.json").is_file()


def test_seeded_cpu_runs_are_reproducible(tiny_tree, make_config):
    a = checkpoint.load(
        train.run(make_config(tiny_tree, "train.epochs=2", "log.run_name=a"), progress=False) / "checkpoints/last.pt"
    )
    b = checkpoint.load(
        train.run(make_config(tiny_tree, "train.epochs=2", "log.run_name=b"), progress=False) / "checkpoints/last.pt"
    )
    c = checkpoint.load(
        train.run(make_config(tiny_tree, "train.epochs=2", "log.run_name=c", "seed=1"), progress=False)
        / "checkpoints/last.pt"
    )
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_full_batch_gradient_descent_takes_one_step_per_epoch(tiny_tree, make_config):
    run_dir = train.run(
        make_config(tiny_tree, "train.epochs=3", "optim.batch_size=null", "optim.momentum=0"), progress=False
    )
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3


def test_a_batch_larger_than_the_training_set_is_clamped(tiny_tree, make_config):
    with pytest.warns(UserWarning, match="full-batch"):
        run_dir = train.run(make_config(tiny_tree, "train.epochs=2", "optim.batch_size=100000"), progress=False)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2


def test_a_missing_synthetic_set_is_drawn_at_128_whatever_the_run_resizes_to(drawn_set):
    from PIL import Image

    root, _, ds, printed = drawn_set  # drawn once a session, for a run at 16x16 (tests/conftest.py)
    assert "is missing: drawing the synthetic hot-dog set" in printed
    assert len(ds.train) + len(ds.val) == 6000 and len(ds.test) == 1200
    assert ds.train.images.shape[-1] == 16
    with Image.open(next((root / "train" / "hot_dog").iterdir())) as im:
        assert im.size == (128, 128)  # the shared folder holds the seed's images, not this run's size


def weights_of(run_dir):
    return checkpoint.load(run_dir / "checkpoints/last.pt")["model"]


# The paths a CUDA run takes that the CPU can run too, end to end, so that only the device is new on a GPU


def test_bf16_autocast_trains_on_the_cpu_as_cuda_does_by_default(small_tree, make_config):
    common = ("optim.fused=false", "train.epochs=2", "model.hidden=[32]", "optim.lr=0.2")
    fp32 = train.run(make_config(small_tree, *common, "log.run_name=fp32"), progress=False)
    bf16 = train.run(make_config(small_tree, *common, "train.precision=bf16", "log.run_name=bf16"), progress=False)
    m = json.loads((bf16 / "metrics.json").read_text())
    assert m["step"].startswith("autograd + torch.optim.SGD (bf16") and m["val_accuracy"] > 0.75, (
        m
    )  # two thirds are not hot dogs
    a, b = weights_of(fp32), weights_of(bf16)
    assert all(b[k].dtype == torch.float32 for k in b)  # the master weights stay fp32; the matmuls ran in bf16
    change = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 1e-4 < change < 0.05, change  # rounded to bf16's 8 bits, not fp32's 24: near, not equal
    model = checkpoint.model_from(checkpoint.load(bf16 / "checkpoints/best.pt"))  # loads back as fp32
    assert next(model.parameters()).dtype == torch.float32


def test_a_compiled_network_trains_on_the_cpu_as_the_eager_one_does(small_tree, make_config):
    common = ("train.epochs=2", "model.hidden=[8]", "optim.batch_size=60", "data.image_size=16")  # 240 = 4 x 60
    eager = train.run(make_config(small_tree, *common, "optim.fused=false", "log.run_name=eager"), progress=False)
    compiled = train.run(make_config(small_tree, *common, "train.compile=true", "log.run_name=c"), progress=False)
    m = json.loads((compiled / "metrics.json").read_text())
    assert m["step"] == "autograd + torch.optim.SGD (fp32, compiled)" and m["epochs"] == 2
    a, b = weights_of(eager), weights_of(compiled)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # no _orig_mod. prefix


@pytest.mark.parametrize(
    "device, extra, says",
    [
        ("cuda", ["train.precision=fp32"], "(tf32"),  # the fused step, its matmuls in TF32 (runtime.use_tf32)
        ("cuda", ["train.precision=fp32", "optim.fused=false"], "(tf32"),
        ("cuda", ["train.precision=auto"], "(tf32"),  # CUDA's default until a GPU measured bf16: the fused TF32 step
        ("cuda", ["train.precision=bf16"], "(bf16"),  # the fused step, its products in bf16
        ("cpu", [], "(fp32"),  # the tests' configs pin fp32 (auto is bf16 on a CPU with native bf16)
        ("cpu", ["train.precision=bf16"], "(bf16"),
        ("cpu", ["train.precision=auto", "optim.cost=cross_entropy"], "(fp32"),  # autograd: no autocast under auto
    ],
)
def test_the_step_line_names_the_precision_the_matmuls_take(tiny_tree, make_config, device, extra, says):
    from hotdog_torch import runtime, step
    from hotdog_torch.model import build_model

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    device = torch.device(device)  # named only: the step is built, never run, so no GPU is needed
    try:
        runtime.use_tf32(device)
        cfg = make_config(tiny_tree, *extra)
        model = build_model(32 * 32, [4], 2)
        name = step.make_step(model, cfg, device).name
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
    assert says in name and not any(p in name for p in {"(tf32", "(bf16", "(fp32"} - {says}), name
