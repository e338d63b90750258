"""Discovery across real hosts: network namespaces on a bridge, real multicast DNS (needs root).

Hosts h1-h3 run workers, h4 the coordinator (`--min-workers 3`, no `--workers`), h5 a worker
that joins later, h6 a worker of another cluster, one with a copied node id, and a stranger
without the cluster secret (announced in our cluster's name, and calling a worker directly).
Every host is a namespace with its own address on a private bridge; nothing reaches outside it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import reference_tokens
from lab import built

from coordinator.demo import ModelSpec
from protos import WIRE_VERSION

# root and iproute2: without them `built` skips, or fails under CI (tests/lab.py)
pytestmark = pytest.mark.slow

GRPC = "127.0.0.1:50051"
PROMPT = [1, 17, 42, 99, 7, 250, 31]

# Runs inside the coordinator's namespace: print the cluster and health, or generate.
PROBE = r"""
import json, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos import inference_pb2, inference_pb2_grpc
address, what = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(address) as channel:
    stub = inference_pb2_grpc.InferenceStub(channel)
    if what == "state":
        state = stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=5)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5).status
        print(json.dumps({"serving": health == health_pb2.HealthCheckResponse.SERVING,
              "workers": [{"name": w.name, "status": w.status, "id": w.id, "address": w.address,
                           "layers": [w.layer_start, w.layer_end]} for w in state.workers]}))
    else:
        request = inference_pb2.GenerateRequest(
            prompt_token_ids=[int(t) for t in sys.argv[3].split(",")],
            sampling=inference_pb2.SamplingParams(max_tokens=int(sys.argv[4])))
        try:
            tokens = [t for m in stub.Generate(request, timeout=60) for t in m.token_ids]
            print(json.dumps({"tokens": tokens}))
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}))
"""

# Runs on another host of the LAN: call a worker's Info without the cluster secret.
STRANGER = r"""
import grpc, sys
from protos import worker_pb2, worker_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    try:
        worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"""


# Runs on another host: browse the coordinator's `_shardline-api._tcp.local.` over mDNS.
BROWSE_API = r"""
import json, sys, time
from zeroconf import ServiceBrowser, ServiceListener, Zeroconf
from protos import API_SERVICE_TYPE
from protos.discovery import decode_api_txt
zc, names = Zeroconf(), []
class Found(ServiceListener):
    def add_service(self, zc, type_, name): names.append(name)
    def update_service(self, zc, type_, name): pass
    def remove_service(self, zc, type_, name): pass
browser = ServiceBrowser(zc, API_SERVICE_TYPE, Found())
deadline = time.monotonic() + 10
while not names and time.monotonic() < deadline:
    time.sleep(0.05)
out = []
for name in names:
    info = zc.get_service_info(API_SERVICE_TYPE, name, timeout=3000)
    if info is not None:
        ad = decode_api_txt(info.properties)
        out.append({"name": name, "port": info.port, "addresses": info.parsed_addresses(),
                    "cluster": ad.cluster, "api": ad.api, "http": ad.http_port,
                    "model": ad.model})
browser.cancel()
zc.close()
print(json.dumps(out))
"""

# Runs inside the coordinator's namespace: its /sd/workers and /metrics.
SCRAPE = r"""
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:8080{path}", timeout=5) as r:
        return r.read().decode()
workers = {s.labels["state"]: s.value for f in text_string_to_metric_families(get("/metrics"))
           for s in f.samples if s.name == "shardline_workers" and s.value}
print(json.dumps({"sd": json.loads(get("/sd/workers")), "workers": workers}))
"""


@pytest.fixture
def lab(tmp_path):
    with built(6, tmp_path) as lab:
        yield lab


def test_workers_found_over_mdns_serve_and_membership_follows(lab, model_dir, tmp_path):
    t0 = time.monotonic()
    model = model_dir(ModelSpec(family="llama"))
    cluster = f"lab-{lab.prefix}"

    secret = tmp_path / "cluster-secret"
    secret.write_text("a-lab-cluster-secret-0123456789\n")

    def worker(host: int, name: str, *extra: str, cache: str | None = None,
               port: int = 50061, keyed: bool = True) -> subprocess.Popen:
        return lab.start(host, cache or name, "worker", "serve", "--port", str(port), "--name",
                         name, "--memory", "1GiB", "--cache-dir", str(tmp_path / (cache or name)),
                         "--cluster", cluster, *(("--secret-file", str(secret)) if keyed else ()),
                         *extra)

    def probe(*args: str) -> dict:
        proc = lab.run(4, "-c", PROBE, GRPC, *args)
        assert proc.returncode == 0, proc.stderr + lab.logs()
        return json.loads(proc.stdout)

    def wait_for(what: str, ok: Callable[[dict], bool], timeout: float = 20) -> float:
        start, state = time.monotonic(), None
        while time.monotonic() - start < timeout:
            state = probe("state")
            if ok(state):
                return time.monotonic() - start
            time.sleep(0.3)
        pytest.fail(f"{what} did not happen in {timeout}s; last state {state}\n{lab.logs()}")

    def status(state: dict) -> dict[str, str]:
        return {w["name"]: w["status"] for w in state["workers"]}

    def scrape() -> dict:
        proc = lab.run(4, "-c", SCRAPE)
        assert proc.returncode == 0, proc.stderr + lab.logs()
        return json.loads(proc.stdout)

    spent = {"api": 0.0, "follow": 0.0}

    def follows(what: str, targets: set[str], workers: dict[str, int]) -> dict:
        """/sd/workers lists exactly `targets` (worker labels), each at its host's address,
        and shardline_workers counts `workers` by state (states at 0 left out)."""
        start = time.monotonic()
        deadline, seen = start + 10, None
        while time.monotonic() < deadline:
            seen = scrape()
            labels = {t["labels"]["worker"] for t in seen["sd"]}
            if labels == targets and seen["workers"] == workers:
                spent["follow"] += time.monotonic() - start
                for t in seen["sd"]:
                    host = lab.ip(int(t["labels"]["worker"].removeprefix("w")))
                    assert t["targets"][0].startswith(f"{host}:"), t
                    assert t["labels"]["layers"].startswith("[") and t["labels"]["worker_id"]
                return seen
            time.sleep(0.3)
        pytest.fail(f"/sd/workers and /metrics did not follow {what} in 10s: {seen}\n"
                    f"cluster: {probe('state')}\n{lab.logs()}")

    # w1's node id is also given to a worker started later on h6 (a copied cache dir)
    (tmp_path / "w1").mkdir()
    (tmp_path / "w1" / "w1.id").write_text("copiedcachedir01\n")
    shutil.copytree(tmp_path / "w1", tmp_path / "dup")
    # (another host, so another name: a clash of instance names too is a separate case)
    (tmp_path / "dup" / "w1-copy.id").write_text("copiedcachedir01\n")
    for i in (1, 2, 3):
        worker(i, f"w{i}")
    lab.start(6, "decoy", "worker", "serve", "--port", "50062", "--name", "decoy",
              "--memory", "1GiB", "--cache-dir", str(tmp_path / "decoy"),
              "--cluster", "someone-else")
    # a stranger in our cluster's name, without the secret: it must not get a place in the plan
    worker(6, "impostor", port=50063, keyed=False)
    coordinator = lab.start(4, "coordinator", "coordinator", "serve", "--model", str(model),
                            "--cluster", cluster, "--min-workers", "3", "--grpc-port", "50051",
                            "--http-port", "8080", "--discover-timeout", "40",
                            "--secret-file", str(secret))
    log = lab.procs[-1][1]
    deadline = time.monotonic() + 60
    while "ready" not in log.read_text():
        assert coordinator.poll() is None and time.monotonic() < deadline, lab.logs()
        time.sleep(0.2)
    startup = log.read_text()
    assert "waiting for 3 worker(s)" in startup and startup.count("  found w") == 3, startup
    t_ready = time.monotonic() - t0

    # 0. the coordinator's API is announced: another host finds it, its gRPC port and HTTP port
    t_api = time.monotonic()
    browsed = lab.run(5, "-c", BROWSE_API, timeout=30)
    spent["api"] = time.monotonic() - t_api
    assert browsed.returncode == 0, browsed.stderr + lab.logs()
    apis = json.loads(browsed.stdout)
    assert len(apis) == 1, apis
    assert apis[0]["port"] == 50051 and apis[0]["http"] == 8080 and lab.ip(4) in \
        apis[0]["addresses"], apis
    assert (apis[0]["cluster"], apis[0]["api"], apis[0]["model"]) == \
        (cluster, WIRE_VERSION, model.name), apis

    # 1. found over mDNS, each with its own address, planned over all three; decoy and the
    # impostor without the secret left out; a stranger's call to a worker refused
    wait_for("decoy and impostor seen", lambda s: "decoy" in status(s) and any(
        "cannot prove the cluster secret" in w["status"] for w in s["workers"]))
    state = probe("state")
    rows = status(state)
    assert state["serving"] and all(rows[f"w{i}"] == "serving" for i in (1, 2, 3)), state
    assert rows["decoy"].startswith("excluded: other cluster 'someone-else'"), rows
    stranger = lab.run(6, "-c", STRANGER, f"{lab.ip(1)}:50061")
    assert stranger.stdout.startswith("UNAUTHENTICATED") and "cluster secret" in \
        stranger.stdout, stranger.stdout + stranger.stderr
    addresses = {w["name"]: w["address"] for w in state["workers"]}
    assert {addresses[f"w{i}"] for i in (1, 2, 3)} == {f"{lab.ip(i)}:50061" for i in (1, 2, 3)}
    expected = reference_tokens(model, PROMPT, 12)
    assert probe("generate", ",".join(map(str, PROMPT)), "12") == {"tokens": expected}
    follows("the start", {"w1", "w2", "w3"}, {"serving": 3, "excluded": 2})

    # 2. a copy of w1's node id is refused, and w1 keeps serving
    worker(6, "w1-copy", cache="dup")
    wait_for("duplicate refused", lambda s: any(
        w["status"].startswith("excluded: duplicate node id copiedcachedir01")
        for w in s["workers"]))
    w1 = [w["status"] for w in probe("state")["workers"] if w["address"].startswith(lab.ip(1))]
    assert w1 == ["serving"]
    assert "refusing worker" in log.read_text()  # a clear warning on both sides
    deadline = time.monotonic() + 10
    while "uses this worker's node id" not in (tmp_path / "dup.log").read_text():
        assert time.monotonic() < deadline, lab.logs()
        time.sleep(0.2)

    def serving(s: dict) -> list[str]:
        return sorted(w["name"] for w in s["workers"] if w["status"] == "serving")

    # 3. a serving worker leaves (SIGTERM: mDNS goodbye): marked within seconds, and the
    # coordinator re-plans over the two left and serves again
    lab.procs[1][0].send_signal(signal.SIGTERM)
    t_left = wait_for("w2 left", lambda s: status(s).get("w2") == "left")
    t_left_served = t_left + wait_for("served by w1, w3", lambda s: s["serving"] and
                                      serving(s) == ["w1", "w3"])
    assert probe("generate", ",".join(map(str, PROMPT)), "12") == {"tokens": expected}
    # the leaver is out of /sd/workers and counted as left (decoy, impostor, copy excluded)
    follows("w2 leaving", {"w1", "w3"}, {"serving": 2, "left": 1, "excluded": 3})

    # 4. a worker joins on h5: re-planned while idle over w1, w3, w5, and serving again
    worker(5, "w5")
    # (two rows are named w1, the real one and the refused copy: match on status, not name)
    t_join = wait_for("w5 joined", lambda s: s["serving"] and {"w1", "w3", "w5"} <= {
        w["name"] for w in s["workers"] if w["status"] == "serving"})
    state = probe("state")
    layers = sorted(w["layers"] for w in state["workers"] if w["status"] == "serving")
    assert serving(state) == ["w1", "w3", "w5"]
    assert layers[0][0] == 0 and layers[-1][1] == 6
    assert probe("generate", ",".join(map(str, PROMPT)), "12") == {"tokens": expected}
    follows("w5 joining", {"w1", "w3", "w5"}, {"serving": 3, "left": 1, "excluded": 3})

    # 5. a worker killed without a goodbye: the next request breaks on it, the coordinator
    # finds it unreachable, re-plans over w1 and w5, and that request still completes
    lab.procs[2][0].kill()
    t_dead = time.monotonic()
    assert probe("generate", ",".join(map(str, PROMPT)), "12") == {"tokens": expected}
    t_dead = time.monotonic() - t_dead
    wait_for("w3 unreachable", lambda s: status(s).get("w3") == "unreachable" and
             serving(s) == ["w1", "w5"])
    follows("w3 dying", {"w1", "w5"},
            {"serving": 2, "left": 1, "unreachable": 1, "excluded": 3})

    table = lab.run(4, "-m", "coordinator", "status", "--address", GRPC)
    assert table.returncode == 0, table.stderr
    for word in ("w5", "unreachable", "other cluster", "duplicate node id"):
        assert word in table.stdout, table.stdout
    print(f"\nlab: ready after {t_ready:.1f}s; left seen in {t_left:.1f}s and served without "
          f"it after {t_left_served:.1f}s, join served in {t_join:.1f}s, a request across a "
          f"kill took {t_dead:.1f}s; API browsed in {spent['api']:.1f}s, /sd/workers and "
          f"/metrics checked in {spent['follow']:.1f}s; total {time.monotonic() - t0:.1f}s")
