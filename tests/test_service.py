"""Running as a service: any start order, and SIGTERM drains (docs/deploy.md)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import ROOT
from test_serve_cli import free_port

from protos import inference_pb2, inference_pb2_grpc


def _lines(proc: subprocess.Popen, out: list[str]) -> threading.Thread:
    """Collect a process's output lines in the background."""
    def read() -> None:
        for line in proc.stdout:
            out.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _wait_for(out: list[str], prefix: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) or prefix in line for line in out):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {prefix!r} in:\n" + "".join(out))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def late_cluster(cache_dir, tmp_path_factory):
    """A coordinator started before its worker; the worker comes up once the coordinator
    says it waits for it."""
    from coordinator.demo import DEMO_SPEC, cached_model

    model = cached_model(DEMO_SPEC, cache_dir)
    worker_port, grpc_port = free_port(), free_port()
    coord = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--model", str(model), "--workers",
         f"127.0.0.1:{worker_port}", "--no-discover", "--host", "127.0.0.1", "--grpc-port",
         str(grpc_port), "--http-port", str(free_port()), "--worker-wait", "90",
         "--cache-dir", str(tmp_path_factory.mktemp("coord"))],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    _lines(coord, out)
    worker = None
    try:
        _wait_for(out, "waiting up to 90s for workers", coord)
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1", "--port",
             str(worker_port), "--no-advertise", "--memory", "2GiB", "--cache-dir",
             str(tmp_path_factory.mktemp("worker"))],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(out, "ready", coord)
        yield coord, f"127.0.0.1:{grpc_port}", out
    finally:
        for p in (coord, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_coordinator_started_before_its_workers_waits_and_serves(late_cluster):
    _, address, out = late_cluster
    assert any("all 1 worker(s) answered" in line for line in out), "".join(out)
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        msgs = list(stub.Generate(inference_pb2.GenerateRequest(
            prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=8)), timeout=60))
    assert sum(len(m.token_ids) for m in msgs) == 8


def test_sigterm_lets_a_running_stream_finish_then_stops(late_cluster):
    coord, address, out = late_cluster
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        stream = stub.Generate(inference_pb2.GenerateRequest(
            prompt="Once upon a time", sampling=inference_pb2.SamplingParams(max_tokens=120)),
            timeout=60)
        first = next(stream)
        coord.send_signal(signal.SIGTERM)
        rest = list(stream)  # the stream goes on to its end
        tokens = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
        assert tokens == 120 and rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert coord.wait(30) == 0, "".join(out)
    assert any("draining: 1 request(s)" in line for line in out), "".join(out)
