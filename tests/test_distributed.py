"""Training under torchrun, with real processes (gloo on the CPU): one run, the same training as one process,
every image once an epoch, and a worker killed mid-run that the restarted workers carry on from last.pt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config_file

from hotdog_torch import checkpoint, dist, loop, step
from hotdog_torch.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args, processes=2, restarts=0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launcher, f"--max-restarts={restarts}", "-m", "hotdog_torch.train", "--no-progress", *args]


def single(*args) -> list[str]:
    return [sys.executable, "-m", "hotdog_torch.train", "--no-progress", *args]


def train(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.mark.parametrize("n, batch, world", [(240, 16, 2), (240, 15, 2), (300, 64, 3), (7, 64, 2), (10, 3, 4)])
def test_every_image_is_taken_once_an_epoch_by_one_rank(n, batch, world):
    taken = []
    for rank in range(world):
        totals = [min(batch, n - s) for s in range(0, n, batch)]
        positions, bounds = loop.shares(totals, dist.World(rank, world))
        assert len(totals) == -(-n // batch) and sum(totals) == n and bounds[-1] == len(positions)
        for s, total in enumerate(totals):  # this rank's rows of step s lie inside step s's batch
            mine = positions[bounds[s] : bounds[s + 1]]
            assert all(s * batch <= p < s * batch + total for p in mine.tolist())
            assert abs(len(mine) - total / world) < 1  # the shares differ by one image at most
        taken += positions.tolist()
    assert sorted(taken) == list(range(n))  # disjoint, and together the whole epoch


MOMENTUM = dict(optim__batch_size=15)  # SGD with momentum 0.9, 3 epochs


@pytest.mark.torchrun("momentum", **MOMENTUM)
def test_two_processes_make_one_run_that_trains_as_one_process_does(torchrun_runs):
    run = torchrun_runs["momentum"]
    runs = run.two.parent
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["one", "two"]  # one folder each
    metrics = json.loads((runs / "two" / "metrics.json").read_text())
    assert metrics["step"] == "fused SGD with momentum 0.9 (fp32, 2 processes)" and metrics["epochs"] == 3
    assert run.out.count("epoch   1/3") == 1 and "stopped:" in run.out  # one process speaks for the run
    assert len(list((runs / "two").glob("events.out.tfevents.*"))) == 1
    # 15 a batch: shares of 7 and 8; the same SGD with momentum, summed in another order (and by other GEMM kernels:
    # 1.1e-5 apart on an AVX2-only EPYC after 48 steps, well under 1e-5 on AVX-512 ones; a wrong share is 1e-2 off)
    assert close(weights(runs / "one"), weights(runs / "two"), 3e-5)
    assert metrics["val_accuracy"] == pytest.approx(
        json.loads((runs / "one" / "metrics.json").read_text())["val_accuracy"]
    )


FULL_BATCH = dict(optim__batch_size=None, optim__momentum=0.0, optim__lr=2.0, train__epochs=5)


@pytest.mark.parametrize(
    "sync",
    [
        pytest.param(s, marks=pytest.mark.torchrun(f"full-{s}", **FULL_BATCH, train__ddp_sync=s))
        for s in ("factors", "gradients")
    ],
)
def test_full_batch_gradient_descent_matches_one_process(torchrun_runs, sync):
    run = torchrun_runs[f"full-{sync}"]
    assert close(weights(run.one), weights(run.two), 1e-5)


@pytest.mark.torchrun("autograd", optim__fused=False, optim__batch_size=15, train__epochs=2)
def test_the_autograd_step_under_ddp_matches_one_process(torchrun_runs):
    run = torchrun_runs["autograd"]
    assert "DistributedDataParallel over 2 processes" in run.out
    assert close(weights(run.one), weights(run.two), 1e-5)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    out = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=")[1]) for e in environ if e.startswith(b"LOCAL_RANK=")), None)
        if rank is not None:
            out[rank] = int(pid)
    return out


KILLED = dict(optim__batch_size=4, optim__lr=0.1, train__epochs=8)


@pytest.mark.torchrun("killed-straight", one=False, **KILLED)
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(torchrun_runs, small_tree, tmp_path):
    command = torchrun("--config", str(config_file(small_tree, tmp_path, "killed", **KILLED)), restarts=1)
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last, deadline = tmp_path / "runs" / "killed" / "checkpoints" / "last.pt", time.time() + 120
    while not (last.exists() and checkpoint.load(last)["epoch"] >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    os.kill(workers(launcher)[1], signal.SIGKILL)  # rank 1, mid-run
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "resuming from the end of epoch" in out  # the restarted workers went on from last.pt, in the same folder
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["killed"]  # torchrun's note gone at the end
    a, b = weights(torchrun_runs["killed-straight"].two), weights(tmp_path / "runs" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU


@pytest.mark.torchrun("momentum", **MOMENTUM)
@pytest.mark.torchrun("momentum-halfway", "train.epochs=2", one=False, **MOMENTUM)
def test_one_process_resumes_a_two_process_run(torchrun_runs):
    halfway = torchrun_runs["momentum-halfway"].two
    assert train_main(["--no-progress", "--resume", str(halfway), "train.epochs=3"]) == 0  # in this one process
    assert checkpoint.load(halfway / "checkpoints" / "last.pt")["epoch"] == 3
    assert close(weights(torchrun_runs["momentum"].two), weights(halfway), 1e-5)  # the same batches, summed otherwise


def test_ddp_sync_auto_picks_the_fewer_bytes_each_process_receives():
    two = dist.World(0, 2)
    # a 1024 -> 16 layer at 24 rows: the factors are more numbers than the gradient (24·1040 > 16·1024) but fewer
    # bytes, since a ring all-reduce moves each number twice (reduce-scatter, then all-gather), an all-gather once
    assert step.sync_bytes(two, 24, 16, 1024) == {"factors": 12 * 1040 * 4, "gradients": 16 * 1025 * 4}
    assert step.shares_factors(two, "auto", 24, 16, 1024) and not step.shares_factors(two, "auto", 64, 16, 1024)
    assert step.shares_factors(two, "factors", 64, 16, 1024) and not step.shares_factors(two, "gradients", 8, 16, 1024)


EMPTY_SHARE = dict(optim__batch_size=239, optim__fused=False, optim__lr=0.2, train__epochs=1)  # 240: 239, then 1


@pytest.mark.torchrun("empty-share", **EMPTY_SHARE)
def test_a_batch_of_one_image_leaves_one_rank_an_empty_share_and_trains_on(torchrun_runs):
    run = torchrun_runs["empty-share"]
    assert "diverged" not in run.out and "nan" not in run.out, run.out
    assert close(weights(run.one), weights(run.two), 1e-5)
    costs = [json.loads((r / "metrics.json").read_text())["train_cost"] for r in (run.one, run.two)]
    assert costs[1] == pytest.approx(costs[0], rel=1e-5), run.out


# rank r's process of torchrun, instrumented: it notes what it evaluates, its one-number all-reduces (the stop
# flag) and whether it built a probe batch; its initial weights are drawn from seed + r; rank 1 would stop at once
INSTRUMENTED = """
import os, sys, torch
import torch.distributed as td
from hotdog_torch import board, data, loop, stopping, train
rank = int(os.environ["RANK"])
log = open(f"{sys.argv[1]}.{rank}", "w", buffering=1)
seed, normalise, evaluate = torch.manual_seed, data.normalise, loop.evaluate
reduce, watch, counting = td.all_reduce, board.Board.watch, []

def normalised(images, *a, **k):  # the images an evaluation normalises (training's batches are not counted)
    if counting:
        log.write(f"evaluated {len(images)}\\n")
    return normalise(images, *a, **k)

def evaluating(*a, **k):
    counting.append(1)
    try:
        return evaluate(*a, **k)
    finally:
        counting.pop()

def reduced(t, *a, **k):
    log.write(f"all_reduce {t.numel()}\\n")
    return reduce(t, *a, **k)

def probed(self, *a, **k):
    watch(self, *a, **k)
    log.write(f"probe {getattr(self, 'probe_x', None) is not None}\\n")
    return self

torch.manual_seed = lambda s: seed(s + rank)
data.normalise, loop.evaluate, td.all_reduce, board.Board.watch = normalised, evaluating, reduced, probed
if rank == 1:
    stopping.verdict = lambda *a, **k: "target_accuracy"
sys.exit(train.main(sys.argv[2:]))
"""


def test_torchrun_shares_evaluation_weights_verdicts_and_the_stop_flag(small_tree, tmp_path):
    options = dict(optim__batch_size=15, optim__momentum=0.0, data__val_fraction=0.1, train__epochs=2)
    assert train_main(["--no-progress", "--config", str(config_file(small_tree, tmp_path, "one", **options))]) == 0
    launcher = torchrun("--config", str(config_file(small_tree, tmp_path, "two", **options)))
    i = launcher.index("-m", 3)
    launcher[i : i + 2] = ["--no-python", sys.executable, "-c", INSTRUMENTED, str(tmp_path / "log")]
    done = subprocess.run(launcher, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [(tmp_path / f"log.{r}").read_text().split("\n") for r in (0, 1)]
    wrong = []
    if [line for line in logs[1] if line.startswith("evaluated")] != ["evaluated 15"] * 2:  # its half of 30, twice
        wrong.append(f"rank 1 evaluated {[line for line in logs[1] if line.startswith('evaluated')]}")
    if "probe True" in logs[1]:
        wrong.append("rank 1 built a probe batch")
    flags = sum(line == "all_reduce 1" for line in logs[0])
    if flags > 2 * 5:  # 18 steps an epoch: the flag is agreed every few steps, not at every one
        wrong.append(f"{flags} stop-flag all-reduces in 2 epochs of 18 steps")
    m = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    if m["epochs"] != 2:  # rank 0's verdict (run every epoch) holds, not rank 1's
        wrong.append(f"{m['epochs']} epochs")
    if not close(weights(tmp_path / "runs" / "one"), weights(tmp_path / "runs" / "two"), 1e-5):
        wrong.append("the weights differ from one process's: rank 1 started from its own")
    assert not wrong, wrong


# after a restart, each rank asks which run to go on with; rank 1 sees a log.dir of its own (another node's disk)
RESTARTED = """
import os, sys
from pathlib import Path
import torch
os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"  # as torchrun sets it for the workers it restarted
from hotdog_torch import dist
world = dist.from_env()
dist.start(world, torch.device("cpu"))
shared, own, run_dir, out = sys.argv[1:5]
if world.main:
    dist.note_run(world, shared, run_dir)  # what rank 0 wrote when it made the run folder
answer = dist.restarted_run(world, shared if world.main else own)
Path(f"{out}.{world.rank}").write_text(str(answer))
dist.finish(world)
"""


def test_after_a_restart_rank_0_tells_every_rank_which_run_to_go_on_with(tmp_path):
    run_dir = tmp_path / "runs" / "first"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "own").mkdir()
    launcher = torchrun()[: torchrun().index("-m", 3)]
    args = [str(tmp_path / "runs"), str(tmp_path / "own"), str(run_dir), str(tmp_path / "answer")]
    done = subprocess.run([*launcher, "--no-python", sys.executable, "-c", RESTARTED, *args], capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"answer.{r}").read_text() for r in (0, 1)] == [str(run_dir)] * 2


@pytest.mark.torchrun("done", one=False, then=[], optim__batch_size=60, train__epochs=1)
def test_a_resume_with_nothing_to_resume_leaves_the_process_group(torchrun_runs):
    """Each job of the session's launch must end with exit code 0 and its process group left (Launched.printed,
    conftest.py): a first run, then a --resume of it that has nothing to do."""
    run = torchrun_runs["done"]
    assert "stopped:" in run.out
    assert "nothing to resume" in run.resumed


DROPOUT = dict(optim__batch_size=15, model__dropout=0.3, train__epochs=3)


@pytest.mark.torchrun("dropout", one=False, **DROPOUT)
@pytest.mark.torchrun("dropout-halfway", "train.epochs=1", one=False, then=["train.epochs=3"], **DROPOUT)
def test_torchrun_with_dropout_resumes_bit_identical(torchrun_runs):
    """Each rank draws its own dropout masks (seeded seed + rank): last.pt keeps every rank's generator, and each
    rank of the resumed run takes its own back, so the resumed run goes on exactly as the straight one.  (The resume
    comes after every other run of the launch: the processes' generators are wherever those left them.)"""
    assert "resuming from the end of epoch 1" in torchrun_runs["dropout-halfway"].resumed
    a, b = weights(torchrun_runs["dropout"].two), weights(torchrun_runs["dropout-halfway"].two)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
