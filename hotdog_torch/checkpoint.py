"""Atomic save and safe load of a trained network.

A checkpoint holds everything needed to classify a photo without the original
config or data: the weights, the resolved config, the class names, the input
size and channels and the normalisation.  It is written atomically and read
with torch.load(weights_only=True), so a checkpoint from someone else cannot
run code.
"""

from __future__ import annotations

import io
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dist
from .config import Augment, Optim, Train, UserError
from .config import Router as RouterSettings
from .files import atomic_write
from .model import build_model, input_side
from .optim import set_hyper
from .router import Routed, build

FORMAT = 1


@dataclass
class RunState:
    """What the loop knows besides the weights and the optimiser: enough to resume a run exactly."""

    epoch: int = 0  # the last finished epoch
    global_step: int = 0  # the optimiser steps taken (TensorBoard's x axis)
    best: dict | None = None  # the metrics of the best epoch so far (best.pt)
    history: list = field(default_factory=list)  # every finished epoch's metrics
    stopped_because: str | None = None
    seconds: float = 0.0  # of training so far, every resume included
    train_seconds: float = 0.0  # of steady-state epochs (after the first), for images/s
    train_images: int = 0
    epoch_progress: dict | None = None  # an epoch stopped part-way: its batch order, next step, costs so far
    rng: dict | None = None  # every random generator's state (rng_state)
    divergence: dict | None = None  # stopping.DivergenceWatch's state
    schedule: dict | None = None  # schedule.Schedule's state (plateau's counters and cuts)
    bad_epochs: int = 0  # epochs since train.monitor last improved by more than train.min_delta
    reference: dict | None = None  # the metrics of that last improvement
    top_k: list = field(default_factory=list)  # train.keep_top_k: the metrics of the epochs kept, best first
    router: dict | None = None  # model.router: its phase (router_training.Phase.state), done or where it stopped

    def count(self, seconds: float, images: int) -> None:
        """A steady-state epoch's time and images, for images/s."""
        self.train_seconds, self.train_images = self.train_seconds + seconds, self.train_images + images

    def as_dict(self) -> dict:
        return dict(vars(self))


def on_cpu(progress: dict | None) -> dict | None:
    """An epoch's progress (its order, costs, wrong counts) moved to the CPU for saving."""
    return None if progress is None else {k: v.cpu() if torch.is_tensor(v) else v for k, v in progress.items()}


def rng_state(generator, world: dist.World = dist.SINGLE) -> dict:
    """Every random number generator's state, as plain data and tensors (loadable with weights_only=True).

    Under torchrun each rank draws its own dropout masks from torch's generators: "ranks" holds every rank's
    (a collective: every rank calls this at the same point)."""
    np_state = np.random.get_state()
    numpy = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}
    numpy.update(has_gauss=int(np_state[3]), gauss=float(np_state[4]))
    own = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return {
        "batches": generator.get_state(),
        **own,
        "ranks": dist.all_objects(world, own),
        "numpy": numpy,
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }


def set_rng_state(generator, state: dict, rank: int | None = None) -> None:
    """The generators as rng_state saved them; torch's are this rank's own (rank: torchrun's, by default; a rank the
    saved run did not have keeps the seed it was given, seed + rank, as a new run's would)."""
    generator.set_state(state["batches"])
    rank = dist.from_env().rank if rank is None else rank
    ranks = state.get("ranks") or [state]  # a checkpoint from before "ranks": rank 0's alone
    if rank < len(ranks):
        torch.set_rng_state(ranks[rank]["torch"])
        if ranks[rank]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ranks[rank]["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    *keys, version = state["python"]
    random.setstate((version, tuple(keys), None))


def meta(config: dict, classes: list[str], mean, std) -> dict:
    """What predict needs besides the weights: the config, the class names, the input size and normalisation."""
    image = {"image_size": config["data"]["image_size"], "channels": config["data"]["channels"]}
    normalisation = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return {"config": config, "classes": list(classes), **image, **normalisation}


def save(path, model, optimizer, meta: dict, metrics: dict, state: RunState, resumable=True, router=None, extra=None):
    """Atomically: the weights (the router's too, if any), meta(), the epoch and its metrics; when resumable
    (last.pt), also the optimiser and the loop's state for --resume (best.pt, for using the network, goes without
    them: half the size); extra: what the run's owner records beside them (run_files.RunFiles)."""
    payload = {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if router is not None:
        payload["router"] = {k: v.detach().cpu() for k, v in router.state_dict().items()}
    payload["optimizer"] = optimizer.state_dict() if resumable and optimizer is not None else None
    payload |= meta
    payload |= {"epoch": state.epoch, "step": state.global_step, "metrics": metrics}
    payload["state"] = state.as_dict() if resumable else None
    payload |= extra or {}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if refused is None:  # the unpickler met bytes it cannot read at all
            raise UserError(f"checkpoint {path} is damaged or not a hotdog_torch checkpoint") from None
        what = "holds code or objects other than weights and plain data, so it was not loaded"
        raise UserError(f"checkpoint {path} {what} ({refused})") from None
    except Exception:  # noqa: BLE001 - whatever the unpickler trips on in a file that is not ours, the file is at fault
        raise UserError(f"checkpoint {path} is damaged or not a hotdog_torch checkpoint") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"checkpoint {path} is not a hotdog_torch checkpoint")
    if ckpt["format"] != FORMAT:
        raise UserError(
            f"checkpoint {path} has format version {ckpt['format']}, but this hotdog_torch reads version {FORMAT}"
        )
    return ckpt


def model_from(ckpt: dict) -> torch.nn.Module:
    """The network a checkpoint describes, with its weights, on the CPU, in eval mode: the MLP, or with a router
    the router and the MLP (router.Routed: find, then judge)."""
    m = ckpt["config"]["model"]
    side = input_side(ckpt["image_size"], (m.get("router") or {}).get("size"))
    width, n = ckpt["channels"] * side**2, len(ckpt["classes"])
    model = build_model(width, m["hidden"], n, m["activation"], m.get("dropout", 0.0))
    model.load_state_dict(ckpt["model"])
    if ckpt.get("router") is None:
        return model.eval()
    return Routed(router_from(ckpt), model).eval()


def router_from(ckpt: dict):
    """The router a checkpoint holds, with its weights, on the CPU."""
    settings = RouterSettings(**ckpt["config"]["model"]["router"])
    net = build(ckpt["channels"], settings, Augment(**ckpt["config"]["data"]["augment"]))
    net.load_state_dict(ckpt["router"])
    return net


def restore(resumed: dict, model, optimizer, generator, run_dir, train: Train, given: Optim) -> RunState:
    """Load last.pt's weights, optimiser, generators and loop state; its stopped_because stays set when the run has
    nothing left to do.

    The optimiser's numbers are then the config's (`given`: the run's config.yaml and the overrides), which the
    log line names when they differ from the checkpoint's."""
    saved = resumed["config"]["optim"]
    if resumed.get("trained_by") == "random_search":
        raise UserError(f"{run_dir} is a random search (python -m hotdog_torch.search): it has no descent to go on")
    if saved["name"] != given.name:
        raise UserError(
            f"{run_dir} was trained with optim.name={saved['name']}: its optimiser state cannot go on as "
            f"{given.name}; resume without that override, or start a new run"
        )
    try:
        model.load_state_dict(resumed["model"])
        if resumed["optimizer"] is not None:
            optimizer.load_state_dict(resumed["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0][:100]
        raise UserError(f"{run_dir}/checkpoints/last.pt does not fit this config's model ({reason})") from None
    state = RunState(**saved_state(resumed["state"]))
    set_rng_state(generator, state.rng)
    if state.stopped_because is not None and (advice := still_stopped(state, train)):
        print(f"{run_dir} already finished ({state.stopped_because}); nothing to resume. {advice}")
        return state  # still stopped: nothing to train
    state.stopped_because = None
    set_hyper(optimizer, given)
    changed = {k: (saved.get(k), v) for k, v in vars(given).items() if saved.get(k) != v}
    if changed:
        print("changed on resume: " + ", ".join(f"optim.{k} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)
    p = state.epoch_progress
    where = f"epoch {state.epoch + 1}, step {p['next'] + 1} of it" if p else f"the end of epoch {state.epoch}"
    print(f"resuming from {where} (global step {state.global_step})", flush=True)
    return state


def saved_state(saved: dict) -> dict:
    """A last.pt's RunState fields, as this version names them (before: `step`, and random search's kept score)."""
    saved = dict(saved)
    if "step" in saved:
        saved["global_step"] = saved.pop("step")
    saved.pop("search_kept", None)
    return saved


def still_stopped(state: RunState, train: Train) -> str | None:
    """What a finished run needs to train on (None: the config given lets it): the limit that stopped it raised.

    As stopping.verdict would judge its last epoch again under the config given; like Lightning's EarlyStopping,
    the early-stopping state (epochs without improvement, the figure to beat) goes on from where it was."""
    if state.stopped_because == "diverged":
        return "Its cost diverged: start a new run, with a lower optim.lr."
    last, need = state.history[-1] if state.history else {}, []
    if train.epochs <= state.epoch:
        need.append(f"train.epochs=N above {state.epoch}")
    accuracy, target = last.get("val_accuracy", 0.0), train.target_accuracy
    if state.stopped_because == "target_accuracy" and target is not None and accuracy >= target:
        need.append(f"train.target_accuracy above {accuracy:.6g} (or null)")
    if state.stopped_because == "no_improvement" and train.patience is not None and state.bad_epochs >= train.patience:
        need.append(f"train.patience above {state.bad_epochs} (or null)")
    return f"To train on, pass {' and '.join(need)}." if need else None
