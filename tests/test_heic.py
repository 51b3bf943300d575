"""iPhone photos: HEIC/HEIF files (and AVIF, where Pillow reads it) in training folders, predict and evaluate."""

from __future__ import annotations

import json

import pytest
from conftest import in_process
from PIL import Image, features

from hotdog_torch import data, evaluate, images, predict
from hotdog_torch.config import Data

pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra: pip install -e '.[heif]'")


def as_a_fresh_process(monkeypatch):
    """Pillow without HEIF, as a command's process starts: the command must teach it HEIF itself (images.read_heif)."""
    Image.init()  # Pillow's own plugins first: loaded later, they would land in the copies taken out below
    for name in ("OPEN", "SAVE", "MIME", "EXTENSION"):
        monkeypatch.setattr(Image, name, {k: v for k, v in getattr(Image, name).items() if "HEIF" not in (k, v)})
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    images.read_heif.cache_clear()


@pytest.fixture(scope="module")
def photo_tree(small_tree, tmp_path_factory):
    """small_tree's test split saved again as an iPhone would: HEIC, with an .avif and a .HEIF among them."""
    pillow_heif.register_heif_opener()
    root = tmp_path_factory.mktemp("iphone") / "test"
    for i, path in enumerate(sorted((small_tree / "test").rglob("*.jpg"))):
        out = root / path.parent.name / path.with_suffix(".heic").name
        out.parent.mkdir(parents=True, exist_ok=True)
        suffix, fmt = (
            (".avif", "AVIF") if i == 3 and features.check("avif") else (".HEIF", "HEIF") if i == 4 else ("", "")
        )
        Image.open(path).save(out.with_suffix(suffix) if suffix else out, fmt or "HEIF", quality=95)
    return root


def test_a_folder_of_heic_photos_is_read_and_classified_as_the_jpegs_were(
    trained, small_tree, photo_tree, tmp_path, capfd, monkeypatch
):
    run_dir, metrics = trained
    settings = Data(root=str(photo_tree), image_size=32, channels=1, cache_dir=str(tmp_path / "cache"), workers=1)
    classes, split, skipped = data.load_folder(photo_tree, settings, progress=False)
    assert classes == ["hot_dog", "not_hot_dog"] and len(split) == 60 and skipped == []
    assert sum(p.endswith(".heic") for p in split.paths) >= 58  # none skipped in silence
    out = tmp_path / "e.json"
    best = str(run_dir / "checkpoints/best.pt")
    as_a_fresh_process(monkeypatch)  # the commands' main() here (their real command lines: test_evaluate_predict.py)
    r = in_process(evaluate.main, ["--checkpoint", best, "--data", str(photo_tree), "--json", str(out)], capfd)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.05)
    one = next(photo_tree.glob("hot_dog/*.heic"))
    jpeg = small_tree / "test" / "hot_dog" / one.with_suffix(".jpg").name
    as_a_fresh_process(monkeypatch)  # again: evaluate taught Pillow HEIF
    verdicts = in_process(predict.main, ["--checkpoint", best, "--json", str(one), str(jpeg)], capfd)
    assert verdicts.returncode == 0, verdicts.stderr
    heic, jpg = (json.loads(line) for line in verdicts.stdout.splitlines())
    assert heic["path"].endswith(one.name) and jpg["path"].endswith(jpeg.name)
    assert heic["class"] == jpg["class"] and heic["score"] == pytest.approx(jpg["score"], abs=0.1)
