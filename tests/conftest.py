"""Shared fixtures: tiny models built on the fly, worker processes, an in-process coordinator."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SHARDLINE_CACHE_DIR", str(ROOT / ".pytest_cache" / "shardline"))

GiB = 1 << 30

# Under CI a test whose tools are missing fails: a suite that skips its lab tests there would
# pass without having run them (.ci/run sets CI=true and installs the tools).
CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def need(condition: object, reason: str) -> None:
    """Skip the test when `condition` is false, or fail it under CI (`CI=true`)."""
    if condition:
        return
    if CI:
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason)


def need_module(name: str):
    """`import name`, else skip the test (fail it under CI)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"needs the Python module {name} ({e})")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    path = Path(os.environ["SHARDLINE_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path):
    """`model_dir(spec)` -> path of that tiny model, built once per cache dir."""
    from coordinator.demo import cached_model

    return lambda spec: cached_model(spec, cache_dir)


@pytest.fixture(scope="session")
def workers(cache_dir: Path) -> Iterator[list[str]]:
    """Three worker processes with unequal memory (1, 2 and 3 GiB), shared by the session."""
    from coordinator.local import LocalWorkers

    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache_dir,
                         names=["w1", "w2", "w3"])
    try:
        yield local.start()
    finally:
        local.stop()


async def until(condition, timeout: float = 30.0, every: float = 0.01) -> bool:
    """Poll `condition()` until it holds (True) or `timeout` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


async def loaded_cluster(path, addresses, secret: bytes | None = None):
    """A Cluster of the model at `path` (id "t") over `addresses`, its plan loaded."""
    from coordinator.cluster.cluster import Cluster, connect_all
    from coordinator.cluster.modelinfo import read_model_info

    cluster = Cluster(read_model_info(path, model_id="t"),
                      await connect_all(addresses, secret=secret))
    await cluster.load()
    return cluster


def run(coro):
    """Run a coroutine on a fresh event loop (each test owns its loop)."""
    return asyncio.run(coro)


class Serving:
    """An in-process coordinator over given worker addresses, with a gRPC stub to its API."""

    def __init__(self, model: Path, addresses: Sequence[str], **options) -> None:
        from coordinator.app import Coordinator, ServeOptions

        self.coordinator = Coordinator(
            ServeOptions(model=str(model), workers=list(addresses), host="127.0.0.1",
                         grpc_port=0, **{"http_port": 0, **options}),
            progress=lambda m: None,
        )
        self.channel = None

    async def __aenter__(self) -> Serving:
        import grpc

        from protos import inference_pb2_grpc

        await self.coordinator.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.coordinator.grpc_port}")
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.coordinator.stop()

    async def generate(self, prompt_ids: Sequence[int], max_tokens: int, **sampling):
        """(token ids, finish reason, text) of one Generate call."""
        from protos import inference_pb2

        req = inference_pb2.GenerateRequest(
            prompt_token_ids=list(prompt_ids),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
        )
        tokens, text, finish = [], "", 0
        async for msg in self.stub.Generate(req):
            tokens += list(msg.token_ids)
            text += msg.text
            finish = msg.finish_reason or finish
        return tokens, finish, text


def reference_tokens(model: Path, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy tokens from single-process mlx-lm, cut at EOS like the coordinator does."""
    import json

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    net, _ = load_model(model)
    eos = json.loads((model / "config.json").read_text()).get("eos_token_id")
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    out = []
    for token, _ in generate_step(mx.array(list(prompt_ids)), net, max_tokens=max_tokens):
        if token in eos:
            break
        out.append(token)
    return out


def counter_by(port: int, family: str, label: str) -> dict[str, float]:
    """The `_total` samples of counter `family` on a metrics port (on 127.0.0.1), by `label`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return {s.labels[label]: s.value for f in text_string_to_metric_families(text.decode())
            if f.name == family for s in f.samples if s.name.endswith("_total")}
