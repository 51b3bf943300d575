"""Find the hot dog, then judge it: the router's geometry, its config, its phase of a run, and what uses a routed
network (checkpoint, evaluate, predict), with real image trees and real training processes."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import config_file
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import close
from test_resume import assert_same_weights, start

from hotdog_torch import augment, checkpoint, config, evaluate, export, lessons, predict, router, search, train
from hotdog_torch.config import Augment, Router, UserError
from hotdog_torch.model import build_model

AUGMENT = {"enabled": True, "shift": 0.15, "zoom": 1.3, "rotate": 15.0, "light": 0.2}
ROUTER = {"hidden": [32], "epochs": 3, "passes": 2}


def blobs(n: int, size: int = 32) -> torch.Tensor:
    """(n, 1, S, S) smooth pictures, each an off-centre elongated blob: un-warping them is checkable."""
    c = (torch.arange(size) * 2 + 1) / size - 1
    y, x = c[:, None], c[None, :]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        cx, cy, t = (torch.rand(3, generator=g) - 0.5).tolist()
        u, v = (x - cx / 2) * math.cos(t) + (y - cy / 2) * math.sin(t), -(x - cx / 2) * math.sin(t) + (y - cy / 2)
        out.append(255 * torch.exp(-(u**2) / 0.18 - v**2 / 0.04))
    return torch.stack(out)[:, None]


def test_unwarping_with_the_drawn_numbers_gives_the_picture_back():
    """router.matrix is the inverse of augment.apply's framing (shift, zoom, angle; the mirror kept): sampling a
    framed picture through it brings back the original, inside the part the framing kept in view."""
    a = Augment(enabled=True, shift=0.1, zoom=1.2, rotate=15, flip=False, light=0)
    images = blobs(8)
    p = augment.draw(a, len(images), torch.Generator().manual_seed(1))
    framed = augment.apply(images, p, "reflect")
    back = router.sample(framed, router.matrix(p[:, :4]), 32)
    inner = slice(10, 22)  # the centre: in view whatever the draw
    error = (back - images)[..., inner, inner].abs().mean()
    assert error < 4, error  # two bilinear resamplings of the blobs, out of 255
    for wrong in ([1, 1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, 1]):  # a turn, a shift, a zoom the wrong way
        back = router.sample(framed, router.matrix(p[:, :4] * torch.tensor(wrong)), 32)
        assert (back - images)[..., inner, inner].abs().mean() > 4 * error, wrong


def test_maps_compose_as_functions_and_a_new_router_is_the_identity():
    g = torch.Generator().manual_seed(2)
    a, m = (router.matrix(torch.rand(5, 4, generator=g) - 0.5) for _ in range(2))
    u = torch.rand(5, 2, 1, generator=g)
    apply = lambda t, v: t[:, :, :2] @ v + t[:, :, 2:]  # noqa: E731
    assert torch.allclose(apply(router.compose(a, m), u), apply(a, apply(m, u)), atol=1e-6)

    settings = Router(hidden=[16], size=32, passes=3)
    net = router.build(1, settings, Augment(enabled=True))
    classifier = build_model(32 * 32, [8], 2)
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(net.locate(x), torch.eye(2, 3).expand(4, 2, 3))
    assert torch.allclose(router.Routed(net, classifier)(x), classifier(x), atol=1e-6)


def test_the_box_is_the_upright_picture_in_the_photos_pixels():
    centred = torch.eye(2, 3)
    assert router.box(centred, 640, 480) == [[0, 0], [640, 0], [640, 480], [0, 480]]
    half_right = router.matrix(torch.tensor([[0.25, 0.0, math.log(0.5), 0.0]]))[0]  # half the size, moved right
    assert router.box(half_right, 100, 100) == [[50, 25], [100, 25], [100, 75], [50, 75]]


def test_the_router_keys_and_their_one_sentence_errors():
    assert config.Config().model.router is None  # off by default: the classifier alone
    cfg = config.from_dict({"data": {"augment": {"enabled": True}}}, ["model.router.passes=3"])
    assert cfg.model.router == Router(passes=3)  # one key set: the others are the defaults
    assert config.from_dict({"data": {"augment": {"enabled": True}}, "model": {"router": {}}}).model.router == Router()
    assert config.from_dict({}, ["model.router=null"]).model.router is None
    cases = [
        (["model.router={}"], "data.augment.enabled=true"),
        (["data.augment.enabled=true", "model.router.size=64", "data.image_size=32"], "larger than the pictures"),
        (["data.augment.enabled=true", "model.router.passes=0"], "between 1 and 5"),
        (["data.augment.enabled=true", "model.router.estimates=[zoom, zoom]"], "once each"),
        (["data.augment.enabled=true", "model.router.estimates=[scale]"], "must be a list of one of 'shift'"),
        (["data.augment.enabled=true", "model.router.hidden=[0]"], "at least 1"),
        (["data.augment.enabled=true", "model.router.lr=0"], "greater than 0"),
        (["data.augment.enabled=true", "model.router.passess=2"], "did you mean 'model.router.passes'"),
    ]
    for overrides, words in cases:
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace(".", r"\.")):
            config.from_dict({}, overrides)


def test_a_router_without_augmentation_is_refused_before_anything_is_trained(small_tree, tmp_path, capsys):
    path = config_file(small_tree, tmp_path, "refused", model__router=ROUTER)
    assert train.main(["--no-progress", "--config", str(path)]) == 2  # the command's main(), in this process
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "data.augment.enabled" in err and not (tmp_path / "runs").exists()


def settings(**changes):
    opts = dict(data__augment=AUGMENT, model__router=ROUTER, model__hidden=[24], optim__batch_size=16)
    return opts | dict(train__epochs=3) | changes


def routed_run(small_tree, tmp_path, name, **changes):
    return config.from_dict(yaml.safe_load(config_file(small_tree, tmp_path, name, **settings(**changes)).read_text()))


@pytest.fixture(scope="module")
def routed(small_tree, tmp_path_factory):
    """A routed run on small_tree: router 3 epochs, classifier 3."""
    tmp = tmp_path_factory.mktemp("routed")
    return train.run(routed_run(small_tree, tmp, "routed", log__images_every_epochs=2), progress=False)


def test_a_routed_run_learns_where_to_look_and_shows_it(routed):
    ckpt = checkpoint.load(routed / "checkpoints" / "best.pt")
    assert set(ckpt["router"]) >= {"net.1.weight", "scale"}
    net = checkpoint.model_from(ckpt)
    assert isinstance(net, router.Routed) and not torch.equal(net.router.net[-1].weight, torch.zeros(4, 32))
    state = checkpoint.load(routed / "checkpoints" / "last.pt")["state"]
    assert state["router"]["epoch"] == 3 and state["router"]["costs"][-1] < state["router"]["costs"][0]
    metrics = json.loads((routed / "metrics.json").read_text())
    assert metrics["router_epochs"] == 3 and metrics["router_seconds"] > 0

    acc = EventAccumulator(str(routed / "router"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    steps = 240 // 16  # 240 training pictures of small_tree, batches of 16
    assert [e.step for e in acc.Scalars("cost/router")] == list(range(1, 3 * steps + 1))
    assert {"router/boxes", "router/unwarped"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("router/boxes")] == [2 * steps, 3 * steps]  # epoch 2 (every 2) and the end
    main = EventAccumulator(str(routed), size_guidance={"scalars": 0})
    main.Reload()
    assert len(main.Scalars("cost/train")) == 3 * steps and "framing/zoom_out" in main.Tags()["scalars"]


def test_evaluate_and_predict_take_the_router_along(routed, small_tree):
    ckpt = checkpoint.load(routed / "checkpoints" / "best.pt")
    r = evaluate.evaluate_folder(ckpt, small_tree / "test", framings=True)
    assert r["images"] == 60 and {"as_is", "zoom_out", "tilt"} <= set(r["framings"])
    # the routed network, scored by hand on the same pictures, gives evaluate's accuracy
    net, files = predict.Classifier(ckpt), predict.image_files([str(small_tree / "test")])
    labels = [ckpt["classes"].index(f.parent.name) for f in files]
    verdicts = [c for _, c, _, _ in predict.predict(ckpt, files)]
    right = sum(v == ckpt["classes"][k] for v, k in zip(verdicts, labels, strict=True))
    assert right / len(files) == pytest.approx(r["accuracy"])
    assert isinstance(net.model, router.Routed)


def wait_until(last, proc, reached):
    """Until checkpoints/last.pt's state has reached a point (it is written atomically: reading it is safe)."""
    deadline = time.time() + 120
    while not (last.exists() and reached(checkpoint.load(last)["state"])):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)


def test_sigkill_in_either_phase_or_sigterm_then_resume_is_bit_identical(small_tree, tmp_path):
    """Killed in the router's phase (after its 2nd epoch), then in the classifier's (after its 1st), or stopped
    by SIGTERM in the router's phase: the run ends where the uninterrupted run ends, router and classifier alike."""
    changes = dict(model__router=ROUTER | {"epochs": 20})  # long enough for a signal to land in the phase
    reference = train.run(routed_run(small_tree, tmp_path, "straight", **changes), False)
    reference = checkpoint.load(reference / "checkpoints" / "last.pt")
    for name, signals in [("killed", [signal.SIGKILL, signal.SIGKILL]), ("stopped", [signal.SIGTERM])]:
        path = config_file(small_tree, tmp_path, name, **settings(**changes))
        run_dir = tmp_path / "runs" / name
        last = run_dir / "checkpoints" / "last.pt"
        points = [lambda s: (s["router"] or {}).get("epoch", 0) >= 2, lambda s: s["epoch"] >= 1]
        for signum, reached in zip(signals, points, strict=False):
            proc = start("--config", str(path)) if not run_dir.exists() else start("--resume", str(run_dir))
            wait_until(last, proc, reached)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=60)
            if signum == signal.SIGTERM:
                assert proc.returncode == 128 + signum and "router epoch" in err and "Traceback" not in err, err
        assert train.main(["--no-progress", "--resume", str(run_dir)]) == 0  # the resume, in this process
        final = checkpoint.load(last)
        assert final["state"]["stopped_because"] == "epochs"
        assert_same_weights(final["router"], reference["router"])
        assert_same_weights(final["model"], reference["model"])


@pytest.mark.torchrun("router", **settings(optim__batch_size=15, train__epochs=2, model__router=ROUTER | {"epochs": 2}))
def test_two_processes_train_the_router_and_the_classifier_as_one_process(torchrun_runs):
    run = torchrun_runs["router"]  # trained in the session's one torchrun launch (tests/conftest.py)
    one, two = (checkpoint.load(r / "checkpoints" / "last.pt") for r in (run.one, run.two))
    assert_same_weights(one["router"], two["router"])  # every process trains the router on every picture
    assert close(one["model"], two["model"], 3e-5)  # the tolerance of tests/test_distributed.py


def test_a_resume_that_changes_the_router_is_refused_and_changes_nothing(routed, capsys):
    before = {p: p.read_bytes() for p in routed.rglob("*") if p.is_file() and "events" not in p.name}
    for change in ["model.router=null", "model.router.hidden=[8]", "model.router.estimates=[shift]"]:
        code = train.main(["--no-progress", "--resume", str(routed), change, "train.epochs=4"])  # in this process
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert ("trained with model.router" if "null" in change else "cannot change on resume") in err
        assert {p: p.read_bytes() for p in before} == before  # config.yaml and the checkpoints as they were
    code = train.main(["--no-progress", "--resume", str(routed), "train.epochs=4"])
    out, err = capsys.readouterr()
    assert code == 0 and "epoch   4/4" in out, err  # the plain resume still trains on


def test_what_a_router_cannot_do_is_refused_in_one_sentence():
    framed = ["data.augment.enabled=true", "model.router={}"]
    with pytest.raises(UserError, match="random search draws the classifier's weights alone"):
        search.run(config.from_dict({}, framed), progress=False)  # before anything is read or written
    with pytest.raises(UserError, match="shift, zoom or rotate"):
        config.from_dict({}, [*framed, "data.augment.shift=0", "data.augment.zoom=1", "data.augment.rotate=0"])


def test_predict_goes_through_its_batches_and_the_router_stays_in_eval_mode(routed, small_tree):
    ckpt = checkpoint.load(routed / "checkpoints" / "best.pt")
    files = predict.image_files([str(small_tree / "test" / "hot_dog")])[:3]
    one_by_one = list(predict.predict(ckpt, files, batch=1))
    assert [r[1:3] for r in one_by_one] == [r[1:3] for r in predict.predict(ckpt, files)]
    assert all(len(box) == 4 for *_, box in one_by_one)
    net = checkpoint.model_from(ckpt).train()
    assert net.classifier.training and not net.router.training


@pytest.fixture(scope="module")
def routed_server(routed):
    from test_app import serving  # here, not at the top: without the app's extra only the app's tests skip

    yield from serving(routed / "checkpoints" / "best.pt")


def photo_of(tree, tmp_path) -> Path:
    """A test hot dog as a 640x480 JPEG, the way a phone sends it."""
    picture = sorted((tree / "test" / "hot_dog").glob("*.jpg"))[0]
    path = tmp_path / "photo.jpg"
    Image.open(picture).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC).save(path, quality=92)
    return path


def test_the_app_answers_with_the_box_and_draws_it(routed, routed_server, small_tree, tmp_path, capsys):
    from test_app import chromium, upload

    photo = photo_of(small_tree, tmp_path)
    status, answer = upload(routed_server, photo.read_bytes())
    assert status == 200 and len(answer["box"]) == 4 and answer["judged"].startswith("data:image/png")
    net = predict.Classifier(checkpoint.load(routed / "checkpoints" / "best.pt"))
    expected = router.box(net.maps(net.decode(photo)[None])[0], 640, 480)  # in the photo's pixels, not the input's
    assert answer["box"] == expected
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(routed / "checkpoints" / "best.pt"), str(photo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["box"] == expected  # the predict command's line

    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=flags)
        page = browser.new_page()
        page.goto(routed_server + "/")
        page.set_input_files("#photo", str(photo))
        page.wait_for_selector("#found", state="visible", timeout=30_000)
        page.wait_for_function("document.getElementById('overlay').getAttribute('viewBox') === '0 0 640 480'")
        drawn = [[float(v) for v in xy.split(",")] for xy in page.get_attribute("#box", "points").split()]
        assert drawn == expected
        shape = page.locator("#box").bounding_box()  # drawn on the page, over the photo
        assert shape is not None and shape["width"] > 10 and shape["height"] > 10
        assert page.get_attribute("#judged", "src").startswith("data:image/png")
        browser.close()


def test_the_onnx_export_finds_unwarps_and_judges_as_predict_does(routed, small_tree, tmp_path):
    import onnxruntime

    best, out = routed / "checkpoints" / "best.pt", tmp_path / "routed.onnx"
    assert export.main(["--checkpoint", str(best), "--format", "onnx", "--out", str(out)]) == 0  # in this process
    net = predict.Classifier(checkpoint.load(best))
    photos = sorted((small_tree / "test").rglob("*.jpg"))[::3][:20]
    batch = np.stack([net.decode(p) for p in photos])  # uint8 in, as an app has it
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["scores"], {"images": batch})[0]
    assert len(batch) == 20 and np.abs(got - net.scores(batch).numpy()).max() <= 1e-4
    assert "GridSample" in {node.op_type for node in __import__("onnx").load(str(out)).graph.node}


def test_the_find_then_judge_lesson_scores_both_arms_and_draws_the_boxes(small_tree, tmp_path):
    doc = yaml.safe_load(config_file(small_tree, tmp_path, "base", **settings(train__epochs=2)).read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(doc))
    shipped = lessons.load_lessons()["6_find_then_judge"]
    lesson = {k: shipped[k] for k in ("title", "kind", "arms")} | {"base": "../base.yaml", "quick": []}
    (tmp_path / "lessons").mkdir()
    (tmp_path / "lessons" / "f_find.yaml").write_text(yaml.safe_dump(lesson))
    summary = lessons.run_all(tmp_path / "out", quick=True, folder=tmp_path / "lessons")
    text = lessons.write_summary(summary, tmp_path / "out")
    result = summary["lessons"]["f_find"]
    assert [a["arm"] for a in result["arms"]] == ["alone", "routed"]
    alone, routed_arm = (checkpoint.load(Path(a["run"]) / "checkpoints" / "best.pt") for a in result["arms"])
    assert alone.get("router") is None and routed_arm["router"] is not None
    picture = Image.open(result["boxes"])
    assert picture.height == 8 * (32 * 4 + 4) + 4  # as they are, then a row each framing kind
    assert "| routed |" in text and "the router's boxes" in text
    for arm, overrides in shipped["arms"].items():  # the shipped lesson's quick arms: with and without the router
        cfg = config.load(shipped["base"], [*shipped["overrides"], *shipped["quick"], *overrides])
        assert (cfg.model.router is None) == (arm == "alone")


def test_lr_find_measures_the_classifier_behind_the_router(routed, small_tree, tmp_path):
    """With --checkpoint of a routed run, its router un-warps and its classifier is trained (a copy); without, a
    new router (the identity) does: either way a suggestion, and nothing of the run is touched."""
    from hotdog_torch import lr_find

    cfg = routed_run(small_tree, tmp_path, "find")
    before = (routed / "checkpoints" / "best.pt").read_bytes()
    net = checkpoint.model_from(checkpoint.load(routed / "checkpoints" / "best.pt"))
    trained, fresh = (lr_find.find(cfg, 1e-5, 1.0, 30, model) for model in (net, None))
    assert len(trained.costs) >= 10 and len(fresh.costs) >= 10
    assert trained.costs[0] < fresh.costs[0]  # the trained router and classifier, at the lowest lr: a lower cost
    assert (routed / "checkpoints" / "best.pt").read_bytes() == before


@pytest.mark.cuda
def test_a_routed_run_on_cuda_resumes_bit_identical_and_its_network_judges_on_the_cpu(small_tree, tmp_path):
    changes = dict(device="cuda", model__router=ROUTER | {"epochs": 2}, train__epochs=2)
    straight = checkpoint.load(
        train.run(routed_run(small_tree, tmp_path, "straight", **changes), False) / "checkpoints/last.pt"
    )
    half = train.run(routed_run(small_tree, tmp_path, "half", **changes | {"train__epochs": 1}), False)
    train.run(config.load(half / "config.yaml", ["train.epochs=2"]), False, resume_dir=half)
    resumed = checkpoint.load(half / "checkpoints" / "last.pt")
    assert_same_weights(resumed["router"], straight["router"])
    assert_same_weights(resumed["model"], straight["model"])
    files = predict.image_files([str(small_tree / "test")])[:4]
    assert all(len(box) == 4 for *_, box in predict.predict(resumed, files))
