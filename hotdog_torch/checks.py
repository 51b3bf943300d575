"""The ranges of a config's values, each with the one sentence a user reads when it is out of range.

config.from_dict raises UserError with the first that fails; the schema and its meanings are in config.py.
"""

from __future__ import annotations


def ranges(cfg) -> list[tuple[bool, str]]:
    """(holds, the sentence a user reads when it does not) for every range of the schema."""
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    checks = [
        (8 <= d.image_size <= 1024, f"data.image_size must be between 8 and 1024 pixels, got {d.image_size}"),
        (d.channels in (1, 3), f"data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels}"),
        (0 < d.val_fraction < 1, f"data.val_fraction must lie strictly between 0 and 1, got {d.val_fraction}"),
        (d.workers is None or d.workers >= 1, f"data.workers must be at least 1 or null, got {d.workers}"),
        (
            d.memory_budget is None or d.memory_budget >= 0,
            f"data.memory_budget must be a number of bytes >= 0 or null, got {d.memory_budget}",
        ),
        (all(h >= 1 for h in m.hidden), f"model.hidden widths must be at least 1, got {m.hidden}"),
        (o.lr > 0, f"optim.lr must be greater than 0, got {o.lr}"),
        (o.fused_window >= 1, f"optim.fused_window must be at least 1, got {o.fused_window}"),
        (o.batch_size is None or o.batch_size >= 1, f"optim.batch_size must be at least 1 or null, got {o.batch_size}"),
        (0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}"),
        (not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum above 0"),
        (t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}"),
        *optimiser(cfg),
        *augment(d.augment),
        *router(cfg),
        (cfg.log.every_steps >= 0, f"log.every_steps must be 0 (once an epoch) or more, got {cfg.log.every_steps}"),
        (
            cfg.log.images_every_epochs >= 0,
            f"log.images_every_epochs must be 0 (only at the end) or more, got {cfg.log.images_every_epochs}",
        ),
        (t.diverge_factor > 1, f"train.diverge_factor must be greater than 1, got {t.diverge_factor}"),
        (t.diverge_steps >= 1, f"train.diverge_steps must be at least 1, got {t.diverge_steps}"),
        (
            t.checkpoint_every_epochs >= 1,
            f"train.checkpoint_every_epochs must be at least 1, got {t.checkpoint_every_epochs}",
        ),
        (
            t.target_accuracy is None or 0 < t.target_accuracy <= 1,
            f"train.target_accuracy must be in (0, 1] or null, got {t.target_accuracy}",
        ),
        (
            cfg.device == "auto"
            or cfg.device == "cpu"
            or cfg.device == "cuda"
            or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()),
            f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
        ),
    ]
    return checks


def optimiser(cfg) -> list[tuple[bool, str]]:
    """The ranges of the optimiser's, schedule's, regularisation's and early stopping's numbers."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    return [
        (o.weight_decay >= 0, f"optim.weight_decay must be 0 or more, got {o.weight_decay}"),
        (0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (
            o.clip_grad_norm is None or o.clip_grad_norm > 0,
            f"optim.clip_grad_norm must be above 0 or null, got {o.clip_grad_norm}",
        ),
        (0 < o.pct_start < 1, f"optim.pct_start must lie strictly between 0 and 1, got {o.pct_start}"),
        (o.warmup_steps >= 0, f"optim.warmup_steps must be 0 or more, got {o.warmup_steps}"),
        (
            not (o.warmup_steps and o.schedule == "one_cycle"),
            "optim.schedule one_cycle warms up by itself (optim.pct_start): set optim.warmup_steps=0",
        ),
        (
            0 <= o.min_lr and (o.min_lr < o.lr or o.schedule not in ("cosine", "plateau")),
            f"optim.min_lr must be in [0, optim.lr), got {o.min_lr}",
        ),
        (o.step_every >= 1, f"optim.step_every must be at least 1, got {o.step_every}"),
        (0 < o.gamma <= 1, f"optim.gamma must be in (0, 1], got {o.gamma}"),
        (0 < o.factor < 1, f"optim.factor must lie strictly between 0 and 1, got {o.factor}"),
        (o.div_factor > 0 and o.final_div_factor > 0, "optim.div_factor and optim.final_div_factor must be above 0"),
        (o.patience >= 0, f"optim.patience must be 0 or more, got {o.patience}"),
        (
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            f"optim.betas must be two numbers in [0, 1), got {o.betas}",
        ),
        (o.eps > 0, f"optim.eps must be above 0, got {o.eps}"),
        (
            not isinstance(o.class_weights, list) or all(w > 0 for w in o.class_weights),
            f"optim.class_weights must be above 0, got {o.class_weights}",
        ),
        (t.patience is None or t.patience >= 1, f"train.patience must be at least 1 or null, got {t.patience}"),
        (t.min_delta >= 0, f"train.min_delta must be 0 or more, got {t.min_delta}"),
        (t.keep_top_k is None or t.keep_top_k >= 1, f"train.keep_top_k must be at least 1 or null, got {t.keep_top_k}"),
    ]


def augment(a) -> list[tuple[bool, str]]:
    """data.augment's magnitudes."""
    return [
        (0 <= a.shift < 0.5, f"data.augment.shift must be in [0, 0.5) of the side, got {a.shift}"),
        (a.zoom >= 1, f"data.augment.zoom must be a factor of at least 1 (1 = no zoom), got {a.zoom}"),
        (0 <= a.rotate <= 180, f"data.augment.rotate must be between 0 and 180 degrees, got {a.rotate}"),
        (0 <= a.light < 1, f"data.augment.light must be in [0, 1), got {a.light}"),
        (a.warmup_epochs >= 0, f"data.augment.warmup_epochs must be 0 or more, got {a.warmup_epochs}"),
    ]


def router(cfg) -> list[tuple[bool, str]]:
    """model.router's numbers, and what it needs: augmentation to learn from, a picture as large as its glimpse."""
    r, d = cfg.model.router, cfg.data
    if r is None:
        return []
    return [
        (all(h >= 1 for h in r.hidden), f"model.router.hidden widths must be at least 1, got {r.hidden}"),
        (8 <= r.size, f"model.router.size must be at least 8 pixels, got {r.size}"),
        (
            r.size <= d.image_size,
            f"model.router.size {r.size} is larger than the pictures (data.image_size {d.image_size}): "
            "its glimpse must fit in them",
        ),
        (1 <= r.passes <= 5, f"model.router.passes must be between 1 and 5, got {r.passes}"),
        (
            len(r.estimates) >= 1 and len(set(r.estimates)) == len(r.estimates),
            f"model.router.estimates must name shift, zoom and/or angle once each, got {r.estimates}",
        ),
        (r.epochs >= 1, f"model.router.epochs must be at least 1, got {r.epochs}"),
        (r.lr > 0, f"model.router.lr must be greater than 0, got {r.lr}"),
        (
            d.augment.enabled and (d.augment.shift > 0 or d.augment.zoom > 1 or d.augment.rotate > 0),
            "model.router learns from the framings data.augment draws: set data.augment.enabled=true, with a shift, "
            "zoom or rotate to draw",
        ),
        (
            cfg.optim.name != "random_search",
            "random search draws the classifier's weights without a router: set model.router=null for it",
        ),
    ]
