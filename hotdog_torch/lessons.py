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
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch
import yaml

from . import checkpoint, checks, cli, config, data, evaluate, framing, router, search, train, two_weights
from .config import UserError
from .model import build_model, input_side, linear_layers, neuron_pictures

LESSONS = Path(str(resources.files("hotdog_torch"))) / "configs" / "lessons"  # package data, also when installed


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
    runner = search.run if arm in lesson.get("search_arms", ()) else train.run  # the shot in the dark, or descent
    run_dir = two_weights.quiet_run(cfg, arm, runner)  # the arm's epoch lines go to its train.log, not the console
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    history = last["state"]["history"]
    target = cfg.train.target_accuracy or 0.99
    hit = next((m for m in history if m["val_accuracy"] >= target), None)
    torch.manual_seed(cfg.seed)  # the arm's starting weights, drawn again the way train.run drew them
    start = build_model(
        cfg.data.channels * input_side(cfg.data.image_size, cfg.model.router and cfg.model.router.size) ** 2,
        cfg.model.hidden,
        len(last["classes"]),
        cfg.model.activation,
    ).state_dict()
    moved = math.sqrt(sum(float(((last["model"][k].float() - start[k]) ** 2).sum()) for k in start))
    return {
        "arm": arm,
        "optimiser": "random_search" if runner is search.run else cfg.optim.name,
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


# ---------------------------------------------------------------- a template or a hot dog?


def framings_lesson(lesson: dict, parent: Path, quick: bool) -> dict:
    """The same network trained on the pictures as drawn and with augmentation, both scored on the framing kinds
    (hotdog_torch/framing.py) of the data's test split, and their first-layer neurons drawn side by side."""
    arms = [run_arm(lesson, arm, overrides, parent, quick) for arm, overrides in arms_of(lesson).items()]
    nets = {}
    for r in arms:
        ckpt = checkpoint.load(Path(r["run"]) / "checkpoints" / "best.pt")
        r["framings"] = evaluate.evaluate_folder(ckpt, Path(ckpt["config"]["data"]["root"]), framings=True)["framings"]
        r["worst_framing"] = min(f["balanced_accuracy"] for f in r["framings"].values())
        nets[r["arm"]] = ckpt
    neurons_side_by_side(nets, parent / "neurons.png")
    out = {"arms": arms, "picture": str(parent / "neurons.png")}
    routed = [ckpt for ckpt in nets.values() if ckpt.get("router") is not None]
    if routed:  # find, then judge: where the router looked on pictures framed each way
        boxes_on_framings(routed[0], parent / "boxes.png")
        out["boxes"] = str(parent / "boxes.png")
    return out


def boxes_on_framings(ckpt: dict, path: Path, n: int = 4) -> None:
    """The router's box on n test pictures (half hot dogs) as they are and framed each way (a row a kind)."""
    root = Path(ckpt["config"]["data"]["root"])
    folder = root / "test" if (root / "test").is_dir() else root
    settings = config.Data(root=str(folder), image_size=ckpt["image_size"], channels=ckpt["channels"])
    settings.cache_dir = ckpt["config"]["data"].get("cache_dir")
    _, split, _ = data.load_folder(folder, settings, False)
    rows = torch.cat([torch.nonzero(split.labels == k).flatten()[: n // 2] for k in range(2)])
    shown = split.batch(rows)
    pictures = torch.cat([shown] + [framing.frame(kind, shown) for kind in framing.KINDS])
    net = checkpoint.model_from(ckpt)
    with torch.no_grad():
        maps = net.router.locate(data.normalise(pictures, torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])))
    router.boxes_picture(pictures, maps, columns=len(shown)).save(path)


def neurons_side_by_side(nets: dict[str, dict], path: Path, n: int = 8) -> None:
    """One row per arm: its n first-layer neurons of largest weights, as pictures (what each looks for)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(len(nets), n, figsize=(1.6 * n, 1.9 * len(nets)), squeeze=False)
    for row, (arm, ckpt) in zip(axes, nets.items(), strict=True):
        weight = linear_layers(checkpoint.model_from(ckpt))[0].weight
        pictures = neuron_pictures(weight, ckpt["channels"])
        for ax, j in zip(row, weight.norm(dim=1).argsort(descending=True)[:n].tolist(), strict=False):
            picture = pictures[j].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            ax.set_xticks([]), ax.set_yticks([])
        row[0].set_ylabel(arm)
    fig.suptitle("first-layer neurons: templates of one framing, or parts that survive any framing?")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def framing_rows(r: dict) -> list[str]:
    """A lesson's arms against the framing kinds, balanced accuracy, as a Markdown table."""
    kinds = list(r["arms"][0]["framings"])
    rows = ["| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for a in r["arms"]:
        rows.append(f"| {a['arm']} | " + " | ".join(_pct(a["framings"][k]["balanced_accuracy"]) for k in kinds) + " |")
    boxes = f"; the router's boxes: `{r['boxes']}`" if "boxes" in r else ""
    return rows + ["", f"(balanced accuracy on the test split; first-layer neurons: `{r['picture']}`{boxes})"]


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


def chosen(lessons: dict[str, dict], only: list[str] | None) -> dict[str, dict]:
    """The lessons --only names (all without it); a name of none refuses them all, before anything is run."""
    unknown = [name for name in only or [] if name not in lessons]
    if unknown:
        named = " or ".join(repr(name) + checks.did_you_mean(name, lessons) for name in unknown)
        raise UserError(f"no lesson is named {named}; the lessons are {', '.join(lessons)}")
    return {name: lesson for name, lesson in lessons.items() if not only or name in only}


def run_all(parent: Path, quick: bool, only: list[str] | None = None, folder: Path = LESSONS) -> dict:
    lessons = chosen(load_lessons(folder), only)
    parent.mkdir(parents=True, exist_ok=True)
    summary = {"quick": quick, "lessons": {}}
    for name, lesson in lessons.items():
        t0 = time.perf_counter()
        print(f"lesson {name}: {lesson.get('title', name)}", flush=True)
        if lesson.get("kind") == "two_weights":
            result = two_weights.run(lesson, parent / name, quick)
        elif lesson.get("kind") == "framings":
            result = framings_lesson(lesson, parent / name, quick)
            for r in result["arms"]:
                print(f"  {r['arm']:<22} worst framing {r['worst_framing']:6.2%} (balanced)", flush=True)
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


def arm_rows(r: dict) -> list[str]:
    """A lesson's arms as a Markdown table."""
    rows = [
        "| arm | optimiser | cost | lr | passes | train error rate | best val accuracy | passes to target "
        "| seconds to target | weight change | stopped | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r["arms"]:
        verdict = sweep_verdict(a) if r.get("sweep") else ""
        if a["cost"] == "error_rate":
            moved = a["weight_change"] != 0
            verdict = f"moved by {a['weight_change']:.3g}" if moved else "did not move: the error rate's slope is 0"
        if a["cost"] == "cross_entropy":
            verdict = "cross-entropy: not the seed's cost, for comparison"
        rows.append(
            f"| {a['arm']} | {a['optimiser']} | {a['cost']} | {a['lr']:g} | {a['passes']} | "
            f"{_pct(a['final_train_error_rate'])} | {_pct(a['best_val_accuracy'])} | "
            f"{a['passes_to_target'] or 'not reached'} | {_seconds(a['seconds_to_target'])} | "
            f"{a['weight_change']:.3g} | {a['stopped_because']} | {verdict} |"
        )
    return rows


def write_summary(summary: dict, parent: Path) -> str:
    quick = " (--quick)" if summary["quick"] else ""
    lines = [f"# How a network learns, in six runs{quick}", "", f"TensorBoard: `tensorboard --logdir {parent}`", ""]
    for r in summary["lessons"].values():
        lines += [f"## {r['title']}", ""]
        lines += arm_rows(r) if "arms" in r else [two_weights.summary(r), ""]
        lines += ["", *framing_rows(r)] if "framings" in (r.get("arms") or [{}])[0] else []  # the framing lesson
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
    p.add_argument("--list", action="store_true", help="list the lessons and where their configs are, then stop")
    a = p.parse_args(argv)

    def command():
        if a.list:
            for name, lesson in load_lessons().items():
                print(f"{name}: {lesson.get('title', name)}")
            print(f"(configs in {LESSONS})")
            return
        parent = Path(a.out or f"runs/lessons-{time.strftime('%Y%m%d-%H%M%S')}")
        print(write_summary(run_all(parent, a.quick, a.only), parent))

    return cli.exit_code(command)


if __name__ == "__main__":
    cli.run(main)
