"""Score a trained network on an ImageFolder tree:

    python -m hotdog_torch.evaluate --checkpoint runs/<name>/checkpoints/best.pt --data data/hotdog-synth/test \
        [--framings] [--json OUT]

Accuracy, error rate, cost (½·MSE), per-class precision, recall and F1, balanced
accuracy and the confusion matrix.  --data is a class folder tree (DIR/<class>/...);
given a tree with train/ val/ test/ splits, its test/ split is scored.  The images
are decoded, resized and normalised exactly as in training, from the checkpoint alone.
With --framings, also each framing kind of hotdog_torch/framing.py (the pictures shifted, zoomed out and in,
tilted, mirrored, dimmed, saved as a poor JPEG): accuracy and balanced accuracy per kind, beside as-is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import cache, checkpoint, cli, data, files, framing, runtime
from .config import Data, UserError
from .cost import confusion_matrix, per_class
from .loop import evaluate as score_split


def cache_folder(ckpt: dict, given: str | None) -> str | None:
    """Where evaluate caches its decodes: --cache-dir; else the run's data.cache_dir when it is a folder on this
    machine (a checkpoint trained elsewhere names another machine's); else the default cache (None).  Made here, so
    that a folder it cannot make is said with the option evaluate has."""
    run = ckpt["config"]["data"].get("cache_dir")
    folder = given or (run if run and Path(run).is_dir() else None)
    root = cache.cache_root(Data(cache_dir=folder))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the decode cache folder {root} ({e.strerror}); pass --cache-dir a writable folder"
        ) from None
    return folder


def evaluate_folder(
    ckpt: dict, folder: Path, progress: bool = False, framings: bool = False, cache_dir: str | None = None
) -> dict:
    if framings and len(ckpt["classes"]) < 2:
        raise UserError(
            f"--framings needs a network of at least two classes (it reports balanced accuracy); "
            f"this checkpoint has {len(ckpt['classes'])}"
        )
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist")
    if {p.name for p in folder.iterdir() if p.is_dir()} <= set(data.SPLITS) and (folder / "test").is_dir():
        folder = folder / "test"
    cache_dir = cache_folder(ckpt, cache_dir)
    settings = Data(root=str(folder), image_size=ckpt["image_size"], channels=ckpt["channels"], cache_dir=cache_dir)
    classes, split, skipped = data.load_folder(folder, settings, progress)
    if classes != ckpt["classes"]:
        raise UserError(f"{folder} has classes {classes}, but the checkpoint was trained on {ckpt['classes']}")
    if len(split) == 0:
        raise UserError(f"{folder} holds no decodable images")
    model = checkpoint.model_from(ckpt)
    runtime.flush_denormal_as_trained(ckpt["config"])
    mean, std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    r = score_split(model, split, mean, std, len(classes))
    confusion = confusion_matrix(r["outputs"], split.labels, len(classes))
    report = per_class(confusion, classes)
    out = {
        "data": str(folder),
        "images": len(split),
        "skipped_files": len(skipped),
        "accuracy": r["accuracy"],
        "error_rate": r["error_rate"],
        "cost": r["cost"],
        "balanced_accuracy": report["balanced_accuracy"],
        "per_class": report["classes"],
        "confusion_matrix": {"rows_true_columns_predicted": classes, "counts": confusion.tolist()},
    }
    if framings:
        out["framings"] = framing.report(model, split.batch(torch.arange(len(split))), split.labels, mean, std, classes)
    return out


def format_report(r: dict) -> str:
    classes = r["confusion_matrix"]["rows_true_columns_predicted"]
    lines = [
        f"{r['data']}: {r['images']} images"
        + (f" ({r['skipped_files']} undecodable files skipped)" if r["skipped_files"] else ""),
        f"accuracy {r['accuracy']:.2%}   error rate {r['error_rate']:.2%}   cost {r['cost']:.4f}   "
        f"balanced accuracy {r['balanced_accuracy']:.2%}",
        "",
        f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'images':>8}",
    ]
    for name, c in r["per_class"].items():
        lines.append(f"{name:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>8}")
    width = max(12, max(len(c) for c in classes) + 2)
    lines += [
        "",
        "confusion matrix (rows: true class, columns: predicted)",
        " " * width + "".join(f"{c:>{width}}" for c in classes),
    ]
    for name, row in zip(classes, r["confusion_matrix"]["counts"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    if "framings" in r:
        lines += ["", "framed as people take photos (hotdog_torch/framing.py)", framing.format_table(r["framings"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt or last.pt of a run")
    p.add_argument(
        "--data", required=True, help="an ImageFolder tree DIR/<class>/..., or a tree whose test/ split is scored"
    )
    p.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    p.add_argument("--framings", action="store_true", help="also score each framing kind (shift, zoom_out, ...)")
    where = "where the decoded images are cached (default: the run's data.cache_dir when it is a folder here, "
    p.add_argument("--cache-dir", help=where + "else ~/.cache/hotdog_torch)")
    a = p.parse_args(argv)

    def command():
        out = files.check_writable(a.json, "--json") if a.json else None  # before the scoring, not after it
        ckpt = checkpoint.load(a.checkpoint)
        r = evaluate_folder(ckpt, Path(a.data), sys.stderr.isatty(), a.framings, a.cache_dir)
        print(format_report(r))
        if out:
            files.atomic_write_text(out, json.dumps(r, indent=2) + "\n")

    return cli.exit_code(command, interrupted="nothing was written")


if __name__ == "__main__":
    cli.run(main)
