"""The CPU threads of a run: one intra-op thread for a small network, and subnormal floats flushed to zero in every
thread of training and of using a network (train.flush_denormal).

x86 arithmetic on subnormals (|x| < 1.2e-38 in fp32) is many times slower, and ½·MSE on saturated sigmoids makes
them: the momentum step ran 4-5x slower with them (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from hotdog_torch import checkpoint, loop, runtime, train
from hotdog_torch.evaluate import evaluate_folder
from hotdog_torch.predict import Classifier

CPU = torch.device("cpu")
N = 1 << 17  # long enough for ATen to split the product over its intra-op threads


def subnormal_products() -> int:
    """How many of N products 1e-20 · 1e-20 = 1e-40 (subnormal in fp32) come out nonzero."""
    x = torch.full((N,), 1e-20)
    return int(torch.count_nonzero(x * x))


@pytest.fixture
def flush_off():
    torch.set_num_threads(runtime.DEFAULT_THREADS)  # as a new process has them, whatever ran before in this one
    subnormal_products()  # the OpenMP team exists before the flag changes, as in any process that has computed
    runtime.flush_denormal(False, CPU)  # whatever ran before in this process (evaluate, predict flush and keep it)
    yield
    runtime.flush_denormal(False, CPU)  # torch's default, for the tests that follow
    torch.set_num_threads(runtime.DEFAULT_THREADS)


def test_flush_holds_in_every_intra_op_thread(flush_off):
    assert torch.get_num_threads() == 1 or subnormal_products() == N
    assert runtime.flush_denormal(True, CPU)
    assert subnormal_products() == 0  # torch.set_flush_denormal alone leaves the other threads' share subnormal
    a = torch.full((128, 128), 1e-22)
    assert int(torch.count_nonzero(a @ a)) == 0  # MKL's GEMM threads too: each sum is 128 · 1e-44
    assert not runtime.flush_denormal(False, CPU)
    assert subnormal_products() == N
    assert not runtime.flush_denormal("auto", torch.device("cuda"))  # auto: on for CPU runs only


def test_training_evaluate_and_predict_flush_on_the_cpu(tiny_tree, make_config, flush_off, monkeypatch):
    seen, epoch = [], loop.train_one_epoch  # what an epoch's arithmetic does with subnormals, as it starts

    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: seen.append(subnormal_products()) or epoch(*a, **k))
    train.run(
        make_config(tiny_tree, "train.epochs=1", "train.flush_denormal=false", "log.run_name=unflushed"), progress=False
    )
    run_dir = train.run(make_config(tiny_tree, "train.epochs=1", "log.run_name=flushed"), progress=False)
    assert seen == [N, 0]  # auto on the CPU: on, while the run trains
    ckpt = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    ckpt["config"]["train"]["flush_denormal"] = False
    Classifier(ckpt)  # predict and the app use the run's setting
    assert subnormal_products() == N
    del ckpt["config"]["train"]["flush_denormal"]  # a checkpoint from before the key: auto
    evaluate_folder(ckpt, tiny_tree / "test")
    assert subnormal_products() == 0


def test_a_small_network_trains_on_one_intra_op_thread(tiny_tree, make_config, flush_off, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen, epoch, before = [], loop.train_one_epoch, torch.get_num_threads()
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: seen.append(torch.get_num_threads()) or epoch(*a, **k))
    train.run(make_config(tiny_tree, "train.epochs=1", "log.run_name=small"), progress=False)  # 16 x 1024 x 16
    assert seen == [1] and torch.get_num_threads() == before  # one thread while it trains; the caller's after
    assert runtime.intra_op_threads(CPU, [49152, 512, 2], 64) == runtime.DEFAULT_THREADS  # the bench's network
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert runtime.intra_op_threads(CPU, [784, 30, 10], 10) == 2  # the user's setting wins


def test_a_run_called_in_process_leaves_the_callers_arithmetic_as_it_was(small_tree, make_config):
    from hotdog_torch import runtime, train

    assert not runtime.flushing()
    train.run(make_config(small_tree, "train.epochs=1", "log.run_name=in-process"), progress=False)
    assert not runtime.flushing()  # the run flushed subnormals (auto, on the CPU) only while it ran
