"""Export a trained network for an app, as ONNX or TorchScript:

    python -m hotdog_torch.export --checkpoint PATH --format onnx|torchscript --out FILE

The exported model takes what an app has after it has resized a photo: a uint8 image batch
(N, C, S, S) of the trained size and channels, N free.  The normalisation is folded into the first
layer (x/255, then (x − mean)/std per channel, is linear: W' = W·diag(1/(255·std)), b' = b − W·(mean/std)),
so the model is Flatten -> float -> the MLP, and it returns the class scores (N, K), each class's sigmoid
output, in the checkpoint's class order (they are listed in FILE.classes.json beside the model).  With a router
(model.router) its first layer is folded the same way, and the model finds, un-warps (ONNX's GridSample) and
judges the raw pictures: un-warping commutes with the normalisation (router.py).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, cli
from .model import linear_layers


class Deployable(nn.Module):
    """uint8 images in, class scores out; the checkpoint's normalisation folded into the first layer's weights."""

    def __init__(self, ckpt: dict):
        super().__init__()
        self.model = checkpoint.model_from(ckpt)
        mean, std = torch.tensor(ckpt["mean"], dtype=torch.float64), torch.tensor(ckpt["std"], dtype=torch.float64)
        routed = hasattr(self.model, "router")
        fold(linear_layers(self.model)[0], mean, std, self.model.router.size if routed else ckpt["image_size"])
        if routed:
            fold(linear_layers(self.model.router.net)[0], mean, std, self.model.router.size)
        self.requires_grad_(False)  # for inference only: its outputs carry no autograd history

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return self.model(x if hasattr(self.model, "router") else x.flatten(1))


@torch.no_grad()
def fold(first: nn.Linear, mean: torch.Tensor, std: torch.Tensor, s: int) -> None:
    """x/255, then (x − mean)/std per channel, folded into a layer that reads (C, s, s) pictures."""
    scale = (1 / (255 * std)).repeat_interleave(s * s)  # each input pixel's factor, channel by channel
    shift = (mean / std).repeat_interleave(s * s)
    w = first.weight.double()
    first.bias.copy_(first.bias.double() - w @ shift)
    first.weight.copy_(w * scale)


def export(ckpt: dict, fmt: str, out: Path) -> Path:
    model = Deployable(ckpt).eval()
    example = torch.zeros(2, ckpt["channels"], ckpt["image_size"], ckpt["image_size"], dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both exporters announce their own futures
        if fmt == "onnx":
            torch.onnx.export(
                model,
                (example,),
                str(out),
                dynamo=False,
                opset_version=17,  # GridSample (a router's un-warp) since 16
                input_names=["images"],
                output_names=["scores"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
            )
        else:
            torch.jit.trace(model, example).save(str(out))
    meta = {"classes": ckpt["classes"], "input": ["batch", ckpt["channels"], ckpt["image_size"], ckpt["image_size"]]}
    out.with_suffix(".classes.json").write_text(json.dumps(meta | {"dtype": "uint8", "output": "scores"}) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotdog_torch.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt of a run")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="the file to write (e.g. hotdog.onnx or hotdog.pt)")
    a = p.parse_args(argv)

    def command():
        out = export(checkpoint.load(a.checkpoint), a.format, Path(a.out))
        print(f"wrote {out} and {out.with_suffix('.classes.json')}")

    return cli.exit_code(command, interrupted="nothing was written")


if __name__ == "__main__":
    cli.run(main)
