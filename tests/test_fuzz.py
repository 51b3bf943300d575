"""Fuzzing, for a bounded time: every outcome is a loaded result or a clean user error, never an unhandled exception."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml

pytest.importorskip("hypothesis", reason="the test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hotdog_torch import config, drawings, images  # noqa: E402
from hotdog_torch.config import UserError  # noqa: E402

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_subnormal=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
known = st.sampled_from(config.valid_keys() + ["data", "model", "optim", "train", "log"])
keys = st.one_of(known, st.text(max_size=15))


@FUZZ
@given(st.text(max_size=300))
def test_random_yaml_text(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("y") / "c.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        assert isinstance(config.load(f), config.Config)
    except UserError as e:
        assert str(e)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_random_config_documents(doc):
    try:
        cfg = config.from_dict(yaml.safe_load(yaml.safe_dump(doc)))
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert cfg.optim.lr > 0 and 0 < cfg.data.val_fraction < 1


@FUZZ
@given(st.lists(st.tuples(known, values), max_size=4))
def test_random_overrides(pairs):
    try:
        config.load(
            None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().replace(chr(10), ' ')}" for k, v in pairs]
        )
    except UserError:
        pass


def decode_or_refuse(path):
    try:
        arr = images.decode(path, 16, 3)
    except images.DECODE_ERRORS:
        return None
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
    return arr


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_images(tmp_path_factory, blob):
    for name in ("x.jpg", "x.png"):
        f = tmp_path_factory.mktemp("b") / name
        f.write_bytes(blob)
        decode_or_refuse(f)


def real_files():
    rng = np.random.default_rng(0)
    out = []
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        drawings.draw_image("hot_dog", rng, size=48).save(buf, fmt)
        out.append((fmt, buf.getvalue()))
    return out


REAL = real_files()


@FUZZ
@given(
    st.sampled_from(range(len(REAL))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12),
    st.floats(0.05, 1.0),
)
def test_mutated_real_jpegs_and_pngs(tmp_path_factory, which, flips, keep):
    fmt, raw = REAL[which]
    blob = bytearray(raw[: max(8, int(len(raw) * keep))])
    for pos, value in flips:
        blob[pos % len(blob)] = value
    f = tmp_path_factory.mktemp("m") / ("m.jpg" if fmt == "JPEG" else "m.png")
    f.write_bytes(bytes(blob))
    decode_or_refuse(f)
