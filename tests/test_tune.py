"""The tune command: Optuna's search over a config's tune.space, each trial an ordinary training run, a study that
survives a SIGKILL and is shared by processes (one folder, or one real PostgreSQL server)."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import in_process, tiny_doc
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from hotdog_torch import train, tune

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "optim.lr": {"log": [0.05, 2.0]},
    "optim.momentum": {"uniform": [0.0, 0.95]},
    "model.hidden": {"choice": [[8], [16, 8]]},
    "train.epochs": {"int": [1, 3]},
}


def tune_file(tree, tmp_path, name="tune", space=None, **tune_keys) -> Path:
    """A config of tiny_doc at 16x16 pixels with a tune: section; the study's files under tmp_path."""
    doc = tiny_doc(tree, tmp_path)
    doc["data"]["image_size"] = 16
    doc["log"].update(run_name=None, every_steps=0, images_every_epochs=0)
    doc["tune"] = {"trials": 6, "space": space or SPACE, **tune_keys}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def trials_of(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def states(trials) -> dict:
    return {s: sum(t.state == s for t in trials) for s in TrialState}


def command(*args) -> list[str]:
    return [sys.executable, "-m", "hotdog_torch.tune", "--no-progress", *map(str, args)]


def started(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def study(tiny_tree, tmp_path_factory):
    """A finished study of 6 trials on tiny_tree, the command's main() in this process: (folder, config, output)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("study")
    path = tune_file(tiny_tree, tmp)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = tune.main(["--config", str(path), "--study", str(tmp / "study"), "--no-progress"])
    assert code == 0, out.getvalue()
    return tmp / "study", path, out.getvalue()


def test_six_trials_finish_with_their_runs_table_and_best_config(study):
    folder, _, out = study
    trials = trials_of(f"sqlite:///{folder / 'study.db'}", "study")
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for t in trials:
        run = folder / "trials" / str(t.number)
        assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.pt").is_file()
        ran = yaml.safe_load((run / "config.yaml").read_text())
        assert ran["optim"]["lr"] == t.params["optim.lr"] and ran["train"]["epochs"] == t.params["train.epochs"]
        assert str(ran["model"]["hidden"]) == t.params["model.hidden"].replace(" ", "").replace(",", ", ")
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == list(range(6)) and all(float(r["seconds"]) > 0 for r in rows)
    assert "best: trial" in out and f"tensorboard --logdir {folder}" in out and "optuna-dashboard sqlite:///" in out


def test_best_yaml_trains_as_it_is(study, capfd):
    folder, _, _ = study
    best = optuna.load_study(study_name="study", storage=f"sqlite:///{folder / 'study.db'}").best_trial
    done = in_process(train.main, ["--config", str(folder / "best.yaml"), "--no-progress"], capfd)
    assert done.returncode == 0, done.stderr
    run = Path(done.stdout.split("wrote ")[-1].split("\n")[0])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == best.params["optim.lr"] and cfg["optim"]["momentum"] == best.params["optim.momentum"]
    assert (
        run / "metrics.json"
    ).is_file() and run.parent != folder / "trials"  # where the config writes, not the study


def test_the_study_tensorboard_has_every_trials_hparams(study):
    folder, _, _ = study
    for n in range(6):
        acc = EventAccumulator(str(folder / "hparams" / str(n)), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert {"optim.lr", "optim.momentum", "model.hidden", "train.epochs"} <= set(start.hparams)
        assert start.hparams["trial"].number_value == n
        assert {"hparam/objective", "hparam/val_accuracy", "hparam/val_cost"} <= set(acc.Tags()["scalars"])
    pictures = EventAccumulator(str(folder / "study"), size_guidance={"images": 0})
    pictures.Reload()
    assert "study/history" in pictures.Tags()["images"]


def test_the_same_seed_draws_the_same_first_trial(study, tmp_path, capfd):
    folder, path, _ = study
    first = trials_of(f"sqlite:///{folder / 'study.db'}", "study")[0].params
    for seed, same in ((0, True), (1, False)):  # the config's seed is 0
        args = ["--config", str(path), "--study", str(tmp_path / f"s{seed}"), "--seed", str(seed), "--trials", "1"]
        assert in_process(tune.main, [*args, "--no-progress"], capfd).returncode == 0
        drawn = trials_of(f"sqlite:///{tmp_path / f's{seed}' / 'study.db'}", f"s{seed}")[0].params
        assert (drawn == first) is same, (seed, drawn, first)


BAD = [
    ({"space": {"optim.lrr": {"log": [0.1, 1]}}}, [], "did you mean 'optim.lr'"),
    ({"space": {"optim.lr": {"loguniform": [0.1, 1]}}}, [], "is not a distribution"),
    ({"space": {"optim.lr": {"log": [0, 1]}}}, [], "optim.lr must be greater than 0"),
    ({"space": {"optim.momentum": {"uniform": [0.5, 1.0]}}}, [], "optim.momentum must be in [0, 1)"),
    ({"objective": "accuracy"}, [], "tune.objective"),
    ({"pruner": "asha"}, [], "tune.pruner"),
    ({}, ["--trials", "0"], "--trials must be at least 1"),
]


@pytest.mark.parametrize("keys, flags, words", BAD, ids=[w for _, _, w in BAD])
def test_a_bad_input_is_one_sentence_and_writes_nothing(tiny_tree, tmp_path, capfd, keys, flags, words):
    space = keys.pop("space", None)
    path = tune_file(tiny_tree, tmp_path, space=space, **keys)
    done = in_process(tune.main, ["--config", str(path), "--study", str(tmp_path / "new"), *flags], capfd)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()


def test_a_study_made_by_another_space_is_refused_unchanged(study, tmp_path, capfd):
    folder, path, _ = study
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    other = tune_file(
        Path(yaml.safe_load(path.read_text())["data"]["root"]), tmp_path, space={"optim.lr": {"log": [0.1, 1]}}
    )
    done = in_process(tune.main, ["--config", str(other), "--study", str(folder)], capfd)
    assert done.returncode == 2 and "was made by another search" in done.stderr, done.stderr
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


def test_under_torchrun_it_says_so(tiny_tree, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = in_process(tune.main, ["--config", str(tune_file(tiny_tree, tmp_path))], capfd)
    assert done.returncode == 2 and "one --storage" in done.stderr


def test_sigkill_during_a_trial_then_the_same_command_finishes_the_study(tiny_tree, tmp_path):
    path = tune_file(tiny_tree, tmp_path, space={"optim.lr": {"log": [0.05, 2.0]}}, pruner="none")
    args = ["--config", path, "--study", tmp_path / "study", "train.epochs=40"]  # trials of a second or so
    first = started(*args)
    third = False
    for line in first.stdout:  # kill it in the second epoch of its third trial
        third |= line.startswith("trial 2: optim")
        if third and line.startswith("epoch   2/40"):
            break
    first.kill()
    first.wait()
    storage = f"sqlite:///{tmp_path / 'study' / 'study.db'}"
    assert states(trials_of(storage, "study"))[TrialState.RUNNING] == 1  # killed during its trial
    again = subprocess.run(command(*args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    counted = states(trials_of(storage, "study"))
    assert counted[TrialState.COMPLETE] == 6 and counted[TrialState.RUNNING] == 0 and counted[TrialState.FAIL] == 1


def two_processes(args_of) -> list[subprocess.CompletedProcess]:
    processes = [started(*args_of(k)) for k in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(processes, outputs, strict=True)]


def test_two_processes_on_one_study_share_its_trials(tiny_tree, tmp_path):
    path = tune_file(tiny_tree, tmp_path)
    done = two_processes(lambda k: ["--config", path, "--study", tmp_path / "study"])
    assert [d.returncode for d in done] == [0, 0], [d.stdout for d in done]
    trials = trials_of(f"sqlite:///{tmp_path / 'study' / 'study.db'}", "study")
    finished = [t.number for t in trials if t.state in tune.FINISHED]
    assert len(finished) == 6 and states(trials)[TrialState.RUNNING] == 0
    ran = sorted(p.name for p in (tmp_path / "study" / "trials").iterdir())
    assert ran == sorted(str(n) for n in finished)  # no trial run twice (a second run of one would be "<n>-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of its own on 127.0.0.1 (Debian's postgresql), its URL; run as the postgres user when the
    tests run as root."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("needs PostgreSQL: apt-get install -y postgresql")
    bin_dir, port = bins[-1].parent, free_port()
    data = Path(tempfile.mkdtemp(prefix="tune-pg-"))  # in /tmp itself: pytest's folders are root's alone
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(data, "postgres")
    run = lambda *a: subprocess.run([*user, *map(str, a)], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust")
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    run(bin_dir / "pg_ctl", "-D", data, "-o", opts, "-l", data / "log", "-w", "start")
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tune")
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_two_processes_share_a_study_on_a_real_postgresql_server(tiny_tree, tmp_path, postgres):
    path = tune_file(tiny_tree, tmp_path)
    # two machines: a folder each, of one name (the study's), one database
    done = two_processes(
        lambda k: ["--config", path, "--study", tmp_path / f"machine{k}" / "pg", "--storage", postgres]
    )
    assert [d.returncode for d in done] == [0, 0], [d.stdout for d in done]
    trials = trials_of(postgres, "pg")
    counted = states(trials)
    assert counted[TrialState.COMPLETE] + counted[TrialState.PRUNED] == 6 and counted[TrialState.RUNNING] == 0
    ran = [p.name for k in range(2) for p in (tmp_path / f"machine{k}" / "pg" / "trials").glob("*")]
    assert sorted(ran) == sorted({str(t.number) for t in trials if t.state in tune.FINISHED})
    assert not (tmp_path / "machine0" / "pg" / "study.db").exists()
