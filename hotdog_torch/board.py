"""Everything written to TensorBoard.

The x axis is always the optimiser step (1 = after the first update).

Scalars, every step:            cost/train (the batch's cost, optim.cost), lr (the learning rate the step used)
Scalars, every log.every_steps: weight_norm/layerN, grad_norm/layerN (on a fixed probe batch)
Scalars, every epoch:           epoch, cost/train_epoch, cost/val, error_rate/train, error_rate/val,
                                accuracy/val, balanced_accuracy/val, precision|recall|f1/val/<class>
Histograms, every epoch:        weights/layerN, gradients/layerN, scores/<class>/true_<class>
Images, every log.images_every_epochs and at the end:
                                neurons/layer1 (each first-layer neuron's weights as an input image),
                                misclassified/val (captioned), confusion_matrix/val
                                augmented runs: augment/batch (what the network is fed), framings/val (pictures
                                framed as people take photos, with verdicts), and the scalars framing/<kind>
PR curves, with the images:     pr_curve/<class>
Text, once:                     config, dataset
HParams, at the end:            the config's knobs against hparam/* final metrics

The error rate is the seed's first cost function, # wrongly identified / total:
it is logged beside the smooth cost gradient descent follows (optim.cost, ½·MSE by default; cost/val is the same
cost, weighted by optim.class_weights as training is).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from . import augment, data, framing, router
from .config import Config
from .cost import half_mse, one_hot
from .data import Loader
from .model import linear_layers, neuron_pictures

HISTOGRAM_SAMPLE = 1 << 16  # larger tensors are histogrammed from a fixed random sample of this many entries


class Board:
    """One run's TensorBoard: every write goes through here.  watch() gives it the network and a fixed probe batch
    for the gradient summaries; the optional summaries (norms, histograms, pictures) add to `seconds`, so a run can
    report what logging cost.  Not enabled (torchrun's processes but rank 0), it writes nothing and computes no
    summary (watch still gathers the probe batch)."""

    def __init__(self, run_dir, purge_step=None, enabled: bool = True):
        # purge_step, on resume: TensorBoard discards events this run logged at that step or later
        self.writer = SummaryWriter(str(run_dir), flush_secs=10, purge_step=purge_step) if enabled else Silent()
        self.seconds, self.norms_step, self.enabled, self.model = 0.0, None, enabled, None
        self.run_dir, self.router_writer = run_dir, None

    def watch(self, model, loader: Loader, cost_fn, network=None) -> Board:
        """model: the classifier the steps train; network: what judges a picture as it is (with a router, the
        router then the classifier; the loader un-warps the training pictures itself)."""
        self.model, self.cost_fn, self.loader, split = model, cost_fn, loader, loader.split
        self.network = model if network is None else network
        self.probe_x = self.probe_t = None  # the processes that write nothing need no probe batch
        if self.enabled:
            x, y = loader.batch(torch.arange(min(len(split), loader.batch_size, 256), device=split.index.device))
            self.probe_x, self.probe_t = x, one_hot(y, loader.n_classes)
        return self

    def text(self, config_yaml: str, dataset_summary: str) -> None:
        # TensorBoard renders text as Markdown: indent by four spaces to keep it verbatim.
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)
        self.writer.add_text("dataset", "    " + dataset_summary.replace("\n", "\n    "), 0)

    def steps(self, tag: str, values: list[float], first_step: int) -> None:
        for i, v in enumerate(values):
            self.writer.add_scalar(tag, v, first_step + i)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def epoch(self, step: int, metrics: dict, report: dict) -> None:
        """Epoch metrics at the global step the epoch ended on (as Lightning does): every curve shares one x axis."""
        names = {"epoch": "epoch", "cost/train_epoch": "train_cost", "error_rate/train": "train_error_rate"}
        names |= {"cost/val": "val_cost", "error_rate/val": "val_error_rate", "accuracy/val": "val_accuracy"}
        self.scalars(step, {tag: metrics[k] for tag, k in names.items()})
        self.writer.add_scalar("balanced_accuracy/val", report["balanced_accuracy"], step)
        for name, r in report["classes"].items():
            self.scalars(step, {f"{what}/val/{name}": r[what] for what in ("precision", "recall", "f1")})

    def norms(self, step: int) -> None:
        """Each layer's weight norm and gradient norm on the probe batch: one transfer to the host."""
        self.norms_step = step
        if not self.enabled:
            return
        t = time.perf_counter()
        grads = probe_gradients(self.model, self.probe_x, self.probe_t, self.cost_fn)
        self.scalars(step, {k: v.item() for k, v in norms(self.model, grads).items()})
        self.seconds += time.perf_counter() - t

    def summaries(self, step, val: dict, confusion, split: data.Split, classes, gradients=True):
        """Histograms, neuron images, the misclassified grid, the confusion matrix and PR curves of a split."""
        if not self.enabled:
            return
        t = time.perf_counter()
        layers = linear_layers(self.model)
        grads = probe_gradients(self.model, self.probe_x, self.probe_t, self.cost_fn) if gradients else None
        log_histograms(self.writer, step, layers, grads, val["outputs"], split.labels, classes)
        self.picture("neurons/layer1", neuron_images(layers[0].weight, split.images.shape[1]), step)
        wrong_images, captions = misclassified(split, val["outputs"], classes)
        if len(wrong_images):
            self.picture("misclassified/val", captioned_grid(wrong_images, captions), step)
        self.picture("confusion_matrix/val", confusion_image(confusion, classes), step)
        scores, labels = torch.nan_to_num(val["outputs"].float().cpu(), nan=0.0), split.labels.cpu()
        for k, name in enumerate(classes):
            self.writer.add_pr_curve(f"pr_curve/{name}", (labels == k).int(), scores[:, k].clamp(0, 1), step)
        if (
            self.loader.augment is not None and self.loader.augment.enabled
        ):  # what it is fed, and how it copes with photos
            self.augmented(step, classes)
            self.framings(step, split, classes)
        self.seconds += time.perf_counter() - t

    def picture(self, tag: str, picture: Image.Image, step: int) -> None:
        """An image summary from a Pillow picture, PNG-encoded at a fast level (add_image's default is slow)."""
        if not self.enabled:
            return
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        colourspace = {"L": 1, "RGB": 3, "RGBA": 4}[picture.mode]
        size = {"height": picture.height, "width": picture.width, "colorspace": colourspace}
        image = Summary.Image(**size, encoded_image_string=buffer.getvalue())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, cfg: Config, metrics: dict, knobs: dict | None = None) -> None:
        """The HParams dashboard: this run's knobs (or those a tuner's trial drew) against its final metrics, in this
        run's own event file."""
        if not self.enabled:
            return
        metrics = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None}
        for summary in hparams_summary(knobs or hparams(cfg), metrics):
            self.writer.file_writer.add_summary(summary)
        self.scalars(0, metrics)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.router_writer is not None:
            self.router_writer.close()

    def framings(self, step: int, split: data.Split, classes) -> None:
        """framing/<kind>: balanced accuracy on the split as it is and framed as people take photos (framing.py);
        framings/val: two pictures of each class under each framing, with the network's verdicts."""
        mean, std = self.loader.mean, self.loader.std
        images = split.batch(torch.arange(len(split), device=split.index.device))
        figures = framing.report(self.network, images, split.labels, mean, std, classes)
        self.scalars(step, {f"framing/{k}": f["balanced_accuracy"] for k, f in figures.items()})
        some = torch.cat([torch.nonzero(split.labels == k).flatten()[:2] for k in range(len(classes))])
        shown = images[some.to(images.device)]
        grid = torch.cat([shown] + [framing.frame(kind, shown) for kind in framing.KINDS])
        scores, names = framing.outputs_of(self.network, grid, mean, std), [framing.AS_IS, *framing.KINDS]
        captions = [
            f"{names[i // len(shown)]}\n{classes[int(s.argmax())]} {float(s.max()):.2f}" for i, s in enumerate(scores)
        ]
        self.picture("framings/val", captioned_grid(grid, captions, columns=len(shown)), step)

    def augmented(self, step: int, classes, n: int = 24) -> None:
        """augment/batch: what the network is fed, n training images framed as this step's epoch frames them (a
        fresh draw at the curriculum's strength then; the run's own generator is left alone)."""
        loader = self.loader
        rows, epoch = loader.split.index[:n], -(-step // loader.batches_per_epoch())
        p = loader.framings(len(rows), torch.Generator().manual_seed(epoch), epoch)
        images = augment.apply(loader.split.images[rows].to(loader.device), p, loader.augment.border)
        captions = [classes[k] for k in loader.split.labels[:n].tolist()]
        self.picture("augment/batch", captioned_grid(images.round_().to(torch.uint8), captions, 8), step)

    def watch_router(self, split: data.Split, loader: Loader, every: int, n: int = 16) -> None:
        """The router's phase: n validation pictures (half of each class, as far as there are) framed by a fixed
        draw of data.augment at full strength, to show where the router looks on them every `every` epochs."""
        per = [torch.nonzero(split.labels == k).flatten()[: n // 2] for k in range(int(split.labels.max()) + 1)]
        rows = split.index[torch.cat(per)[:n].to(split.index.device)]
        p = augment.draw(loader.augment, len(rows), torch.Generator().manual_seed(0))
        framed = augment.apply(split.images[rows].to(loader.device), p.to(loader.device), loader.augment.border)
        self.router_probe, self.router_every = framed.round_().to(torch.uint8), every
        self.router_norm = (loader.mean, loader.std)

    def router_epoch(self, net, epoch: int, costs: list[float], first_step: int, last: bool) -> None:
        """cost/router of every router step; every router_every router epochs and at the phase's end router/boxes
        (the probe pictures with the router's box) and router/unwarped (what the classifier will judge).  In the
        run folder's router/ (its own x axis: the router's steps; TensorBoard shows it as the run's router)."""
        if not self.enabled:
            return
        if self.router_writer is None:  # a resumed phase drops what was logged after its checkpoint
            purge = first_step if first_step > 1 else None
            self.router_writer = SummaryWriter(str(Path(self.run_dir) / "router"), flush_secs=10, purge_step=purge)
        w = self.router_writer
        for i, c in enumerate(costs):
            w.add_scalar("cost/router", c, first_step + i)
        if last or (self.router_every and epoch % self.router_every == 0):
            step, x = first_step + len(costs) - 1, self.router_probe
            with torch.no_grad():
                maps = net.eval().locate(data.normalise(x, *self.router_norm))
            net.train()
            w.add_image("router/boxes", np.asarray(router.boxes_picture(x, maps)), step, dataformats="HWC")
            unwarped = captioned_grid(router.unwarped(x, maps, net.size), [""] * len(x), columns=8)
            w.add_image("router/unwarped", np.asarray(unwarped), step, dataformats="HWC")
        w.flush()


class Silent:
    """A SummaryWriter that writes nothing, for the processes that do not speak for the run."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def probe_gradients(model, x, targets, cost_fn=half_mse):
    """dC/dW of every layer on a fixed batch, leaving the model's own .grad alone."""
    layers, training = linear_layers(model), model.training
    model.eval()  # no dropout: the same weights give the same figures, and the training's random numbers stay its own
    with torch.enable_grad():
        cost = cost_fn(model(x).float(), targets)
        grads = torch.autograd.grad(cost, [layer.weight for layer in layers])
    model.train(training)
    return grads


def norms(model, grads) -> dict[str, torch.Tensor]:
    out = {}
    for i, (layer, g) in enumerate(zip(linear_layers(model), grads, strict=True), start=1):
        out[f"weight_norm/layer{i}"] = layer.weight.detach().norm()
        out[f"grad_norm/layer{i}"] = g.norm()
    return out


def misclassified(split: data.Split, outputs, classes, limit=12):
    """Up to `limit` wrongly identified images of a split, with captions: true class, predicted class and its score."""
    predicted = outputs.argmax(dim=1)
    where = torch.nonzero(predicted != split.labels.to(outputs.device)).flatten()[:limit]
    pos = where.to(split.index.device)
    captions = []
    for p, w in zip(pos.tolist(), where.tolist(), strict=True):
        k = int(predicted[w])
        captions.append(f"true {classes[int(split.labels[p])]}\npred {classes[k]} {float(outputs[w, k]):.2f}")
    return split.batch(pos), captions


HPARAM_METRICS = ("val_accuracy", "val_cost", "test_accuracy", "epochs")  # hparam/<metric> against the knobs


def hparams(cfg: Config) -> dict:
    """The knobs the HParams dashboard compares runs by (plain numbers and strings)."""
    return {
        "optimiser": cfg.optim.name,
        "cost": cfg.optim.cost,
        "lr": cfg.optim.lr,
        "batch_size": cfg.optim.batch_size or 0,  # 0 = full batch
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "schedule": cfg.optim.schedule,
        "dropout": cfg.model.dropout,
        "hidden": str(cfg.model.hidden),
        "activation": cfg.model.activation,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "seed": cfg.seed,
    }


def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().flatten()
    flat = flat[torch.isfinite(flat)]  # a diverged run's NaN and inf have no place on a histogram
    if flat.numel() <= HISTOGRAM_SAMPLE:
        return flat.float().cpu()
    g = torch.Generator().manual_seed(0)
    return flat[torch.randint(0, flat.numel(), (HISTOGRAM_SAMPLE,), generator=g).to(flat.device)].float().cpu()


def log_histograms(
    writer: SummaryWriter, step: int, layers, grads, outputs: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> None:
    for i, layer in enumerate(layers, start=1):
        for tag, values in (
            (f"weights/layer{i}", layer.weight),
            (f"gradients/layer{i}", None if grads is None else grads[i - 1]),
        ):
            sample = None if values is None else _sample(values)  # random search has no gradients
            if sample is not None and len(sample):
                writer.add_histogram(
                    tag, sample, step, bins="auto"
                )  # the default bins stop at 1e12; a diverged run goes past that
    scores, labels = outputs.float().cpu(), labels.cpu()
    for k, name in enumerate(classes):
        for j, truth in enumerate(classes):
            picked = scores[labels == j, k]
            picked = picked[torch.isfinite(picked)]
            if len(picked):
                writer.add_histogram(f"scores/{name}/true_{truth}", picked, step)


# ---------------------------------------------------------------- pictures


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def neuron_images(weight: torch.Tensor, channels: int, limit: int = 64, columns: int = 8) -> Image.Image:
    """Each first-layer neuron's weights as an input image, scaled to 0..255 per neuron: what it looks for."""
    tiles = neuron_pictures(weight[:limit], channels).numpy()
    size = tiles.shape[-1]
    n, pad = len(tiles), 2
    rows = (n + columns - 1) // columns
    sheet = np.full((channels, rows * (size + pad) + pad, columns * (size + pad) + pad), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // columns) * (size + pad), pad + (i % columns) * (size + pad)
        sheet[:, y : y + size, x : x + size] = tile
    return Image.fromarray(sheet[0] if channels == 1 else sheet.transpose(1, 2, 0))


def captioned_grid(images: torch.Tensor, captions: list[str], columns: int = 6) -> Image.Image:
    """uint8 (N, C, S, S) images, each with its caption below, as one picture (small images are enlarged)."""
    n, c, s, _ = images.shape
    scale = max(1, 128 // s)
    cell_w, text_h = max(s * scale, 150), 30
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (s * scale + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i in range(n):
        arr = images[i].cpu().numpy()
        tile = (
            Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0))
            .convert("RGB")
            .resize((s * scale, s * scale), Image.Resampling.NEAREST)
        )
        x, y = (i % columns) * cell_w, (i // columns) * (s * scale + text_h)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x + 2, y + s * scale + 1), captions[i], fill="black", font=font, spacing=1)
    return sheet


def confusion_image(confusion: torch.Tensor, classes: list[str]) -> Image.Image:
    """The confusion matrix as a picture: rows = true class, columns = predicted, shade = share of the row."""
    k = len(classes)
    cell, margin = 124, 118
    img = Image.new("RGB", (margin + k * cell, margin + k * cell), "white")
    draw = ImageDraw.Draw(img)
    font = _font(13)
    rows = confusion.double().sum(dim=1, keepdim=True).clamp_min(1)
    share = (confusion.double() / rows).cpu()
    for i in range(k):
        draw.text((4, margin + i * cell + cell // 2 - 7), f"true {classes[i]}"[:16], fill="black", font=font)
        draw.text((margin + i * cell + 4, margin - 22), f"pred {classes[i]}"[:17], fill="black", font=font)
        for j in range(k):
            shade = int(255 - 200 * share[i, j])
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(shade, shade, 255), outline="gray")
            draw.text(
                (x + 8, y + cell // 2 - 8),
                f"{int(confusion[i, j])}",
                fill="black" if shade > 120 else "white",
                font=font,
            )
    return img
