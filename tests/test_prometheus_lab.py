"""A real Prometheus scrapes a live cluster under load; every dashboard query returns data."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import ROOT, Serving, need, run
from test_metrics import SPEC_MODEL, panel_targets

from protos import inference_pb2


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    """Skip without the prometheus binary, or fail under CI (.ci/run installs it)."""
    need(shutil.which("prometheus"), "the prometheus binary is not installed (Debian package "
         "prometheus; .ci/run installs it)")

SHIPPED = ROOT / "deploy" / "prometheus.yml"
SCRAPE = yaml.safe_load(SHIPPED.read_text())["global"]["scrape_interval"]  # the shipped one
WINDOW = "30s"  # stands in for Grafana's $__rate_interval and $__range
LOAD_SECONDS = 12.0


def seconds(duration: str) -> float:
    """A Prometheus duration such as `5s` or `1m` in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    unit = next(u for u in sorted(units, key=len, reverse=True) if duration.endswith(u))
    return float(duration.removesuffix(unit)) * units[unit]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    for var, val in (("$__rate_interval", WINDOW), ("$__range", WINDOW),
                     ("$__interval", SCRAPE), ("$worker", ".*")):
        expr = expr.replace(var, val)
    assert "$" not in expr, expr
    return expr


def config(coordinator: str) -> str:
    """deploy/prometheus.yml as shipped, pointed at this coordinator instead of Docker's host
    (Prometheus runs natively here, so loopback workers stay on 127.0.0.1)."""
    text = SHIPPED.read_text()
    for old, new in (("host.docker.internal:8080", coordinator),
                     ("loopback=host.docker.internal", "loopback=127.0.0.1")):
        assert old in text, f"deploy/prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    assert "host.docker.internal" not in text, text
    return text


class Prometheus:
    """A Prometheus server on its own port and data directory (not the system's service)."""

    def __init__(self, tmp: Path, coordinator: str) -> None:
        self.port = free_port()
        (tmp / "prometheus.yml").write_text(config(coordinator))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.tmp = tmp

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = get_json(url)
        assert body["status"] == "success", body
        return body["data"]

    def wait_targets(self, count: int, timeout: float = 30.0) -> list[dict]:
        """Block until `count` targets are up (1 coordinator + the workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + self.logs())
            try:
                active = self.api("targets")["activeTargets"]
                if sum(t["health"] == "up" for t in active) >= count:
                    return active
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"targets not up in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return (self.tmp / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def load(s: Serving, seconds: float) -> int:
    """Four clients generating back to back (varied prompts, two sharing a prefix), plus a
    refused and a cancelled request; returns the number of completions."""
    done = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        k = 0
        while time.monotonic() < stop:
            prompt = [(7 * i + 3 * k + j) % 400 + 20 for j in range(4 + (5 * k + i) % 40)]
            await s.generate(prompt, 6 + (i + k) % 10)
            done += 1
            k += 1

    async def odd_ones() -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await s.stub.Generate(inference_pb2.GenerateRequest(prompt_token_ids=[10**6])).read()
        call = s.stub.Generate(inference_pb2.GenerateRequest(
            prompt_token_ids=list(range(30, 50)),
            sampling=inference_pb2.SamplingParams(max_tokens=200)))
        await call.read()
        call.cancel()

    await asyncio.gather(*(client(i) for i in range(4)), odd_ones())
    return done


def test_every_dashboard_query_returns_data_from_a_real_prometheus(model_dir, workers, tmp_path):
    path = model_dir(SPEC_MODEL)

    async def scenario():
        async with Serving(path, workers) as s:
            coordinator = f"127.0.0.1:{s.coordinator.http_port}"
            prom = Prometheus(tmp_path, coordinator)
            try:
                await asyncio.to_thread(prom.wait_targets, 1 + len(workers))
                completed = await load(s, LOAD_SECONDS)
                await asyncio.sleep(2 * seconds(SCRAPE) + 0.5)  # two more scrapes after it
                results = {}
                for name, title, target in panel_targets():
                    expr = concrete(target["expr"])
                    results[(name, title, expr)] = await asyncio.to_thread(
                        prom.api, "query", query=expr)
                targets = await asyncio.to_thread(prom.api, "targets")
                return completed, results, targets
            finally:
                prom.stop()

    completed, results, targets = run(scenario())
    assert completed >= 8
    jobs = sorted(t["labels"]["job"] for t in targets["activeTargets"])
    assert jobs == ["shardline-coordinator"] + ["shardline-workers"] * len(workers)
    worker_labels = sorted(t["labels"]["worker"] for t in targets["activeTargets"]
                           if t["labels"]["job"] == "shardline-workers")
    assert worker_labels == ["w1", "w2", "w3"]
    empty, no_number = [], []
    for (name, title, expr), data in results.items():
        values = [float(r["value"][1]) for r in data["result"]]
        if not values:
            empty.append(f"{name} / {title}: {expr}")
        elif not any(math.isfinite(v) for v in values):
            no_number.append(f"{name} / {title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not no_number, "queries with only NaN:\n" + "\n".join(no_number)
    assert len(results) >= 40
