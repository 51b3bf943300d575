"""The seed's lessons as runnable experiments: python -m hotdog_torch.lessons [--quick]

Each lesson is a YAML file under configs/lessons/: a base config, overrides for
every arm, and the arms (or a sweep of one key).  Every arm is an ordinary
training run under runs/lessons-<timestamp>/<lesson>/<arm>/, so TensorBoard
overlays them (`tensorboard --logdir runs/lessons-<timestamp>`); summary.md and
summary.json beside them say what each arm reached.  The two-weight lesson is
drawn by this module itself: a network cut down to two weights and two biases
over two image features, its cost surface, random samples and the gradient-descent path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from . import board, checkpoint, config, data, train
from .config import UserError
from .cost import half_mse, one_hot
from .model import build_model

LESSONS = Path(__file__).resolve().parents[1] / "configs" / "lessons"


# ---------------------------------------------------------------- running arms


def as_yaml(value) -> str:
    """A value as a YAML override: 1e+38 must stay a number."""
    return yaml.safe_dump(value, default_flow_style=True).replace("\n...", "").strip()


def arms_of(lesson: dict) -> dict[str, list[str]]:
    if "sweep" in lesson:
        key, values = lesson["sweep"]["key"], lesson["sweep"]["values"]
        return {
            f"{key.split('.')[-1]}={v:g}" if isinstance(v, (int, float)) else f"{key}={v}": [f"{key}={as_yaml(v)}"]
            for v in values
        }
    return {name: list(overrides) for name, overrides in lesson["arms"].items()}


def run_arm(lesson: dict, arm: str, overrides: list[str], parent: Path, quick: bool) -> dict:
    extra = list(lesson.get("overrides", [])) + (list(lesson.get("quick", [])) if quick else []) + overrides
    cfg = config.load(lesson["base"], extra + [f"log.dir={parent}", f"log.run_name={arm}"])
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the arm's epoch lines go to its log, not the console
        run_dir = train.run(cfg, arm, progress=False)
    (run_dir / "train.log").write_text(out.getvalue())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    history = last["state"]["history"]
    target = cfg.train.target_accuracy or 0.99
    hit = next((m for m in history if m["val_accuracy"] >= target), None)
    torch.manual_seed(cfg.seed)  # the arm's starting weights, drawn again the way train.run drew them
    start = build_model(
        cfg.data.channels * cfg.data.image_size**2, cfg.model.hidden, len(last["classes"]), cfg.model.activation
    ).state_dict()
    moved = math.sqrt(sum(float(((last["model"][k].float() - start[k]) ** 2).sum()) for k in start))
    return {
        "arm": arm,
        "optimiser": cfg.optim.name,
        "cost": cfg.optim.cost,
        "lr": cfg.optim.lr,
        "passes": len(history),
        "first_train_cost": history[0]["train_cost"],
        "final_train_cost": history[-1]["train_cost"],
        "final_train_error_rate": history[-1]["train_error_rate"],
        "best_val_accuracy": metrics["val_accuracy"],
        "stopped_because": metrics["stopped_because"],
        "passes_to_target": hit["epoch"] if hit else None,
        "seconds_to_target": sum(m["seconds"] for m in history[: hit["epoch"]]) if hit else None,
        "seconds": sum(m["seconds"] for m in history),
        "weight_change": moved,
        "target": target,
        "run": str(run_dir),
    }


def sweep_verdict(r: dict) -> str:
    if r["stopped_because"] == "diverged":
        return "too high: diverged (the run stopped itself)"
    if r["passes_to_target"] is not None:
        return f"worked: {r['target']:.0%} in {r['passes_to_target']} passes"
    if r["final_train_cost"] >= 0.98 * r["first_train_cost"]:  # nothing learnt after the first epoch
        return "too high: overshot; the first steps saturated every neuron, so the slope is 0 and learning stopped"
    return "too low: the cost is still falling slowly"


# ---------------------------------------------------------------- two weights and two biases


def features(split: data.Split) -> torch.Tensor:
    """Two numbers per image: redness (red over green and blue in the centre) and elongation (wide over tall)."""
    x = split.batch(torch.arange(len(split))).float() / 255  # (N, 3, S, S)
    s = x.shape[-1]
    centre = x[:, :, s // 4 : 3 * s // 4, s // 8 : 7 * s // 8]
    redness = (centre[:, 0] - (centre[:, 1] + centre[:, 2]) / 2).mean(dim=(1, 2))
    gray = x.mean(dim=1)
    border = torch.cat([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], dim=1).median(dim=1).values
    w = (gray - border.view(-1, 1, 1)).abs()
    w = w / w.sum(dim=(1, 2), keepdim=True).clamp_min(1e-9)
    coords = torch.arange(s, dtype=torch.float32)
    mx, my = (w.sum(1) * coords).sum(1), (w.sum(2) * coords).sum(1)
    vx = (w.sum(1) * (coords - mx[:, None]) ** 2).sum(1)
    vy = (w.sum(2) * (coords - my[:, None]) ** 2).sum(1)
    elongation = (vx - vy) / (vx + vy).clamp_min(1e-9)
    return torch.stack([redness, elongation], dim=1)


def two_weight_outputs(w: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The cut-down network: z = w1·redness + w2·elongation; hot_dog = σ(z + b1), not_hot_dog = σ(−z + b2)."""
    z = f @ w
    return torch.sigmoid(torch.stack([z + b[0], -z + b[1]], dim=-1))


def surface_picture(grid_w1, grid_w2, costs, path, samples, best) -> Image.Image:
    """The cost over (w1, w2) as a heat map (dark = low), the random samples (dots), the descent path (white line)."""
    size, margin = 420, 40
    lo, hi = costs.min(), costs.max()
    t = ((costs - lo) / (hi - lo + 1e-12)).T[::-1]  # rows = w2 from high to low
    stops = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], float)
    idx = t * (len(stops) - 1)
    low = np.floor(idx).astype(int).clip(0, len(stops) - 2)
    frac = (idx - low)[..., None]
    rgb = (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)
    heat = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    img = Image.new("RGB", (size + 2 * margin, size + 2 * margin), "white")
    img.paste(heat, (margin, margin))
    d = ImageDraw.Draw(img)
    w1min, w1max, w2min, w2max = grid_w1[0], grid_w1[-1], grid_w2[0], grid_w2[-1]

    def at(p):
        return (margin + (p[0] - w1min) / (w1max - w1min) * size, margin + (w2max - p[1]) / (w2max - w2min) * size)

    for p in samples:
        x, y = at(p)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 255, 255))
    d.line([at(p) for p in path], fill="white", width=2)
    for p, colour in ((path[0], "white"), (path[-1], "red"), (best, (0, 255, 255))):
        x, y = at(p)
        d.rectangle([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2)
    d.text((margin, 8), "cost 1/2 MSE over (w1 redness, w2 elongation): dark = low", fill="black")
    d.text(
        (margin, size + margin + 6),
        f"w1 {w1min:.0f} .. {w1max:.0f}   (white: gradient descent, start to red; cyan: random samples, best boxed)",
        fill="black",
    )
    d.text((4, margin + size // 2), f"w2\n{w2min:.0f}..{w2max:.0f}", fill="black")
    return img


def two_weights(lesson: dict, parent: Path, quick: bool) -> dict:
    base = config.load(
        lesson["base"], list(lesson.get("overrides", [])) + (list(lesson.get("quick", [])) if quick else [])
    )
    ds = data.load_dataset(base.data, base.seed, progress=False)
    f_train, f_val = features(ds.train), features(ds.val)
    mu, sd = f_train.mean(0), f_train.std(0)
    f_train, f_val = (f_train - mu) / sd, (f_val - mu) / sd
    y_train = one_hot(ds.train.labels, 2)
    budget, lr = int(lesson["budget"]), float(lesson["lr"])

    def cost(w, b, f=f_train, y=y_train):
        return half_mse(two_weight_outputs(w, b, f), y)

    def error(w, b, f=f_val, labels=ds.val.labels):
        return (two_weight_outputs(w, b, f).argmax(1) != labels).float().mean().item()

    torch.manual_seed(base.seed)
    bound = 1 / math.sqrt(2)  # nn.Linear's initial distribution for 2 inputs
    w = torch.tensor(lesson["start"], dtype=torch.float32) if "start" in lesson else (torch.rand(2) * 2 - 1) * bound
    b = (torch.rand(2) * 2 - 1) * bound
    w.requires_grad_(True), b.requires_grad_(True)
    path = [w.detach().clone().numpy()]
    start_cost = cost(w, b).item()
    writer = board.open_writer(parent / "gradient_descent")
    for step in range(1, budget + 1):  # full-batch gradient descent: one pass per step
        c = cost(w, b)
        gw, gb = torch.autograd.grad(c, [w, b])
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
        path.append(w.detach().clone().numpy())
        writer.add_scalar("cost/train", c.item(), step)
        writer.add_scalar("error_rate/val", error(w, b), step)
    w, b = w.detach(), b.detach()
    writer.close()

    samples, best, best_cost = [], None, math.inf
    writer = board.open_writer(parent / "random_search")
    for step in range(1, budget + 1):  # the same budget of passes, each a fresh random draw
        ws, bs = (torch.rand(2) * 2 - 1) * bound * lesson.get("random_scale", 1.0), (torch.rand(2) * 2 - 1) * bound
        c = cost(ws, bs).item()
        samples.append(ws.numpy())
        if c < best_cost:
            best, best_cost = (ws, bs), c
        writer.add_scalar("cost/train", best_cost, step)
        writer.add_scalar("error_rate/val", error(*best), step)

    span = max(3.0, float(np.abs(np.array(path)).max()) * 1.3, float(np.abs(np.array(samples)).max()) * 1.1)
    grid = np.linspace(-span, span, 81)
    W = torch.tensor(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1), dtype=torch.float32)  # (81, 81, 2)
    out = torch.sigmoid(
        torch.stack([(f_train @ W.view(-1, 2).T) + b[0], -(f_train @ W.view(-1, 2).T) + b[1]], -1)
    )  # (N, G, 2)
    costs = (0.5 * ((out - y_train[:, None, :]) ** 2).sum(-1).mean(0)).view(81, 81).numpy()
    picture = surface_picture(grid, grid, costs, path, samples, best[0].numpy())
    picture.save(parent / "landscape.png")
    writer = board.open_writer(parent / "gradient_descent")
    board.add_picture(writer, "landscape/two_weights", picture, budget)
    writer.close()
    return {
        "passes": budget,
        "gradient_descent": {
            "w": w.tolist(),
            "b": b.tolist(),
            "start_cost": start_cost,
            "cost": cost(w, b).item(),
            "val_error_rate": error(w, b),
            "path_start": path[0].tolist(),
            "path_end": path[-1].tolist(),
        },
        "random_search": {
            "w": best[0].tolist(),
            "b": best[1].tolist(),
            "cost": best_cost,
            "val_error_rate": error(*best),
        },
        "picture": str(parent / "landscape.png"),
    }


# ---------------------------------------------------------------- the whole course


def load_lessons(folder: Path = LESSONS) -> dict[str, dict]:
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        lesson = config.read_yaml(path)
        lesson["base"] = str((path.parent / lesson.get("base", "../hotdog.yaml")).resolve())
        found[path.stem] = lesson
    if not found:
        raise UserError(f"no lesson configs in {folder}")
    return found


def run_all(parent: Path, quick: bool, only: list[str] | None = None, folder: Path = LESSONS) -> dict:
    parent.mkdir(parents=True, exist_ok=True)
    summary = {"quick": quick, "lessons": {}}
    for name, lesson in load_lessons(folder).items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"lesson {name}: {lesson.get('title', name)}", flush=True)
        if lesson.get("kind") == "two_weights":
            result = two_weights(lesson, parent / name, quick)
        else:
            result = {
                "arms": [
                    run_arm(lesson, arm, overrides, parent / name, quick) for arm, overrides in arms_of(lesson).items()
                ]
            }
            for r in result["arms"]:
                errors = (
                    f"train error {r['final_train_error_rate']:6.2%}  best val accuracy {r['best_val_accuracy']:6.2%}"
                )
                print(f"  {r['arm']:<22} passes {r['passes']:>3}  {errors}  {r['stopped_because']}", flush=True)
        result["title"], result["seconds"], result["sweep"] = (
            lesson.get("title", name),
            time.perf_counter() - t0,
            "sweep" in lesson,
        )
        summary["lessons"][name] = result
    return summary


def _pct(x):
    return "n/a" if x is None else f"{x:.2%}"


def _seconds(x):
    return "not reached" if x is None else f"{x:.1f}"


def write_summary(summary: dict, parent: Path) -> str:
    lines = [
        f"# How a network learns, in five runs{' (--quick)' if summary['quick'] else ''}",
        "",
        f"TensorBoard: `tensorboard --logdir {parent}`",
        "",
    ]
    for r in summary["lessons"].values():
        lines += [f"## {r['title']}", ""]
        if "arms" in r:
            lines += [
                "| arm | optimiser | cost | lr | passes | train error rate | best val accuracy | passes to target "
                "| seconds to target | weight change | stopped | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for a in r["arms"]:
                verdict = sweep_verdict(a) if r.get("sweep") else ""
                if a["cost"] == "error_rate":
                    verdict = (
                        "did not move: the error rate's slope is 0, so no weight changed"
                        if a["weight_change"] == 0
                        else f"moved by {a['weight_change']:.3g}"
                    )
                if a["cost"] == "cross_entropy":
                    verdict = "cross-entropy: not the seed's cost, for comparison"
                lines.append(
                    f"| {a['arm']} | {a['optimiser']} | {a['cost']} | {a['lr']:g} | {a['passes']} | "
                    f"{_pct(a['final_train_error_rate'])} | {_pct(a['best_val_accuracy'])} | "
                    f"{a['passes_to_target'] or 'not reached'} | {_seconds(a['seconds_to_target'])} | "
                    f"{a['weight_change']:.3g} | {a['stopped_because']} | {verdict} |"
                )
        else:
            gd, rs = r["gradient_descent"], r["random_search"]
            lines += [
                f"{r['passes']} passes each. Gradient descent walked the cost down from {gd['start_cost']:.4f} to "
                f"{gd['cost']:.4f} (validation error rate {_pct(gd['val_error_rate'])}); random search's best draw: "
                f"cost {rs['cost']:.4f} (validation error rate {_pct(rs['val_error_rate'])}). "
                f"Picture: `{r['picture']}`.",
                "",
            ]
        lines.append("")
    text = "\n".join(lines)
    (parent / "summary.md").write_text(text)
    (parent / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.lessons", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small images and budgets: under 5 minutes on 2 CPU cores")
    p.add_argument("--only", nargs="*", help="run only these lessons (file stems under configs/lessons/)")
    p.add_argument("--out", help="parent folder (default runs/lessons-<timestamp>)")
    a = p.parse_args(argv)
    parent = Path(a.out or f"runs/lessons-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        summary = run_all(parent, a.quick, a.only)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_summary(summary, parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
