"""The one typed schema of a training run, read from YAML plus dotted overrides.

Every key, its type, its default, its range (`rng`) and what it does is written here, in the dataclasses
below: the defaults are the default run, which configs/hotdog.yaml lists key by key.

    python -m hotdog_torch.train --config configs/hotdog.yaml optim.lr=0.5 model.hidden=[256,64]

An override is `section.key=value`, the value parsed as YAML.  Anything a user can get wrong (a YAML syntax error,
an unknown key, a wrong type, a value out of range) raises UserError with one plain sentence: exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from . import checks
from .checks import did_you_mean, rng


class UserError(Exception):
    """A mistake the user can fix: reported as one sentence and exit code 2."""


@dataclass
class Augment:
    """Each training image framed afresh at every step, on the device (hotdog_torch/augment.py)."""

    enabled: bool = False  # false: the images as drawn, bit for bit the run without augmentation
    shift: float = rng(0.1, "[0, 0.5)", "of the side")  # moved by up to ± this fraction of the side, each way
    # scaled by a factor within [1/zoom, zoom] (log-uniform): zoomed in and out
    zoom: float = rng(1.15, ">= 1", "must be a factor of at least 1 (1 = no zoom)")
    rotate: float = rng(8.0, "[0, 180]", "degrees")  # turned by up to ± this many degrees
    flip: bool = True  # mirrored left to right with probability 1/2
    light: float = rng(0.2, "[0, 1)")  # brightness and contrast ± this fraction; RGB: a colour cast of ± half of it
    border: Literal["reflect", "replicate"] = "reflect"  # what fills the border a shift or zoom out uncovers
    # the curriculum: magnitudes rise linearly over this many epochs (epoch e at e/(warmup_epochs+1)), then stay
    # at the full values above; 0 = full from the first step
    warmup_epochs: int = rng(0, ">= 0")


@dataclass
class Router:
    """model.router: a small MLP that finds the subject and its framing, so the classifier judges it upright and
    centred (hotdog_torch/router.py): Rowley, Baluja and Kanade's router network, trained on the framing numbers
    data.augment drew for each training picture."""

    hidden: list[int] = rng([512, 128], ">= 1", "widths must be at least 1")  # its hidden layers (ReLU)
    size: int = rng(32, ">= 8", "pixels")  # the side of its glimpse of the picture, at most data.image_size
    passes: int = rng(2, "[1, 5]")  # looks again at its un-warped picture this many times in all, the framings composed
    # what it estimates: shift (x and y), zoom, angle; what it does not estimate it leaves as it is
    estimates: list[Literal["shift", "zoom", "angle"]] = field(default_factory=lambda: ["shift", "zoom", "angle"])
    epochs: int = rng(30, ">= 1")  # its own phase, before the classifier's: AdamW and a one-cycle lr over these epochs
    lr: float = rng(0.001, "> 0")  # its peak lr


@dataclass
class Data:
    root: str = "data/hotdog-synth"  # an ImageFolder tree: root/{class}/... or root/{train,val,test}/{class}/...
    # draw the synthetic set (hotdog_torch.synth, the seed's numbers) into root when root is missing; from a config
    # file only into the default folder data/hotdog-synth, from the command line (data.generate=true) anywhere
    generate: bool = True
    image_size: int = rng(128, "[8, 1024]", "pixels")  # images are resized to image_size x image_size
    channels: int = 1  # 1 = grayscale (128*128 = 16384 inputs), 3 = RGB
    val_fraction: float = rng(0.2, "(0, 1)")  # stratified share of train held out for validation without a val/ folder
    cache_dir: str | None = None  # decoded-tensor cache; null = $XDG_CACHE_HOME/hotdog_torch (~/.cache/hotdog_torch)
    workers: int | None = rng(None, ">= 1")  # decoding processes; null = every core
    # bytes of decoded images held in (device) memory; null = half the free RAM (CPU) or GPU memory (CUDA);
    # a larger set is memory-mapped from the cache and streamed in batches
    memory_budget: int | None = rng(None, ">= 0", "must be a number of bytes >= 0")
    augment: Augment = field(default_factory=Augment)  # data.augment.*: random framing of the training images


@dataclass
class Model:
    hidden: list[int] = rng([128], ">= 1", "widths must be at least 1")  # widths of the hidden layers; [] = one layer
    activation: Literal["sigmoid", "relu", "tanh"] = "sigmoid"  # of the hidden layers; the output is always a sigmoid
    dropout: float = rng(0.0, "[0, 1)")  # dropping each hidden unit with this probability in training; 0 = off
    # null: the classifier alone; a mapping (model.router.*, or {} for its defaults): find the hot dog, then judge it
    router: Router | None = None


@dataclass
class Optim:
    # sgd: gradient descent (torch.optim.SGD's update); adamw / adam: torch.optim.AdamW / Adam (the shot in the
    # dark, random search, is its own command: python -m hotdog_torch.search)
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    # what gradient descent minimises: the seed's ½·MSE; its first cost, the error rate (slope 0 almost
    # everywhere); or cross-entropy (not the seed's, for comparison)
    cost: Literal["half_mse", "error_rate", "cross_entropy"] = "half_mse"
    lr: float = rng(0.2, "> 0")  # the learning rate of gradient descent
    batch_size: int | None = rng(64, ">= 1")  # images per step; null = full-batch descent; clamped to the training set
    momentum: float = rng(0.9, "[0, 1)")  # sgd: 0 = plain SGD; else torch.optim.SGD's heavy ball (dampening 0)
    nesterov: bool = False  # with momentum: Nesterov's form of it (torch.optim.SGD(nesterov=True))
    # fp32 with ½·MSE: backprop written out, the SGD update folded into the weight-gradient matmul (into the
    # velocity with momentum; for adamw / adam into .grad); false = autograd + the torch.optim optimiser
    fused: bool = True
    # with fused plain SGD (momentum 0): apply the first layer's updates every this many steps in one GEMM (the same
    # SGD; faster on the CPU); 1 = every step. Momentum steps one batch at a time: its window would need a GEMM more
    fused_window: int = rng(2, ">= 1")
    # decoupled for adamw (p <- p − lr·wd·p); for sgd and adam added to the gradient (wd·p), as torch.optim defines it
    weight_decay: float = rng(0.0, ">= 0")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw / adam: the moving averages' decay rates
    eps: float = rng(1e-8, "> 0", "must be above 0")  # adamw / adam: added to the denominator
    # the learning rate along the run, stepped every optimiser step and logged as `lr` (torch.optim.lr_scheduler):
    # constant; step (× gamma every step_every steps); cosine (down to min_lr at the last step); one_cycle (fastai's
    # fit_one_cycle: from lr/div_factor up to lr over pct_start of the run, then to lr/div_factor/final_div_factor);
    # plateau (× factor when the validation cost has not improved for `patience` epochs, not below min_lr)
    schedule: Literal["constant", "step", "cosine", "one_cycle", "plateau"] = "constant"
    warmup_steps: int = rng(0, ">= 0")  # linear warm-up from lr/warmup_steps to lr over the first steps (not one_cycle)
    min_lr: float = 0.0  # cosine's floor, plateau's floor
    step_every: int = rng(1000, ">= 1")  # step schedule: optimiser steps between decays
    gamma: float = rng(0.1, "(0, 1]")  # step schedule: the decay
    pct_start: float = rng(0.25, "(0, 1)")  # one_cycle: the share of the run spent rising
    div_factor: float = 25.0  # one_cycle: the first lr is lr / div_factor
    final_div_factor: float = 1e5  # one_cycle: the last lr is lr / div_factor / final_div_factor
    patience: int = rng(10, ">= 0")  # plateau: epochs without a lower validation cost before the lr is cut
    factor: float = rng(0.1, "(0, 1)")  # plateau: the cut
    # clip the gradient to this global 2-norm before each step; null = off
    clip_grad_norm: float | None = rng(None, "> 0", "must be above 0")
    # weight each image's cost by its class: null = 1 each; balanced = n / (classes · n_class), as scikit-learn's;
    # or a list, one weight per class in the classes' (sorted folder) order
    class_weights: Literal["balanced"] | list[float] | None = rng(None, "> 0", "must be above 0")


@dataclass
class Train:
    epochs: int = rng(40, ">= 1")  # at most this many passes over the training set
    target_accuracy: float | None = rng(0.99, "(0, 1]")  # stop once validation accuracy reaches it; null = every epoch
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 for the fused step on a native-bf16 CPU, else fp32
    compile: bool = False  # torch.compile the network (autograd path)
    # under torchrun, how the fused step shares a layer's gradient: "factors" (all-gather each rank's δ and input
    # rows), "gradients" (all-reduce the gradient), or "auto" (per layer, the fewer bytes received)
    ddp_sync: Literal["auto", "factors", "gradients"] = "auto"
    # stop with stopped_because "diverged" when the cost is NaN/inf, or when its mean over the last diverge_steps
    # steps stays above diverge_factor x the lowest such mean, and above the first such mean, for diverge_steps steps
    diverge_factor: float = rng(3.0, "> 1")
    diverge_steps: int = rng(20, ">= 1")
    # write checkpoints/last.pt every this many epochs (and at the end; Ctrl-C/SIGTERM always saves)
    checkpoint_every_epochs: int = rng(1, ">= 1")
    # flush subnormal floats (|x| < 1.2e-38 in fp32) to zero in every CPU thread: x86 arithmetic on them is many
    # times slower, and ½·MSE on saturated sigmoids makes them; auto = on for CPU runs (runtime.flush_denormal)
    flush_denormal: Literal["auto"] | bool = "auto"
    # early stopping: end the run (stopped_because no_improvement) after this many epochs without an improvement of
    # `monitor` by more than min_delta; best.pt (the network to use), metrics.json and the test figures are the best
    # epoch's
    patience: int | None = rng(None, ">= 1")
    monitor: Literal["val_accuracy", "val_cost"] = "val_accuracy"  # what "best" means: best.pt, patience, keep_top_k
    min_delta: float = rng(0.0, ">= 0")
    # keep checkpoints/best-<epoch>.pt of the k best epochs (best.pt: always the best)
    keep_top_k: int | None = rng(None, ">= 1")


@dataclass
class Log:
    dir: str = "runs"  # runs are written to dir/run_name/
    run_name: str | None = None  # null = <config file stem>-<timestamp>; an existing run gets a -2, -3, ... suffix
    # weight and gradient norms per layer every this many steps and at the end of every epoch; 0 = only at the
    # end of every epoch (cost/train and lr are logged every step)
    every_steps: int = rng(50, ">= 0", "must be 0 (once an epoch) or more")
    # neuron images, misclassified images, confusion matrix, PR curves, histograms: every this many epochs and at
    # the end; 0 = only at the end
    images_every_epochs: int = rng(10, ">= 0", "must be 0 (only at the end) or more")


@dataclass
class Tune:  # python -m hotdog_torch.tune: Optuna's search over the keys of `space` (tune.py); train ignores it
    trials: int = rng(20, ">= 1")  # the study ends with this many finished trials (complete or pruned)
    # maximised: val_accuracy; minimised: val_cost, epochs_to_target (epochs to train.target_accuracy)
    objective: Literal["val_accuracy", "val_cost", "epochs_to_target"] = "val_accuracy"
    pruner: Literal["none", "median", "hyperband"] = "median"  # a trial reports every epoch and may stop early
    # dotted key: {log: [low, high]}, {uniform: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}
    space: dict = field(default_factory=dict)


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    log: Log = field(default_factory=Log)
    tune: Tune = field(default_factory=Tune)
    seed: int = 0  # seeds torch, the split and the batch order: a seeded CPU run is reproducible
    device: str = "auto"  # auto (cuda when there is one, else cpu) | cpu | cuda | cuda:N


UNIONS = (typing.Union, types.UnionType)  # Optional[int] and int | None


def valid_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted: data.root, data.augment.shift, ..., seed."""
    keys = []
    for name, t in typing.get_type_hints(schema or Config).items():
        keys += valid_keys(t, f"{prefix}{name}.") if dataclasses.is_dataclass(t) else [prefix + name]
    return keys


def _unknown(key: str) -> UserError:
    optional = [f"model.router.{k}" for k in typing.get_type_hints(Router)]  # the keys of a section that may be null
    sections = [name for name, t in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(t)]
    return UserError(f"unknown config key {key!r}{did_you_mean(key, valid_keys() + optional + sections)}")


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in UNIONS:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    return names.get(t, str(t))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value, t):
    """`value` as type t, or raise TypeError."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in UNIONS:
        for a in args:
            if a is type(None) and value is None:
                return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a)
                except TypeError:
                    pass
        raise TypeError
    if origin is Literal:
        if value in args:
            return value
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if t in (bool, int, str, dict):  # dict: tune.space, whose distributions tune.py checks
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):  # True is an int to Python
            return value
        raise TypeError
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        raise TypeError
    raise AssertionError(f"schema type {t} has no coercion")


def _close(value, t) -> str:
    """(did you mean 'adamw'?) for a misspelt name of a Literal."""
    if value == "random_search":  # once an optim.name: an old run's config.yaml may say it
        return " (random search is its own command: python -m hotdog_torch.search)"
    names = [a for a in typing.get_args(t) if isinstance(a, str)]
    names += [a for u in typing.get_args(t) if typing.get_origin(u) is Literal for a in typing.get_args(u)]
    return did_you_mean(value, names) if isinstance(value, str) else ""


def _section(t) -> type | None:
    """The dataclass of a section's type hint (Augment; Router of `Router | None`), or None for a leaf."""
    if dataclasses.is_dataclass(t):
        return t
    inner = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) in UNIONS else []
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


RETIRED = {"train.cuda_graphs": False}  # removed keys an old run's config.yaml holds: accepted at their old default


def _set(cfg: Config, key: str, value) -> None:
    """Set one dotted key (any depth: seed, optim.lr, data.augment.shift); a section takes a mapping of its keys.
    An optional section (model.router) is null, or takes its defaults when one of its keys is set."""
    owner, *path, name = [cfg, *key.split(".")]
    for part in path:  # walk down the nested sections
        hints = typing.get_type_hints(type(owner))
        if part not in hints or _section(hints[part]) is None:
            raise _unknown(key)
        if getattr(owner, part) is None:
            setattr(owner, part, _section(hints[part])())
        owner = getattr(owner, part)
    hints = typing.get_type_hints(type(owner))
    if name not in hints and key in RETIRED:
        if value != RETIRED[key]:
            raise UserError(
                f"{key} was removed (CUDA graphs by hand never ran): use train.compile=true, or leave it out"
            )
        return
    if name not in hints:
        raise _unknown(key)
    section = _section(hints[name])
    if section is not None and not (value is None and section is not hints[name]):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of its keys, got {value!r}")
        if getattr(owner, name) is None:
            setattr(owner, name, section())
        for k, v in value.items():
            _set(cfg, f"{key}.{k}", v)
        return
    try:
        setattr(owner, name, _coerce(value, hints[name]))
    except TypeError:
        raise UserError(
            f"config key '{key}' must be {_type_name(hints[name])}, got {value!r}{_close(value, hints[name])}"
        ) from None


def parse_override(text: str) -> tuple[str, object]:
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise UserError(f"an override must look like section.key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"the value of override {key!r} is not valid YAML: {raw!r}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read ({e.__class__.__name__})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(
            f"config file {path} must be a mapping of sections (data:, model:, ...), not a {type(doc).__name__}"
        )
    return doc


def from_dict(doc: dict, overrides: list[str] = ()) -> Config:
    """The defaults, then doc (a config file), then the command line's overrides.

    data.generate from a config file draws only into the default synthetic folder: a mistyped data.root
    must end in "does not exist", not in a run on made-up images.  On the command line it draws anywhere.
    """
    cfg = Config()
    for key, value in doc.items():
        _set(cfg, str(key), value)
    generate_asked = False
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
        generate_asked |= key == "data.generate" or (key == "data" and "generate" in (value or {}))
    if not generate_asked and os.path.abspath(cfg.data.root) != os.path.abspath(Data.root):
        cfg.data.generate = False
    said = checks.out_of_range(cfg) or checks.beyond_ranges(cfg)
    if said:
        raise UserError(said)
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The schema's defaults, then the YAML file, then the overrides, checked."""
    return from_dict(read_yaml(path) if path else {}, overrides)


def load_run(path: str | Path | None, resume_dir: str | Path | None, overrides: list[str] = ()) -> Config:
    """The command line's config: --config PATH (or the defaults), or for --resume the run's own config.yaml."""
    if not resume_dir:
        return load(path, overrides)
    if path:
        raise UserError("--resume takes the run's own config.yaml; pass changes as overrides, not --config")
    if not (Path(resume_dir) / "config.yaml").is_file():
        raise UserError(f"{resume_dir} is not a run folder (it has no config.yaml)")
    return load(Path(resume_dir) / "config.yaml", overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
