"""A cut and a lossy link under running requests, on lab hosts (network namespaces, needs root).

A coordinator (h4) and three workers (h1-h3) each on its own host, given by address. While
requests with a deadline stream, worker h2's cable (or the coordinator's) is pulled for 5 s
and plugged back, or h2's link made slow and lossy: every request finishes with exactly the
fault-free tokens or fails UNAVAILABLE within its deadline saying why; none hangs; and the
cluster serves again, exactly, without a restart.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, reference_tokens
from lab import Lab, built

from coordinator.demo import ModelSpec

pytestmark = pytest.mark.slow

GRPC = "127.0.0.1:50051"
MAX_TOKENS = 100
DEADLINE = 60.0  # seconds each request may take, fault included
CUT = 5.0  # seconds the cable stays out
PROMPTS = [[1, 5, 9, 200, 33, 4, 77, 12], [3, 141, 59, 26, 5, 35], [7, 8, 9, 10, 11],
           [250, 251, 17, 42]]
# two greedy and two seeded requests (temperature > 0: their fault-free tokens come from a
# lone run before the fault)
SAMPLINGS = [{}, {}, {"temperature": 0.9, "top_p": 0.95, "seed": 7},
             {"temperature": 0.8, "top_k": 40, "seed": 11}]

# Runs in the coordinator's namespace. argv: address, max tokens, deadline, JSON requests.
# Prints {"alone": [...]} (each request run alone, before any fault), then {"streaming": n}
# once every request of the concurrent round has n tokens (the fault goes in then), then one
# {"i", "ok", "code", "details", "tokens", "seconds"} per request, then {"done": true}.
CLIENT = r"""
import asyncio, json, sys, time
import grpc
from protos import inference_pb2, inference_pb2_grpc
address, max_tokens, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
requests = json.loads(sys.argv[4])

def say(obj):
    print(json.dumps(obj), flush=True)

async def one(stub, i, got):
    prompt, sampling = requests[i]
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                        SamplingParams(max_tokens=max_tokens, **sampling))
    t0 = time.monotonic()
    try:
        async for m in stub.Generate(req, timeout=deadline):
            got += list(m.token_ids)
        return dict(i=i, ok=True, tokens=got, seconds=time.monotonic() - t0)
    except grpc.aio.AioRpcError as e:
        return dict(i=i, ok=False, code=e.code().name, details=e.details(), tokens=got,
                    seconds=time.monotonic() - t0)

async def main():
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        alone = []
        for i in range(len(requests)):
            r = await one(stub, i, [])
            assert r["ok"], r
            alone.append(r["tokens"])
        say({"alone": alone})
        got = [[] for _ in requests]
        tasks = [asyncio.create_task(one(stub, i, got[i])) for i in range(len(requests))]
        while min(map(len, got)) < 4 and not any(t.done() for t in tasks):
            await asyncio.sleep(0.002)
        say({"streaming": min(map(len, got))})
        for r in await asyncio.gather(*tasks):
            say(r)
        say({"done": True})

asyncio.run(main())
"""

PROBE = r"""
import json, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos import inference_pb2, inference_pb2_grpc
address, what = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(address) as channel:
    if what == "health":
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3).status
            print(json.dumps(status == health_pb2.HealthCheckResponse.SERVING))
        except grpc.RpcError:
            print("false")
    else:
        stub = inference_pb2_grpc.InferenceStub(channel)
        state = stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=5)
        print(json.dumps({w.name: w.status for w in state.workers}))
"""


def start_cluster(lab: Lab, model: Path, tmp: Path) -> None:
    for i in (1, 2, 3):
        lab.start(i, f"w{i}", "worker", "serve", "--port", "50061", "--name", f"w{i}",
                  "--memory", "1GiB", "--cache-dir", str(tmp / f"w{i}"), "--no-advertise")
    coordinator = lab.start(
        4, "coordinator", "coordinator", "serve", "--model", str(model), "--no-discover",
        "--workers", ",".join(f"{lab.ip(i)}:50061" for i in (1, 2, 3)), "--worker-wait", "30",
        "--grpc-port", "50051", "--http-port", "8080", "--context", "256")
    log = lab.procs[-1][1]
    deadline = time.monotonic() + 90
    while "ready" not in log.read_text():
        assert coordinator.poll() is None and time.monotonic() < deadline, lab.logs()
        time.sleep(0.2)


def probe(lab: Lab, what: str):
    proc = lab.run(4, "-c", PROBE, GRPC, what, timeout=30)
    assert proc.returncode == 0, proc.stderr + lab.logs()
    return json.loads(proc.stdout)


def serving_again(lab: Lab, timeout: float = 60) -> float:
    """Seconds until the coordinator's health says SERVING (polled)."""
    start = time.monotonic()
    while not probe(lab, "health"):
        assert time.monotonic() - start < timeout, f"not serving after {timeout}s\n" + \
            lab.logs()
        time.sleep(0.3)
    return time.monotonic() - start


class Client:
    """The CLIENT script running in the coordinator's namespace, read line by line."""

    def __init__(self, lab: Lab, requests: list) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.hosts[3], sys.executable, "-c", CLIENT, GRPC,
             str(MAX_TOKENS), str(DEADLINE), json.dumps(requests)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lab = lab

    def line(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the client said nothing for {timeout}s\n" + self.lab.logs()
        text = self.proc.stdout.readline()
        assert text, "the client ended early: " + self.proc.stderr.read() + self.lab.logs()
        return json.loads(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_with_fault(lab: Lab, model: Path, fault, requests: list) -> tuple[list, list, float]:
    """Run `requests` alone, then together with `fault()` applied once they stream; returns
    (fault-free tokens, results, seconds the concurrent round took from the fault)."""
    client = Client(lab, requests)
    try:
        alone = client.line(120)["alone"]
        assert "streaming" in client.line(60)
        t_fault = time.monotonic()
        fault()
        results = []
        while "done" not in (msg := client.line(DEADLINE + 30)):
            results.append(msg)
        return alone, results, time.monotonic() - t_fault
    finally:
        client.close()


def check(results: list, expected: list[list[int]]) -> None:
    """Each request exact, or UNAVAILABLE within its deadline with a reason."""
    assert len(results) == len(expected)
    for r in results:
        if r["ok"]:
            assert r["tokens"] == expected[r["i"]], r
        else:
            assert r["code"] == "UNAVAILABLE" and r["details"], r
            assert r["seconds"] <= DEADLINE + 1, r
            # what came before the failure was still exact: nothing was lost or doubled
            assert r["tokens"] == expected[r["i"]][: len(r["tokens"])], r


def summary(results: list) -> list:
    """(ok or the status code, tokens, seconds) of each request, for the log."""
    return [(r["ok"] or r["code"], len(r["tokens"]), round(r["seconds"], 1)) for r in results]


def expected_tokens(model: Path, alone: list) -> list[list[int]]:
    greedy = {i: reference_tokens(model, p, MAX_TOKENS)
              for i, (p, s) in enumerate(zip(PROMPTS, SAMPLINGS, strict=True)) if not s}
    assert all(alone[i] == g for i, g in greedy.items())  # the fault-free run matches mlx-lm
    return [greedy.get(i, a) for i, a in enumerate(alone)]


def after_the_fault(lab: Lab, model: Path) -> None:
    """A new request on the same coordinator (no restart) is served, exactly."""
    serving_again(lab)
    client = Client(lab, [[PROMPTS[1], {}]])
    try:
        alone = client.line(DEADLINE)["alone"]
    finally:
        client.close()
    assert alone == [reference_tokens(model, PROMPTS[1], MAX_TOKENS)]


@pytest.fixture
def lab(tmp_path):
    with built(4, tmp_path, "tc") as lab:
        yield lab


# the middle stage (its streams in and out both cross the cut), or the coordinator (no worker
# answers it: nothing to re-plan over, so its requests fail, and it serves again after)
@pytest.mark.parametrize("host", [2, 4], ids=["worker", "coordinator"])
def test_a_cut_link_loses_no_request_and_the_cluster_serves_again(lab, model_dir, tmp_path,
                                                                  host):
    model = model_dir(ModelSpec(family="llama"))
    start_cluster(lab, model, tmp_path)
    requests = [[p, s] for p, s in zip(PROMPTS, SAMPLINGS, strict=True)]

    def cut() -> None:
        lab.cut(host)
        time.sleep(CUT)  # the fault's length, not a wait for a state
        lab.mend(host)

    alone, results, took = run_with_fault(lab, model, cut, requests)
    expected = expected_tokens(model, alone)
    print(f"\ncut {CUT:g}s: {summary(results)}; round {took:.1f}s; workers "
          f"{probe(lab, 'state')}")
    assert took >= CUT  # the requests were still running when the cable went back in
    check(results, expected)
    after_the_fault(lab, model)


def test_a_lossy_slow_link_loses_no_request(lab, model_dir, tmp_path):
    model = model_dir(ModelSpec(family="llama"))
    start_cluster(lab, model, tmp_path)
    requests = [[p, s] for p, s in zip(PROMPTS, SAMPLINGS, strict=True)]
    applied: list[str] = []

    def shape() -> None:
        applied.append(lab.shape(2, delay_ms=20, loss_pct=5.0, rate="1mbit"))

    try:
        alone, results, took = run_with_fault(lab, model, shape, requests)
        dropped = lab.dropped(2)
    finally:
        lab.unshape(2)
    expected = expected_tokens(model, alone)
    print(f"\n{applied[0]}: {dropped} packets dropped; "
          f"{summary(results)}; round {took:.1f}s")
    assert dropped > 0  # the shaping was in the way of the requests
    check(results, expected)
    after_the_fault(lab, model)
