"""worker/cuda_wait.py: every step's wait goes through its flag first, and nothing changes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import reference_tokens
from test_lookahead import PROMPTS, chain

from coordinator.demo import ModelSpec
from worker import cuda_wait

ON_CUDA = cuda_wait.enabled()


@pytest.fixture
def flags(monkeypatch):
    """Every flag launched and every wait's answer (off CUDA, flags already set stand in for
    the kernel's)."""
    seen = {"launched": [], "waited": []}
    after, wait = cuda_wait.after, cuda_wait.wait

    def spy_after(targets):
        flag = after(targets) if ON_CUDA else cuda_wait.Flag(None, np.ones(1, np.uint32))
        seen["launched"].append(flag)
        return flag

    def spy_wait(flag, limit=cuda_wait.SPIN_LIMIT):
        seen["waited"].append((flag, wait(flag, limit)))
        return seen["waited"][-1][1]

    monkeypatch.setattr(cuda_wait, "after", spy_after)
    monkeypatch.setattr(cuda_wait, "wait", spy_wait)
    return seen


def test_each_step_of_a_pipeline_is_waited_for_through_its_flag_token_exact(flags, model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    pipe = chain(path, spec, [2, 4])
    pipe.start("a", PROMPTS["a"])
    for _ in range(7):
        pipe.decode(["a"])
    assert pipe.tokens["a"] == reference_tokens(path, PROMPTS["a"], 8)
    waited = [flag for flag, _ in flags["waited"] if flag is not None]
    # every step launched, on three stages, was finished by polling its own flag first
    assert len(waited) >= 3 * 9
    assert all(ran for flag, ran in flags["waited"] if flag is not None)
    assert {id(f) for f in waited} <= {id(f) for f in flags["launched"]}


@pytest.mark.skipif(not ON_CUDA, reason="the signal kernel needs MLX's CUDA backend")
def test_the_signal_kernel_sets_the_flag_the_host_polls():
    x = mx.random.normal((2048, 2048))
    y = x
    for _ in range(64):
        y = mx.tanh(y @ x) * 0.5
    mx.async_eval(y)
    flag = cuda_wait.after([y])
    assert cuda_wait.wait(flag, limit=10.0)
    assert flag.view[0] == 1
    assert np.isfinite(np.asarray(y)).all()
    assert cuda_wait.wait(None) is False
