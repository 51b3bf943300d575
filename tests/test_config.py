"""Config: YAML + dotted overrides, and one plain sentence with exit code 2 for every user mistake."""

from __future__ import annotations

import dataclasses
import gc
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from hotdog_torch import checks, config, runtime, train
from hotdog_torch.cli import run as run_command
from hotdog_torch.config import UserError

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    """Run the real command line in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "hotdog_torch.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=300,
    )


def command(capsys, *args):
    """The training command's main() in this process, as cli() reports a process (a start-up of torch less: the
    real command line is cli()'s, in test_an_augment_range_error_is_one_sentence_on_the_command_line)."""
    capsys.readouterr()
    code = train.main([a.replace("configs/", f"{REPO}/configs/", 1) if a.startswith("configs/") else a for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_sentence(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_default_config_sets_every_schema_key():
    def leaves(doc, prefix=""):  # data.augment.shift, ..., seed
        for k, v in doc.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    listed = set(leaves(yaml.safe_load((REPO / "configs/hotdog.yaml").read_text())))
    assert listed <= set(config.valid_keys())  # a new key is its field and the code that reads it: the file may lag
    cfg = config.load(REPO / "configs/hotdog.yaml")
    assert cfg.data.image_size == 128 and cfg.data.channels == 1  # the seed's 16384 input neurons
    assert cfg.train.target_accuracy == 0.99


def test_the_schema_defaults_are_the_default_run():
    """One source for every default: configs/hotdog.yaml lists the schema's defaults, it changes none of them."""
    listed = config.load(REPO / "configs/hotdog.yaml")
    assert config.to_dict(listed) == config.to_dict(config.Config())
    assert listed == config.Config() == config.load(None)


def test_overrides_are_parsed_as_yaml_and_win():
    cfg = config.load(
        REPO / "configs/hotdog.yaml", ["optim.lr=0.5", "model.hidden=[256,64]", "optim.batch_size=null", "seed=7"]
    )
    assert cfg.optim.lr == 0.5 and cfg.model.hidden == [256, 64] and cfg.optim.batch_size is None and cfg.seed == 7
    assert isinstance(config.load(None, ["optim.lr=1"]).optim.lr, float)
    assert config.load(None, ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 alone would read this as a string
    assert config.load(None, ["optim.lr=2E+2"]).optim.lr == 200.0


def test_nested_keys_of_data_augment_from_file_and_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  augment:\n    enabled: true\n    zoom: 1.3\n")
    cfg = config.load(f, ["data.augment.shift=0.05", "data.augment={rotate: 12}"])
    a = cfg.data.augment
    assert (a.enabled, a.zoom, a.shift, a.rotate, a.light) == (True, 1.3, 0.05, 12.0, 0.2)
    assert config.load(None).data.augment.enabled is False
    again = config.from_dict(config.to_dict(cfg))  # a run's config.yaml reads back the same (--resume)
    assert again.data.augment == a


def test_a_command_ends_with_the_code_of_its_main_and_its_imports_frozen():
    gc.unfreeze()  # this process's imports, frozen by conftest.py
    with pytest.raises(SystemExit) as end:
        run_command(gc.get_freeze_count)  # the end of every `python -m hotdog_torch.<command>`
    assert end.value.code > 100_000  # torch's objects, and the tests': the collector no longer walks them


def test_an_augment_range_error_is_one_sentence_on_the_command_line():
    line = assert_one_sentence(cli("--config", "configs/hotdog.yaml", "data.augment.shift=0.6"))
    assert "data.augment.shift" in line


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=0.1", ["unknown config key 'optim.lrr'", "did you mean 'optim.lr'"]),
        ("modle.hidden=[3]", ["unknown config key 'modle.hidden'"]),
        ("optim.lr=fast", ["optim.lr", "must be a number", "'fast'"]),
        ("model.hidden=12", ["model.hidden", "a list of an integer"]),
        ("model.activation=softplus", ["model.activation", "one of 'sigmoid', 'relu', 'tanh'"]),
        ("train.epochs=2.5", ["train.epochs", "an integer"]),
        ("optim.lr=0", ["optim.lr must be greater than 0"]),
        ("optim.lr=-1", ["optim.lr must be greater than 0"]),
        ("optim.lr=.inf", ["optim.lr must be a finite number and be greater than 0, got inf"]),  # passes "> 0" itself
        ("optim.lr=.nan", ["optim.lr must be a finite number and be greater than 0, got nan"]),
        ("train.diverge_factor=.inf", ["train.diverge_factor must be a finite number and be greater than 1"]),
        ("optim.class_weights=[1.0,.inf]", ["optim.class_weights must be a finite number and be above 0"]),
        ("data.val_fraction=1.5", ["data.val_fraction"]),
        ("data.val_fraction=0", ["data.val_fraction"]),
        ("data.image_size=4", ["data.image_size"]),
        ("data.channels=2", ["data.channels"]),
        ("data.augment.shift=0.5", ["data.augment.shift must be in [0, 0.5)"]),
        ("data.augment.zoom=0.9", ["data.augment.zoom must be a factor of at least 1"]),
        ("data.augment.rotate=181", ["data.augment.rotate must be between 0 and 180"]),
        ("data.augment.rotate=-1", ["data.augment.rotate must be between 0 and 180"]),
        ("data.augment.light=1", ["data.augment.light must be in [0, 1)"]),
        ("data.augment.shfit=0.1", ["unknown config key 'data.augment.shfit'", "did you mean 'data.augment.shift'"]),
        ("data.augment=on", ["config key 'data.augment' must be a mapping"]),
        ("device=gpu", ["device must be"]),
        ("train.flush_denormal=sometimes", ["train.flush_denormal", "one of 'auto' or true or false"]),
        ("optim.lr", ["section.key=value"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        config.load(REPO / "configs/hotdog.yaml", [override])
    for w in words:
        assert w in str(e.value)


def ranged_fields(schema=config.Config, prefix=""):
    """(dotted key, field) of every field declared with its range (checks.rng), model.router's too."""
    for f in dataclasses.fields(schema):
        section = config._section(typing.get_type_hints(schema)[f.name])
        if section:
            yield from ranged_fields(section, f"{prefix}{f.name}.")
        elif "interval" in f.metadata:
            yield prefix + f.name, f


def test_every_range_is_declared_with_its_field_and_checked_by_one_loop():
    ranged = list(ranged_fields())
    assert len(ranged) >= 35  # every simple range; what no interval says (and keys together) is in checks.py
    for key, f in ranged:
        interval = f.metadata["interval"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert checks.holds(default, interval), key
        low, _, low_in, _ = checks.bounds(interval)
        bad = int(low - low_in) if float(low).is_integer() else low  # just below the range (every range has a floor)
        router = ["data.augment.enabled=true"] if key.startswith("model.router.") else []
        with pytest.raises(UserError, match=f"^{re.escape(key)} .*, got ") as e:
            config.load(None, [*router, f"{key}={[bad] if 'list[' in str(f.type) else bad}"])
        assert "\n" not in str(e.value)


def test_unknown_key_in_the_file_is_named(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    line = assert_one_sentence(command(capsys, "--config", str(f)))
    assert "optim.learning_rate" in line


def test_yaml_syntax_error_points_at_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  root: x\noptim:\n  lr: [0.1\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        config.load(f)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match="must be a mapping"):
        config.load(f)


def test_missing_config_file(capsys):
    line = assert_one_sentence(command(capsys, "--config", "no/such/file.yaml"))
    assert "does not exist" in line


def test_wrong_type_from_the_command_line(capsys):
    line = assert_one_sentence(command(capsys, "--config", "configs/hotdog.yaml", "optim.lr=fast"))
    assert "optim.lr" in line


def test_missing_data_folder(tmp_path, capsys):
    line = assert_one_sentence(
        command(
            capsys,
            "--config",
            "configs/hotdog.yaml",
            f"data.root={tmp_path}/nothing",
            "data.generate=false",
            f"log.dir={tmp_path}/runs",
        )
    )
    assert "does not exist" in line


def test_fewer_than_two_classes(tmp_path, tiny_tree, capsys):
    one = tmp_path / "one"
    (one / "hot_dog").mkdir(parents=True)
    for p in sorted((tiny_tree / "train" / "hot_dog").iterdir())[:4]:
        (one / "hot_dog" / p.name).write_bytes(p.read_bytes())
    line = assert_one_sentence(
        command(
            capsys,
            "--config",
            "configs/hotdog.yaml",
            f"data.root={one}",
            f"data.cache_dir={tmp_path}/c",
            f"log.dir={tmp_path}/runs",
        )
    )
    assert "at least two" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    line = assert_one_sentence(
        command(capsys, "--config", "configs/hotdog.yaml", "device=cuda", f"log.dir={tmp_path}/runs")
    )
    assert "no usable CUDA" in line
    with pytest.raises(UserError):
        runtime.resolve_device("cuda:0")
    assert runtime.resolve_device("auto").type == "cpu"


def test_the_photos_recipe_loads_and_ships_in_the_package():
    cfg = config.load(REPO / "configs/photos.yaml")
    assert cfg.data.augment.enabled and cfg.data.augment.warmup_epochs > 0 and cfg.log.run_name == "photos"
    assert cfg.model.router is not None and cfg.model.router.size < cfg.data.image_size  # find, then judge
    packaged = REPO / "hotdog_torch" / "configs" / "photos.yaml"
    assert (REPO / "configs/photos.yaml").resolve() == packaged.resolve()


def test_a_retired_key_is_accepted_at_its_old_default_and_refused_otherwise(tmp_path):
    """A run folder written before train.cuda_graphs was removed resumes (its config.yaml holds cuda_graphs: false);
    asking for the graphs is one sentence, never silently ignored."""
    assert config.from_dict({"train": {"cuda_graphs": False}}) == config.Config()
    with pytest.raises(UserError, match="train.cuda_graphs was removed") as e:
        config.from_dict({}, ["train.cuda_graphs=true"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="its own command: python -m hotdog_torch.search"):  # no longer an optimiser
        config.from_dict({}, ["optim.name=random_search"])
