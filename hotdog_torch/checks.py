"""The ranges of a config's values, each with the one sentence a user reads when it is out of range, and the
did-you-mean of a misspelt name.

A key's range is declared with its field in config.py (`rng`) and checked here by one loop over the schema
(`out_of_range`); what no interval says (a choice, a pattern, two keys that must agree) is `beyond_ranges`.
config.from_dict raises UserError with the first sentence that fails.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing


def rng(default, interval: str, says: str = ""):
    """A field of the schema whose numbers (a list's each; null passes) lie in `interval`: "> 0", ">= 1", "[0, 1)",
    "(0, 1]".  Out of it, the run stops on '<key> must be at least 1, got 0': the words of the interval, `says`
    after them ('pixels'), or `says` instead when it has its own 'must'."""
    made = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**made, metadata={"interval": interval, "says": says})


def bounds(interval: str) -> tuple[float, float, bool, bool]:
    """(low, high, low included, high included) of "> 0", ">= 1" (no end), "[0, 1)", ..."""
    if interval.startswith(">"):
        return float(interval.lstrip(">=")), float("inf"), interval.startswith(">="), True
    low, high = interval[1:-1].split(",")
    return float(low), float(high), interval[0] == "[", interval[-1] == "]"


def words(interval: str) -> str:
    """'>= 1': 'must be at least 1'; '> 0': 'must be greater than 0'; '>= 0': 'must be 0 or more'; '(0, 1)': 'must
    lie strictly between 0 and 1'; '[1, 5]': 'must be between 1 and 5'; '[0, 1)': 'must be in [0, 1)'."""
    if interval.startswith(">"):
        low = interval.lstrip(">= ")
        if interval.startswith(">="):
            return "must be 0 or more" if low == "0" else f"must be at least {low}"
        return f"must be greater than {low}"
    low, high = (x.strip() for x in interval[1:-1].split(","))
    ends = interval[0] + interval[-1]
    return {"()": f"must lie strictly between {low} and {high}", "[]": f"must be between {low} and {high}"}.get(
        ends, f"must be in {interval}"
    )


def numbers(value) -> list:
    """The numbers of a value (a list's each; null and names are not numbers)."""
    return [v for v in (value if isinstance(value, list) else [value]) if type(v) in (int, float)]


def holds(value, interval: str) -> bool:
    """Every number of value lies in interval, and is finite: YAML's .inf passes every "> 0" by itself."""
    low, high, low_in, high_in = bounds(interval)
    inside = lambda v: (low <= v if low_in else low < v) and (v <= high if high_in else v < high)  # noqa: E731
    return all(math.isfinite(v) and inside(v) for v in numbers(value))


def out_of_range(section, prefix: str = "") -> str | None:
    """The sentence of the first value of a config (or of a section of it) outside its field's range, in the
    schema's order; a number that may be null says so ('must be at least 1 or null')."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            said = out_of_range(value, key + ".")
            if said:
                return said
        elif "interval" in f.metadata and not holds(value, f.metadata["interval"]):
            says = f.metadata["says"]
            says = says if "must" in says else " ".join(filter(None, [words(f.metadata["interval"]), says]))
            if not all(math.isfinite(v) for v in numbers(value)):  # inf, nan: 'must be a finite number and be ...'
                says = says.replace("must ", "must be a finite number and ", 1)
            kinds = set(typing.get_args(hints[f.name]))
            null = " or null" if type(None) in kinds and kinds <= {int, float, type(None)} else ""
            return f"{key} {says}{null}, got {value}"
    return None


def did_you_mean(name: str, names) -> str:
    """The hint for a misspelt name (a key, a choice, a lesson): " (did you mean 'adamw'?)", or "" if none is close."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def beyond_ranges(cfg) -> str | None:
    """The sentence of the first check no interval says that fails: a choice, a pattern, keys that must agree."""
    d, o = cfg.data, cfg.optim
    checks = [
        (d.channels in (1, 3), f"data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels}"),
        (not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum above 0"),
        (
            not (o.warmup_steps and o.schedule == "one_cycle"),
            "optim.schedule one_cycle warms up by itself (optim.pct_start): set optim.warmup_steps=0",
        ),
        (
            0 <= o.min_lr and (o.min_lr < o.lr or o.schedule not in ("cosine", "plateau")),
            f"optim.min_lr must be in [0, optim.lr), got {o.min_lr}",
        ),
        (o.div_factor > 0 and o.final_div_factor > 0, "optim.div_factor and optim.final_div_factor must be above 0"),
        (
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            f"optim.betas must be two numbers in [0, 1), got {o.betas}",
        ),
        (
            cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()),
            f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
        ),
    ]
    return next((says for ok, says in checks + router(cfg) if not ok), None)


def router(cfg) -> list[tuple[bool, str]]:
    """model.router's names, and what it needs: a picture as large as its glimpse, augmentation to learn from."""
    r, d = cfg.model.router, cfg.data
    if r is None:
        return []
    return [
        (
            len(r.estimates) >= 1 and len(set(r.estimates)) == len(r.estimates),
            f"model.router.estimates must name shift, zoom and/or angle once each, got {r.estimates}",
        ),
        (
            r.size <= d.image_size,
            f"model.router.size {r.size} is larger than the pictures (data.image_size {d.image_size}): "
            "its glimpse must fit in them",
        ),
        (
            d.augment.enabled and (d.augment.shift > 0 or d.augment.zoom > 1 or d.augment.rotate > 0),
            "model.router learns from the framings data.augment draws: set data.augment.enabled=true, with a shift, "
            "zoom or rotate to draw",
        ),
    ]
