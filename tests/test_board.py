"""Every dashboard, read back from a real run's event file, and served by a real TensorBoard on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hotdog_torch import train


@pytest.fixture(scope="module")
def finished_run(small_tree, tmp_path_factory):
    from conftest import tiny_doc

    from hotdog_torch import config

    tmp = tmp_path_factory.mktemp("board")
    doc = tiny_doc(small_tree, tmp)
    doc["train"].update(epochs=6)
    doc["log"].update(every_steps=5, images_every_epochs=3, run_name="board")
    doc["model"]["hidden"] = [12]
    return train.run(config.from_dict(doc), progress=False)


def accumulator(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_dashboard_has_data(finished_run):
    acc = accumulator(finished_run)
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    classes = ["hot_dog", "not_hot_dog"]
    expected = {
        "cost/train",
        "cost/train_epoch",
        "cost/val",
        "error_rate/train",
        "error_rate/val",
        "accuracy/val",
        "epoch",
        "lr",
        "balanced_accuracy/val",
        "weight_norm/layer1",
        "weight_norm/layer2",
        "grad_norm/layer1",
        "grad_norm/layer2",
        "hparam/val_accuracy",
        "hparam/test_accuracy",
    }
    expected |= {f"{w}/val/{c}" for w in ("precision", "recall", "f1") for c in classes}
    assert expected <= scalars
    assert {"weights/layer1", "weights/layer2", "gradients/layer1", "gradients/layer2"} <= set(tags["histograms"])
    assert {f"scores/{k}/true_{t}" for k in classes for t in classes} <= set(tags["histograms"])
    assert {"neurons/layer1", "misclassified/val", "confusion_matrix/val"} <= set(tags["images"])
    assert {"pr_curve/hot_dog", "pr_curve/not_hot_dog", "config/text_summary", "dataset/text_summary"} <= set(
        tags["tensors"]
    )
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == 0.5 and start.hparams["hidden"].string_value == "[12]"
    assert acc.Scalars("hparam/val_accuracy")[-1].value == pytest.approx(
        json.loads((finished_run / "metrics.json").read_text())["val_accuracy"]
    )

    # norms every 5 steps (15 steps an epoch), the lr of every step, pictures at epochs 3 and 6
    assert [e.step for e in acc.Scalars("weight_norm/layer1")] == list(range(5, 91, 5))
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 91)) and {e.value for e in acc.Scalars("lr")} == {0.5}
    assert [e.step for e in acc.Images("neurons/layer1")] == [45, 90]
    assert all(e.value > 0 for e in acc.Scalars("grad_norm/layer1"))


def test_the_pictures_are_what_they_say(finished_run):
    acc = accumulator(finished_run)
    neurons = Image.open(io.BytesIO(acc.Images("neurons/layer1")[-1].encoded_image_string))
    assert neurons.mode == "L" and neurons.size == (8 * 34 + 2, 2 * 34 + 2)  # 12 neurons of 32x32, 8 a row, 2 px apart
    confusion = Image.open(io.BytesIO(acc.Images("confusion_matrix/val")[-1].encoded_image_string))
    assert confusion.size[0] == confusion.size[1]
    assert json.loads((finished_run / "metrics.json").read_text())["val_accuracy"] < 1  # so some are misclassified
    wrong = Image.open(io.BytesIO(acc.Images("misclassified/val")[-1].encoded_image_string))
    assert wrong.width == 6 * 150  # six captioned cells a row


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_a_real_tensorboard_serves_the_run(finished_run):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(finished_run.parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                runs = get_json(f"{base}/data/runs")
                if runs:
                    break
            except OSError:
                pass
            assert time.time() < deadline and server.poll() is None, "TensorBoard did not come up"
            time.sleep(0.5)
        assert runs == ["board"]
        deadline = time.time() + 30
        while "cost/train" not in get_json(f"{base}/data/plugin/scalars/tags").get("board", {}):
            assert time.time() < deadline
            time.sleep(0.5)
        series = get_json(
            f"{base}/data/plugin/scalars/scalars?" + urllib.parse.urlencode({"run": "board", "tag": "cost/train"})
        )
        assert [step for _, step, _ in series] == list(range(1, 91))
        assert sum(v for *_, v in series[-15:]) < sum(v for *_, v in series[:15])
        images = get_json(f"{base}/data/plugin/images/tags")["board"]
        assert {"neurons/layer1", "confusion_matrix/val"} <= set(images)
    finally:
        server.terminate()
        server.wait(timeout=30)
