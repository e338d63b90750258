"""`coordinator serve --demo`, `status` and `generate` end to end, as a user runs them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ROOT

from protos import inference_pb2, inference_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--demo", "--grpc-port", str(port),
         "--http-port", str(free_port()), "--no-discover", "--host", "127.0.0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready"):
            break
    if not lines or not lines[-1].startswith("ready"):
        proc.kill()
        pytest.fail("demo did not start:\n" + "".join(lines))
    yield f"127.0.0.1:{port}", "".join(lines), proc
    if proc.poll() is None:
        proc.terminate()
        assert proc.wait(20) == 0


def test_demo_serves_on_two_local_workers_and_prints_its_plan(demo):
    address, startup, _ = demo
    assert "local-0" in startup and "local-1" in startup and "[0, 4)" in startup
    proc = cli("status", "--address", address)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("local-")]
    assert len(rows) == 2 and all("serving" in r for r in rows)
    assert "[0, 4)" in rows[0] and "[4, 8)" in rows[1]


def test_generate_prints_the_text_single_process_mlx_lm_gives(demo, cache_dir):
    from mlx_lm import load, stream_generate

    from coordinator.demo import DEMO_SPEC, cached_model

    address, _, _ = demo
    prompt = "The quick brown fox jumps over the lazy dog while the cluster hums along."
    proc = cli("generate", "--address", address, "--prompt", prompt, "--max-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load(str(cached_model(DEMO_SPEC, cache_dir)))
    expected = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=32))
    assert proc.stdout[:-1] == expected


def test_chat_models_and_cluster_over_grpc(demo):
    address, _, _ = demo
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        models = stub.ListModels(inference_pb2.ListModelsRequest()).models
        assert [m.id for m in models] == ["shardline-demo"] and models[0].num_layers == 8
        assert models[0].weight_bytes > 0
        state = stub.GetCluster(inference_pb2.GetClusterRequest())
        assert state.model == "shardline-demo" and state.partition == "memory"
        assert [(w.layer_start, w.layer_end) for w in state.workers] == [(0, 4), (4, 8)]
        chat = inference_pb2.ChatRequest(
            messages=[inference_pb2.ChatMessage(role="system", content="Be brief."),
                      inference_pb2.ChatMessage(role="user", content="Hello there")],
            sampling=inference_pb2.SamplingParams(max_tokens=12), request_id="r1")
        out = list(stub.Chat(chat))
        assert sum(len(m.token_ids) for m in out) == 12
        assert all(m.request_id == "r1" for m in out)
        last = out[-1]
        assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 10


def test_generate_refuses_an_empty_or_over_long_prompt_in_one_line(demo):
    from test_bad_input import assert_one_line_error

    address, _, _ = demo
    assert_one_line_error(cli("generate", "--address", address, "--prompt", ""),
                          "INVALID_ARGUMENT", "prompt is empty")
    assert_one_line_error(cli("generate", "--address", address, "--prompt", "word " * 3000),
                          "INVALID_ARGUMENT", "context of")
    proc = cli("generate", "--address", address, "--prompt", "still serving", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr


def test_stopping_the_coordinator_stops_its_local_workers(demo):
    """Runs last in this module: it stops the demo and checks its workers' ports close."""
    address, _, proc = demo
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        workers = [w.address for w in stub.GetCluster(inference_pb2.GetClusterRequest()).workers]
    assert len(workers) == 2
    proc.terminate()
    assert proc.wait(20) == 0
    for worker in workers:
        host, port = worker.rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"worker {worker} still listens"
