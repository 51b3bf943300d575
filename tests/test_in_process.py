"""conftest's in_process, which most command tests go through: it puts back what a command changes in its process,
and a call that hangs fails its own test, not the test process."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from conftest import Hung, in_process


def test_every_random_generator_a_command_draws_from_is_put_back(capfd):
    def draws(args):  # a command that seeds and draws, as a run does
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        return int(torch.rand(1) > 2) + int(np.random.rand() > 2) + int(random.random() > 2)

    before = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    assert in_process(draws, [], capfd).returncode == 0
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), before[1], strict=True))
    assert random.getstate() == before[2]


def test_a_call_that_hangs_fails_its_test_and_the_test_process_goes_on(capfd):
    started = time.monotonic()
    with pytest.raises(Hung, match="past 1 s"):
        in_process(lambda args: time.sleep(30), [], capfd, limit=1)
    assert time.monotonic() - started < 10
    assert "Current thread" in capfd.readouterr().err  # every thread's traceback, to see where it hung
