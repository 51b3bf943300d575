"""Search a config's parameters with Optuna: python -m hotdog_torch.tune --config FILE [--trials N] [--study DIR]
[--storage URL] [--timeout S] [--seed K] [--no-progress] [section.key=value ...]

The search space is the config's `tune.space` (dotted keys of the schema, each a distribution).  A trial is an
ordinary train.run of the config with the trial's numbers, in its own run folder (trials/<number>/); after each
epoch it reports its validation figure to the pruner, which may stop it there.  The tuner only searches.

The study folder: study.db (Optuna's SQLite storage; --storage names a database every machine reaches instead),
trials/<number>/, trials.csv (a row a trial), best.yaml (the best trial's whole config, for train --config), and
TensorBoard: hparams/<number>/ (each trial's parameters against its objective and best validation figures) and
study/ (the optimisation history and the parameters' importances, drawn by Optuna's own analysis).

The same command with the same --study goes on until the study has tune.trials finished trials (complete or
pruned); a trial whose process died (SIGKILL) stops beating (Optuna's heartbeat) and is marked failed.  Several
processes on one study (one folder, or one --storage) share its trials: a process asks for a trial under the
folder's lock, so that no more trials run than the study needs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from . import board, cli, config, files, stopping, train
from .config import Config, UserError

KINDS = ("log", "uniform", "int", "choice")
SHAPES = "{log: [low, high]}, {uniform: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}"
DIRECTION = {"val_accuracy": "maximize", "val_cost": "minimize", "epochs_to_target": "minimize"}
REPORTS = {"val_accuracy": "val_accuracy", "val_cost": "val_cost", "epochs_to_target": "val_error_rate"}
HEARTBEAT, GRACE = 2, 8  # seconds: a running trial that has not beaten for GRACE s is failed (its process died)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards tune.trials


@dataclass
class Search:
    cfg: Config  # the config every trial starts from
    space: dict[str, tuple[str, list]]  # key: (kind, its [low, high] or its choices)
    study_dir: Path
    storage: str | None  # a database URL; None: the folder's study.db
    trials: int
    seed: int
    timeout: float | None
    progress: bool
    again: str  # the command that goes on with this study


def command_line(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m hotdog_torch.tune", description="Search a config's tune.space with Optuna.")
    p.add_argument("--config", help="YAML config with a tune: section (keys: hotdog_torch/config.py)")
    p.add_argument("--trials", type=int, help="finished trials the study ends with (default: tune.trials)")
    p.add_argument("--study", metavar="DIR", help="the study folder (default: runs/tune-<config stem>-<timestamp>)")
    p.add_argument("--storage", metavar="URL", help="a database every process reaches (postgresql://...)")
    p.add_argument("--timeout", type=float, metavar="S", help="start no trial after S seconds")
    p.add_argument("--seed", type=int, help="the sampler's seed (default: the config's seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, as train takes them")
    return p.parse_intermixed_args(argv)


def number(v):
    """A number of a range; YAML 1.1 reads 1e-3 as a string."""
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            return float(v)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def dimension(cfg: Config, key: str, spec) -> tuple[str, list]:
    """One key's distribution, its ends (or each choice) checked as the key's own value is."""
    if key.split(".")[0] in ("log", "tune"):
        raise UserError(f"tune.space cannot search {key}: the study decides log.* and tune.*")
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise UserError(f"tune.space {key} must be one of {SHAPES}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"tune.space {key}: {kind!r} is not a distribution, use log, uniform, int or choice{hint}")
    if kind == "choice" and not (isinstance(values, list) and values):
        raise UserError(f"tune.space {key}: choice takes a list of values, got {values!r}")
    if kind != "choice":
        ends = [number(v) for v in values] if isinstance(values, list) and len(values) == 2 else [None]
        if None in ends or not ends[0] < ends[1] or (kind == "int" and not all(isinstance(v, int) for v in ends)):
            whole = " whole" if kind == "int" else ""
            raise UserError(
                f"tune.space {key}: {kind} takes [low, high] of{whole} numbers, low below high, got {values}"
            )
        values = ends
    for v in values:  # the key's own range and checks, through the schema: one source of truth
        try:
            config.from_dict(config.to_dict(cfg), [f"{key}={json.dumps(v)}"])
        except UserError as e:
            raise UserError(f"tune.space {key}: {e}") from None
    if kind == "log" and values[0] <= 0:
        raise UserError(f"tune.space {key}: log takes a low above 0, got {values}")
    return kind, values


def check(cfg: Config, args, argv: list[str]) -> Search:
    """Every check before anything is written."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError("tune runs one process a trial: start a tune process on each machine with one --storage")
    if not cfg.tune.space:
        raise UserError("tune.space is empty: name the keys to search, e.g. optim.lr: {log: [0.01, 2.0]}")
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if cfg.tune.objective == "epochs_to_target" and cfg.train.target_accuracy is None:
        raise UserError("tune.objective epochs_to_target needs a train.target_accuracy")
    space = {key: dimension(cfg, key, spec) for key, spec in cfg.tune.space.items()}
    stem = Path(args.config).stem if args.config else "run"
    study_dir = Path(args.study or Path(cfg.log.dir) / f"tune-{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"--study {study_dir} is a file, not a study folder")
    again = shlex.join(
        ["python", "-m", "hotdog_torch.tune", *argv, *([] if args.study else ["--study", str(study_dir)])]
    )
    seed = cfg.seed if args.seed is None else args.seed
    trials = args.trials or cfg.tune.trials
    return Search(cfg, space, study_dir, args.storage, trials, seed, args.timeout, not args.no_progress, again)


def storage_of(s: Search) -> optuna.storages.RDBStorage:
    url = s.storage or f"sqlite:///{s.study_dir / 'study.db'}"
    waits = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # processes take turns to write
    for attempt in range(3):  # processes that start together on a new database race to make its tables: again
        try:
            return optuna.storages.RDBStorage(url, waits, heartbeat_interval=HEARTBEAT, grace_period=GRACE)
        except Exception as e:  # a URL Optuna's database layer cannot reach: the user's to fix
            said = f"--storage {url} cannot be opened ({type(e).__name__}: {str(e).splitlines()[0]})"
            if attempt < 2:
                time.sleep(1 + attempt)
    raise UserError(said)


def open_study(s: Search) -> optuna.Study:
    """The study of the folder (made at the first call), refused when another space or objective made it."""
    name, mine = s.study_dir.name, {"space": s.cfg.tune.space, "objective": s.cfg.tune.objective}
    stored = s.storage or (s.study_dir / "study.db").exists()
    storage = storage_of(s) if stored else None
    if storage is not None and name in optuna.get_all_study_names(storage):
        made = optuna.load_study(study_name=name, storage=storage).user_attrs
        if {k: made.get(k) for k in mine} != mine:
            raise UserError(f"{s.study_dir} was made by another search (tune.space, tune.objective): use a new --study")
    s.study_dir.mkdir(parents=True, exist_ok=True)
    with files.locked(s.study_dir / ".lock", f"waiting for another tune process to open {s.study_dir}"):
        storage = storage or storage_of(s)
        direction = DIRECTION[s.cfg.tune.objective]
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, pruner=pruner_of(s), load_if_exists=True
        )
        for k, v in mine.items():
            study.set_user_attr(k, v)
    return study


def pruner_of(s: Search) -> optuna.pruners.BasePruner:
    kind, epochs = s.cfg.tune.pruner, most_epochs(s)
    if kind == "median":
        return optuna.pruners.MedianPruner()  # Optuna's defaults: from the sixth trial on
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def most_epochs(s: Search) -> int:
    kind, values = s.space.get("train.epochs", (None, [s.cfg.train.epochs]))
    return int(max(values))


def suggest(trial: optuna.Trial, key: str, kind: str, values: list):
    """The trial's value of one key."""
    if kind == "choice":
        return values[plain(values).index(trial.suggest_categorical(key, plain(values)))]
    if kind == "int":
        return trial.suggest_int(key, values[0], values[1])
    return trial.suggest_float(key, values[0], values[1], log=kind == "log")


def config_of(s: Search, values: dict, **log) -> Config:
    """The config with a trial's values (a UserError when the schema refuses them together)."""
    doc = config.to_dict(s.cfg)
    doc["log"].update(log)
    overrides = [f"data.generate={json.dumps(s.cfg.data.generate)}"]  # as resolved for the config given
    return config.from_dict(doc, overrides + [f"{k}={json.dumps(v)}" for k, v in values.items()])


def objective(trial: optuna.Trial, s: Search, asked) -> float:
    """One trial: its values, then an ordinary training run, its epochs reported to the pruner."""
    asked()  # the trial is in the study: another process may ask for the next
    ahead = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    if sum(t.number < trial.number for t in ahead) >= s.trials:  # a process on another machine asked at the same time
        trial.set_user_attr("error", "not run: the trials before it finish the study")
        return math.nan
    values = {key: suggest(trial, key, *dim) for key, dim in s.space.items()}
    try:
        cfg = config_of(s, values, dir=str(s.study_dir / "trials"), run_name=str(trial.number))
    except UserError as e:  # failed, not counted; the study goes on
        print(f"trial {trial.number}: refused: {e}", file=sys.stderr, flush=True)
        trial.set_user_attr("error", str(e))
        return math.nan
    key = REPORTS[s.cfg.tune.objective]

    def pruned(m: dict) -> bool:
        trial.report(m[key], m["epoch"])
        return trial.should_prune()

    print(f"trial {trial.number}: {' '.join(f'{k}={json.dumps(v)}' for k, v in values.items())}", flush=True)
    run_dir = train.run(cfg, str(trial.number), s.progress, pruned=pruned)
    m = json.loads((run_dir / "metrics.json").read_text())
    value = objective_value(s, m)
    figures = {k: m.get(k) for k in ("val_accuracy", "val_cost", "epochs", "stopped_because")}
    trial.set_user_attr("run", str(run_dir))
    trial.set_user_attr("metrics", figures)
    study_board(s, trial.number, values, {"objective": value, **figures})
    print(f"trial {trial.number}: {s.cfg.tune.objective} {value:.4g} ({m['stopped_because']})", flush=True)
    if m["stopped_because"] == "pruned":
        raise optuna.TrialPruned(f"pruned at epoch {m['epochs']}")
    return value


def objective_value(s: Search, m: dict) -> float:
    """The trial's figure: val_accuracy, val_cost (the best epoch's), or the epochs it took to reach the target;
    one that never reached it ranks after every one that did, the more accurate first."""
    if s.cfg.tune.objective != "epochs_to_target":
        return m[s.cfg.tune.objective] if m[s.cfg.tune.objective] is not None else math.nan
    if m["stopped_because"] == "target_accuracy":
        return float(m["epochs"])
    return most_epochs(s) + 1 + (1 - m["val_accuracy"])


def study_board(s: Search, n: int, values: dict, figures: dict) -> None:
    """The trial's parameters against its objective and best validation figures, on the study's HParams."""
    knobs = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in values.items()}
    metrics = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tb = board.Board(s.study_dir / "hparams" / str(n))
    tb.hparams(s.cfg, metrics, knobs | {"trial": n})
    tb.close()


def counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    done = sum(t.state in FINISHED for t in trials)
    return done, len(trials) - done


def search(s: Search) -> optuna.Study:
    """Trial after trial until the study has s.trials finished ones (or --timeout, or a stop request)."""
    study, started = open_study(s), time.monotonic()
    with stopping.StopRequest() as request:
        while s.timeout is None or time.monotonic() - started < s.timeout:
            if request():  # between trials
                stopped(s)
                raise stopping.Interrupted(128 + request.signal)
            if not next_trial(s, study):
                break
            write_tables(s, study)
    return study


def next_trial(s: Search, study: optuna.Study) -> bool:
    """Run the study's next trial, or wait for the others' running trials; False once the study is finished.  The
    trial is asked for under the folder's lock, so that processes asking at once do not run more than it needs."""
    with contextlib.ExitStack() as lock:
        lock.enter_context(files.locked(s.study_dir / ".ask.lock", "waiting for another tune process's trial"))
        optuna.storages.fail_stale_trials(study)  # a trial whose process died: failed, not counted
        done, running = counts(study)
        if done >= s.trials:
            return False
        if done + running >= s.trials:  # the others' trials may finish it: wait, and see whether they do
            lock.close()
            time.sleep(HEARTBEAT)
            return True
        # each trial's draws from seed + its number: the same --seed draws the same trials, in any process
        study.sampler = optuna.samplers.TPESampler(seed=s.seed + len(study.get_trials(deepcopy=False)))
        try:
            study.optimize(lambda t: objective(t, s, lock.close), n_trials=1)
        except stopping.Interrupted:  # the trial saved where it stopped, and is failed: the study goes on without it
            write_tables(s, study)
            stopped(s)
            raise
    return True


def stopped(s: Search) -> None:
    print(f"the search stopped; go on with: {s.again}", file=sys.stderr, flush=True)


def write_tables(s: Search, study: optuna.Study) -> None:
    """trials.csv, a row a trial; best.yaml, the best trial's whole config (written where the config writes)."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    rows = io.StringIO()
    out = csv.writer(rows)
    out.writerow(["number", "state", s.cfg.tune.objective, "seconds", *keys, "error"])
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        value = t.value if t.state == TrialState.COMPLETE else None
        error = t.user_attrs.get("error", "")
        out.writerow([t.number, t.state.name, value, seconds, *(t.params.get(k) for k in keys), error])
    files.atomic_write_text(s.study_dir / "trials.csv", rows.getvalue())
    best = best_trial(study)
    if best is not None:
        values = {k: suggest_back(s, k, v) for k, v in best.params.items()}
        text = yaml.safe_dump(config.to_dict(config_of(s, values)), sort_keys=False)
        files.atomic_write_text(s.study_dir / "best.yaml", text)


def suggest_back(s: Search, key: str, stored):
    """A stored parameter as the config takes it (a choice's JSON back to its list)."""
    kind, values = s.space[key]
    return values[plain(values).index(stored)] if kind == "choice" else stored


def plain(choices: list) -> list:
    """Choices as Optuna stores them: a value that is not plain (a list of widths) as its JSON."""
    return [v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for v in choices]


def best_trial(study: optuna.Study):
    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def draw_study(s: Search, study: optuna.Study) -> None:
    """The optimisation history and the parameters' importances, as pictures on the study's TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from PIL import Image

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    tb = board.Board(s.study_dir / "study")
    plots = {"history": optuna.visualization.matplotlib.plot_optimization_history}
    if len(complete) >= 2 and len(s.space) >= 1:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        plots["importances"] = lambda st: optuna.visualization.matplotlib.plot_param_importances(st, evaluator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's plots are "experimental"
        for tag, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials to tell
                print(f"study/{tag}: not drawn ({e})", file=sys.stderr)
                continue
            picture = io.BytesIO()
            axes.figure.savefig(picture, format="png", dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
            tb.picture(f"study/{tag}", Image.open(picture).convert("RGB"), len(complete))
    tb.close()


def report(s: Search, study: optuna.Study) -> None:
    done, _ = counts(study)
    best = best_trial(study)
    print(f"study {s.study_dir}: {done} finished trials of {s.trials}", flush=True)
    if best is not None:
        values = " ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"best: trial {best.number}, {s.cfg.tune.objective} {best.value:.4g}: {values}")
        print(f"train it: python -m hotdog_torch.train --config {s.study_dir / 'best.yaml'}")
    where = s.storage or f"sqlite:///{s.study_dir / 'study.db'}"
    print(f"see it:   tensorboard --logdir {s.study_dir}, or: optuna-dashboard {where}", flush=True)


def main(argv=None) -> int:
    args = command_line(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials' own lines say what they did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, plots

    def command():
        cfg = config.load(args.config, args.overrides)
        s = check(cfg, args, sys.argv[1:] if argv is None else argv)
        study = search(s)
        write_tables(s, study)
        draw_study(s, study)
        report(s, study)

    return cli.exit_code(command, stopping.Interrupted)


if __name__ == "__main__":
    cli.run(main)
