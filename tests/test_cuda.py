"""CUDA checks: skipped on a machine without a GPU (CI); scripts/gpu_check.sh runs them on one."""

from __future__ import annotations

import json

import pytest
import torch

from hotdog_torch import checkpoint, data, loop, runtime, schedule, step, train
from hotdog_torch.model import build_model

pytestmark = pytest.mark.cuda


def test_data_lives_on_the_gpu_as_uint8(small_tree, make_config):
    cfg = make_config(small_tree, "device=cuda")
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False).to(torch.device("cuda"))
    assert ds.train.images.device.type == "cuda" and ds.train.images.dtype == torch.uint8
    assert ds.train.images is ds.val.images  # one pool, moved once


def test_the_epochs_clock_waits_for_the_gpus_queued_work():
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # a second or so of products, queued: the launches return at once
        x = torch.tanh(x @ x)
    runtime.clock(device)  # what train.py reads an epoch's seconds and images/s with
    assert torch.cuda.current_stream(device).query()  # nothing left running: the clock timed the work


@pytest.mark.parametrize(
    "extra, name",
    [
        (["train.precision=bf16"], "bf16"),  # the bf16 fused step, an explicit choice on CUDA
        (["train.precision=fp32"], "fused"),
        (
            ["data.augment.enabled=true", "train.precision=bf16"],
            "bf16",
        ),  # each image framed on the GPU: drawn and warped there
        (["data.augment.enabled=true", "train.precision=fp32"], "fused"),
    ],
)
def test_an_epoch_never_waits_for_the_host(small_tree, make_config, extra, name):
    cfg = make_config(small_tree, "device=cuda", *extra)
    device = torch.device("cuda")
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False).to(device)
    model = build_model(32 * 32, [16], 2).to(device)
    take = step.make_step(model, cfg, device)
    constant = schedule.Schedule(take.optimizer, cfg.optim, 100)
    assert name in take.name  # the tests' configs pin fp32: the fused step, TF32 products
    mean, std = (t.to(device) for t in data.normalisation(ds.train))
    loader = data.Loader(ds.train, mean, std, 16, 2, device, augment=cfg.data.augment)
    generator = torch.Generator().manual_seed(0)  # the batch order is drawn on the CPU whatever the device
    loop.train_one_epoch(take, loader, loop.epoch_order(loader, generator, 1), constant)  # warm-up
    order = loop.epoch_order(loader, generator, 2)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the epoch raises
    try:
        done = loop.train_one_epoch(take, loader, order, constant)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(done.costs).all()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.precision=fp32", "optim.momentum=0"],
        ["optim.batch_size=null", "optim.lr=2", "train.epochs=60"],
        ["train.compile=true"],
    ],
)
def test_a_tiny_run_learns_on_the_gpu(small_tree, make_config, extra):
    cfg = make_config(
        small_tree,
        "device=cuda",
        "train.epochs=40",
        "train.target_accuracy=0.85",
        "model.hidden=[32]",
        "optim.lr=0.2",
        *extra,
    )
    run_dir = train.run(cfg, progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["device"].startswith("cuda") and m["val_accuracy"] >= 0.85, m
    assert m["peak_memory_bytes"] > 0
    model = checkpoint.model_from(checkpoint.load(run_dir / "checkpoints/best.pt"))  # loads back on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_the_batch_order_is_the_cpus_and_a_gpu_run_resumes_on_the_cpu(small_tree, make_config):
    cfg = make_config(small_tree, "device=cuda", "train.epochs=2", "log.run_name=gpu")
    run_dir = train.run(cfg, progress=False)
    state = checkpoint.load(run_dir / "checkpoints/last.pt")["state"]["rng"]["batches"]
    assert (
        state.shape == torch.Generator().get_state().shape
    )  # a CPU generator's state: loadable by any process, any device
    resumed = train.run(make_config(small_tree, "device=cpu", "train.epochs=3"), progress=False, resume_dir=run_dir)
    assert checkpoint.load(resumed / "checkpoints/last.pt")["epoch"] == 3
