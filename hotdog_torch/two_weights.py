"""The seed's two-weight lesson: a bun neuron and a sausage neuron of a trained network, and two weights on top.

A network is trained as usual.  Of its hidden neurons, the most bun-like is the one that fires most more for
the bun-only negatives (sliced buns, the Philly cheese steaks among them) than for the sausage-only ones (bare
sausages), on the training images; the most sausage-like is the one with the largest difference the other way.
Their two activations are the only inputs of a network cut down to the seed's two weights and two biases:

    z = w1·bun + w2·sausage,   hot_dog = σ(z + b1),   not_hot_dog = σ(−z + b2)

Gradient descent on ½·MSE moves (w1, w2, b1, b2) from a random start; random draws of the same four numbers
(the seed's iterations 1, 2, 3, ...) are scored beside it.  The picture shows the cost surface over (w1, w2),
the draws and the descent path, and the validation images as points in (bun, sausage) space with the line
the descended weights draw between hot dog and not hot dog.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import board, checkpoint, config, data, synth, train
from .config import UserError
from .cost import half_mse, one_hot
from .model import linear_layers


def quiet_run(cfg: config.Config, name: str, runner=train.run) -> Path:
    """An ordinary training run (or runner's: search.run) whose epoch lines go to its train.log, not the console."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run_dir = runner(cfg, name, progress=False)
    (run_dir / "train.log").write_text(out.getvalue())
    return run_dir


def hidden_activations(model, split: data.Split, mean, std) -> torch.Tensor:
    """(N, H): what each first-layer hidden neuron answers to each image of the split."""
    layers = list(model)
    first = linear_layers(model)[0]
    x = data.normalise(split.batch(torch.arange(len(split))), mean, std).flatten(1)
    with torch.no_grad():
        return layers[layers.index(first) + 1](first(x))  # the activation that follows the first layer


def shows(split: data.Split, root) -> list[str]:
    """What each image shows, "kind/variant" (synth's manifest.json), or "kind/" from the file name without it."""
    manifest = synth.manifest(root)
    out = []
    for p in split.paths:
        what = manifest.get(Path(os.path.relpath(p, root)).as_posix())
        out.append(what or Path(p).stem.rsplit("_", 1)[0] + "/")
    return out


def pick_neurons(activations: torch.Tensor, what: list[str]) -> dict:
    """The most bun-like and the most sausage-like neuron, each with the way round it signals (fires, or goes quiet).

    A sigmoid neuron can signal a bun by firing (a near 1) or by going quiet (a near 0, read as 1 − a); the layer
    above learns either sign.  Read each way round, a neuron's bun score is the lower of its mean answers to hot
    dogs and to bun-only images (sliced buns, cheese steaks among them) minus its mean answer to sausage-only
    images (bare sausages); its sausage score is the lower of its answers to hot dogs and to sausage-only images
    minus its answer to bun-only images.  Each feature is the highest-scoring neuron, read its way round.
    """
    group = {k: torch.tensor([w.startswith(k + "/") for w in what]) for k in ("hot_dog", "sliced_bun", "sausage")}
    best = {}
    for name, same, other in (("bun", "sliced_bun", "sausage"), ("sausage", "sausage", "sliced_bun")):
        for sign, a in ((1, activations), (-1, 1 - activations)):
            m = {k: a[g].mean(0) for k, g in group.items()}
            score = torch.minimum(m["hot_dog"], m[same]) - m[other]
            j = int(score.argmax())
            if name not in best or score[j] > best[name]["score"]:
                answers = {k: float(v[j]) for k, v in m.items()}
                best[name] = {"neuron": j, "sign": sign, "score": float(score[j]), "mean_answers": answers}
    return best


def features(activations: torch.Tensor, neurons: dict) -> torch.Tensor:
    """(N, 2): how strongly each image makes the bun neuron and the sausage neuron signal, in [0, 1]."""
    cols = [activations[:, n["neuron"]] if n["sign"] > 0 else 1 - activations[:, n["neuron"]] for n in neurons.values()]
    return torch.stack(cols, dim=1)


def outputs(w: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The cut-down network: z = w1·bun + w2·sausage; hot_dog = σ(z + b1), not_hot_dog = σ(−z + b2)."""
    z = f @ w
    return torch.sigmoid(torch.stack([z + b[0], -z + b[1]], dim=-1))


def error_rate(w, b, f, labels) -> float:
    return (outputs(w, b, f).argmax(-1) != labels).float().mean().item()


def train_score(w, b, f, labels) -> tuple[float, float]:
    """How random search ranks a draw, as train.py's does: training error rate, then training cost."""
    out = outputs(w, b, f)
    return (out.argmax(-1) != labels).float().mean().item(), half_mse(out, one_hot(labels, 2)).item()


def descend(f, targets, lr: float, passes: int, generator) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Full-batch gradient descent on ½·MSE from nn.Linear's random start; returns (w, b, path of w, costs)."""
    bound = 1 / math.sqrt(2)  # nn.Linear's initial distribution for 2 inputs
    w = ((torch.rand(2, generator=generator) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(2, generator=generator) * 2 - 1) * bound).requires_grad_()
    path, costs = [w.detach().clone().numpy()], []
    for _ in range(passes):
        cost = half_mse(outputs(w, b, f), targets)  # C = ½ · mean Σ (a − y)²
        gw, gb = torch.autograd.grad(cost, [w, b])
        with torch.no_grad():
            w -= lr * gw  # w <- w − lr · ∂C/∂w
            b -= lr * gb
        path.append(w.detach().clone().numpy())
        costs.append(cost.item())
    return w.detach(), b.detach(), path, costs


def random_draws(n: int, scale: float, generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shot in the dark: n draws of (w1, w2) and (b1, b2), the weights from `scale` times the initial range."""
    bound = 1 / math.sqrt(2)
    return [
        (
            (torch.rand(2, generator=generator) * 2 - 1) * bound * scale,
            (torch.rand(2, generator=generator) * 2 - 1) * bound,
        )
        for _ in range(n)
    ]


def run(lesson: dict, parent: Path, quick: bool) -> dict:
    """Train the network, pick its two neurons, descend and draw on two weights, draw the picture."""
    extra = list(lesson.get("overrides", [])) + (list(lesson.get("quick", [])) if quick else [])
    cfg = config.load(lesson["base"], extra + [f"log.dir={parent}", "log.run_name=network"])
    if not cfg.model.hidden:  # the two features are hidden neurons
        raise UserError("the two-weight lesson needs a hidden layer (its bun and sausage neurons); set model.hidden")
    run_dir = quiet_run(cfg, "network")
    ckpt = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    model, mean, std = checkpoint.model_from(ckpt), torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    ds = data.load_dataset(cfg.data, cfg.seed, progress=False)
    acts = {s: hidden_activations(model, getattr(ds, s), mean, std) for s in ("train", "val")}
    what = {s: shows(getattr(ds, s), cfg.data.root) for s in ("train", "val")}
    neurons = pick_neurons(acts["train"], what["train"])
    f = {s: features(acts[s], neurons) for s in acts}
    labels = {"train": ds.train.labels, "val": ds.val.labels}
    g = torch.Generator().manual_seed(cfg.seed)
    w, b, path, costs = descend(f["train"], one_hot(labels["train"], 2), float(lesson["lr"]), int(lesson["budget"]), g)
    draws = random_draws(int(lesson["budget"]), float(lesson.get("random_scale", 1.0)), g)
    kept = min(draws, key=lambda d: train_score(*d, f["train"], labels["train"]))  # chosen on training images
    draw_errors = [error_rate(dw, db, f["val"], labels["val"]) for dw, db in draws[:3]]
    hot = ds.classes.index(synth.HOT_DOG)
    result = {
        "passes": int(lesson["budget"]),
        "network": str(run_dir),
        "neurons": neurons,
        "gd_val_error_rate": error_rate(w, b, f["val"], labels["val"]),
        "majority_val_error_rate": (labels["val"] == hot).float().mean().item(),  # always "not hot dog"
        "random_best_val_error_rate": error_rate(*kept, f["val"], labels["val"]),
        "random_first_val_error_rates": draw_errors,
        "gradient_descent": {"w": w.tolist(), "b": b.tolist(), "start_cost": costs[0], "cost": costs[-1]},
        "picture": str(parent / "landscape.png"),
    }
    picture = plot(result, f, labels, what["val"], path, draws, hot)
    picture.save(parent / "landscape.png")
    log(parent, costs, picture)
    return result


def summary(r: dict) -> str:
    """The lesson in a sentence."""

    def named(n: dict) -> str:
        return f"hidden neuron {n['neuron']}" + ("" if n["sign"] > 0 else " (it signals by going quiet: read as 1 − a)")

    return (
        f"The bun neuron is {named(r['neurons']['bun'])}, the sausage neuron {named(r['neurons']['sausage'])}. "
        f"Gradient descent on the two weights over them reached a validation error rate of "
        f"{_pct(r['gd_val_error_rate'])}, against {_pct(r['majority_val_error_rate'])} for always answering "
        f'"not hot dog" and {_pct(r["random_best_val_error_rate"])} for the best of {r["passes"]} random draws. '
        f"Picture: `{r['picture']}`."
    )


def _pct(x: float) -> str:
    return f"{x:.2%}"


def log(parent: Path, costs: list[float], picture: Image.Image) -> None:
    tb = board.Board(parent / "gradient_descent")
    tb.steps("cost/train", costs, 1)
    tb.picture("lesson/two_weights", picture, len(costs))
    tb.close()


def cost_surface(f, targets, b, span: float, n: int = 81):
    """½·MSE over a grid of (w1, w2), with the biases that gradient descent found."""
    grid = np.linspace(-span, span, n)
    W = torch.tensor(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1), dtype=torch.float32).view(-1, 2)
    z = f @ W.T  # (N, n·n)
    out = torch.sigmoid(torch.stack([z + b[0], -z + b[1]], -1))
    return grid, (0.5 * ((out - targets[:, None, :]) ** 2).sum(-1).mean(0)).view(n, n).numpy()


def plot(result: dict, f, labels, what_val, path, draws, hot: int) -> Image.Image:
    """Left: the cost over (w1, w2), the random draws, the descent path.  Right: the validation images in
    (bun, sausage) space, the cheese steaks and bare sausages marked, and the final weights' decision line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), dpi=100)
    plot_surface(fig, left, result, f, labels, path, draws)
    plot_images(right, result, f["val"].numpy(), labels["val"].numpy(), what_val, hot)
    gd, maj, rnd = (result[k] for k in ("gd_val_error_rate", "majority_val_error_rate", "random_best_val_error_rate"))
    title = f"Gradient descent on two weights: {gd:.1%} validation error, against {maj:.1%} for always "
    fig.suptitle(title + f'"not hot dog" and {rnd:.1%} for the best of {len(draws)} random draws', fontsize=14)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def plot_surface(fig, ax, result, f, labels, path, draws) -> None:
    b = torch.tensor(result["gradient_descent"]["b"])
    points = np.concatenate([np.array(path), np.array([d[0].numpy() for d in draws[:3]])])
    span = max(4.0, float(np.abs(points).max()) * 1.15)
    grid, costs = cost_surface(f["train"], one_hot(labels["train"], 2), b, span)
    shade = ax.contourf(grid, grid, costs.T, levels=30, cmap="viridis")
    fig.colorbar(shade, ax=ax, label="cost ½·MSE on the training images")
    ws = np.array([d[0].numpy() for d in draws])
    inside = (np.abs(ws) <= span).all(1)
    ax.scatter(ws[inside, 0], ws[inside, 1], s=10, c="white", alpha=0.5, label="random draws (1, 2, 3: the first)")
    for k, (dw, _) in enumerate(draws[:3], start=1):
        ax.annotate(str(k), dw.numpy(), fontsize=11, ha="center", va="center", bbox=dict(boxstyle="circle", fc="w"))
    p = np.array(path)
    ax.plot(p[:, 0], p[:, 1], color="red", lw=2.5, label="gradient descent")
    ax.plot(*p[0], "o", color="red", ms=9, label="its random start")
    ax.plot(*p[-1], "*", color="yellow", ms=18, mec="black", label="where it ended")
    ax.set(xlabel="w1: weight of the bun neuron", ylabel="w2: weight of the sausage neuron")
    ax.set_title("the cost over the two weights (biases as descended)")
    ax.legend(loc="upper left", fontsize=10, framealpha=0.9)


def plot_images(ax, result, f, labels, what, hot: int) -> None:
    """The validation images at (bun, sausage), the bun-only and sausage-only negatives marked, the decision line."""
    w, b = (np.array(result["gradient_descent"][k]) for k in ("w", "b"))
    kind, cheese = np.array([w.split("/")[0] for w in what]), np.array([w == "sliced_bun/cheese_steak" for w in what])
    groups = [
        ("other not hot dogs", (labels != hot) & (kind != "sliced_bun") & (kind != "sausage"), "darkgray", ".", 12),
        ("bare sausage (no bun)", kind == "sausage", "saddlebrown", "^", 22),
        ("sliced bun, no sausage", (kind == "sliced_bun") & ~cheese, "goldenrod", "s", 18),
        ("Philly cheese steak (bun, no sausage)", cheese, "darkorange", "x", 36),
        ("hot dog", labels == hot, "crimson", "o", 26),
    ]
    for name, mask, colour, marker, size in groups:
        ax.scatter(f[mask, 0], f[mask, 1], c=colour, marker=marker, s=size, alpha=0.7, label=f"{name} ({mask.sum()})")
    # the decision line: hot dog where z + b1 > −z + b2, i.e. w1·bun + w2·sausage > (b2 − b1) / 2
    xx, yy = np.meshgrid(np.linspace(-0.05, 1.05, 221), np.linspace(-0.05, 1.05, 221))
    side = w[0] * xx + w[1] * yy - (b[1] - b[0]) / 2
    ax.contourf(xx, yy, side, levels=[0, np.inf], colors=["crimson"], alpha=0.08)
    ax.contour(xx, yy, side, levels=[0], colors="black", linestyles="dashed", linewidths=2)
    ax.plot([], [], "k--", lw=2, label='decision line: "hot dog" on the shaded side')
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    ax.set(xlabel="how strongly the bun neuron signals", ylabel="how strongly the sausage neuron signals")
    ax.set_title("validation images, and where the two weights split them")
    ax.legend(loc="center", fontsize=10, framealpha=0.9)
