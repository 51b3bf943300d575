"""Training in several processes under torchrun: who this process is, its share of each batch, and the
collectives the loop and the fused step (step.layer_gradient) need.

    torchrun --standalone --nproc-per-node 2 -m hotdog_torch.train --config configs/hotdog.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is one process and nothing here does
anything.  gloo carries the collectives on the CPU, NCCL on CUDA, where each process takes the GPU of its
LOCAL_RANK.  optim.batch_size stays the global batch: of each batch of B images, rank r takes the
contiguous share [B·r/W, B·(r+1)/W) (shares differ by at most one image when W does not divide B), so every
image of an epoch is seen once, by one rank, and the order is the one a single process would take.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as td

from .config import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: how many times the workers were restarted
    run_id: str = ""  # torchrun's TORCHELASTIC_RUN_ID, the same across restarts

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The one process that writes the run folder, TensorBoard, checkpoints and metrics.json."""
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a batch of n."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


SINGLE = World()


def from_env() -> World:
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    return World(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        env.get("TORCHELASTIC_RUN_ID", ""),
    )


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); on CUDA, this rank's GPU is cuda:LOCAL_RANK."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"rank {world.rank} wants cuda:{world.local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        cuda = device if device.type == "cuda" else None
        td.init_process_group(backend, store=store(world), rank=world.rank, world_size=world.size, device_id=cuda)
    if not world.main:  # one process speaks for the run; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return device


def restarted_run(world: World, log_dir: str) -> str | None:
    """After torchrun restarted the workers (a worker died), the run folder of the first attempt, to resume
    from its last.pt: rank 0 noted it under log.dir, by torchrun's run id, when it made it, and reads it back."""
    if world.restart == 0 or not world.run_id:
        return None
    run_dir = None
    note = Path(log_dir) / f".torchrun-{world.run_id}"
    if world.main and note.is_file():  # rank 0 decides for all: the ranks could see the files differently
        run_dir = note.read_text().strip()
        run_dir = run_dir if (Path(run_dir) / "checkpoints" / "last.pt").is_file() else None
    return broadcast(world, run_dir)


def note_run(world: World, log_dir: str, run_dir=None) -> None:
    """rank 0's note of the run folder by torchrun's run id, for a restart to find (None: the run ended, removed)."""
    note = Path(log_dir) / f".torchrun-{world.run_id}"
    if world.distributed and world.main and world.run_id:
        note.write_text(f"{run_dir}\n") if run_dir is not None else note.unlink(missing_ok=True)


def store(world: World):
    """torchrun's key-value store, under a prefix of this attempt's own: after a restart, the process group must
    not find the dead attempt's addresses there (gloo would try to connect to them, and fail or hang)."""
    env = os.environ
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves it; else rank 0 does
    master = world.main and not agent
    tcp = td.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, master, timedelta(minutes=10))
    return td.PrefixStore(f"hotdog_torch/attempt_{world.restart}", tcp)


def main_first(world: World, fn):
    """fn() on rank 0, then on the others once it is done (rank 0 draws the data and builds the decode cache;
    the others find them built)."""
    if world.main:
        out = fn()
    barrier(world)
    return out if world.main else fn()


def finish(world: World) -> None:
    if world.distributed:
        if td.is_initialized():
            td.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        td.barrier()


def all_sum(world: World, t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (a no-op in one process)."""
    if world.distributed:
        td.all_reduce(t)
    return t


def all_rows(world: World, t: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's rows of a batch of n, stacked in rank order: this rank holds t = rows share(n) of it."""
    if not world.distributed:
        return t
    most = -(-n // world.size)  # ranks' shares differ by one at most: pad to the largest, then drop the padding
    padded = t.new_zeros(most, *t.shape[1:])
    padded[: len(t)] = t
    gathered = [torch.empty_like(padded) for _ in range(world.size)]
    td.all_gather(gathered, padded)
    shares = [n * (r + 1) // world.size - n * r // world.size for r in range(world.size)]
    return torch.cat([g[:s] for g, s in zip(gathered, shares, strict=True)])


def agree(world: World, flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request must stop them all at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if td.get_backend() == "nccl" else "cpu")
    return bool(all_sum(world, t).item())


def broadcast_weights(world: World, model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, once, as DistributedDataParallel does when it wraps a model:
    the fused steps apply one update on every rank, so the weights stay equal only if they start equal."""
    if world.distributed:
        for t in [*model.parameters(), *model.buffers()]:
            td.broadcast(t.data, src=0)


def all_objects(world: World, value) -> list:
    """Every rank's value, in rank order, on every rank ([value] in one process)."""
    if not world.distributed:
        return [value]
    out = [None] * world.size
    td.all_gather_object(out, value)
    return out


def broadcast(world: World, value):
    """rank 0's value, on every rank."""
    if not world.distributed:
        return value
    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]
